"""Learning dynamical systems from data with residual networks read as integrators.

A residual step `x_{t+1} = x_t + h F(x_t)` is forward Euler for `x' = F(x)`. Here the network
IS the integrator: one residual function `F_theta`, shared by every step (a time-invariant
vector field, `ODEStage(tied=True)`), stepped by a scheme (`Scheme.step`, the same code the
classification networks run) and fitted to sampled trajectories. Two experiments
(`config.experiment`):

- `ode`: pendulum (or Lotka-Volterra) trajectories sampled every `dt`; `F_theta` is a residual
  MLP and each scheme (Euler, midpoint/RK2, RK4, AB2, leapfrog, LM-ResNet, ...) with step
  `h = dt` is trained on teacher-forced one-step (or short multi-step) targets. Reported per
  scheme: one-step RMSE, long-horizon rollout error against the true trajectories (relative L2
  and at the final time), error of the conserved quantity (pendulum energy), and how far the
  learned field is from the true one. Plots: trajectories, phase portraits, error growth,
  energy, training loss.
- `pde`: the 2-D heat equation `u_t = kappa (u_xx + u_yy)` on a grid. `F_theta` is ONE 3x3
  convolution kernel (single channel, no bias) and the step `u_{t+1} = u_t + K * u_t` (forward
  Euler with `h = 1`) is fitted to snapshots. The data are the explicit 5-point scheme itself
  (one internal step per snapshot), so the exact answer is the scaled Laplacian stencil
  `kappa dt / dx^2 [[0,1,0],[1,-4,1],[0,1,0]]`; the report gives the learned kernel's distance to
  it. Other schemes can be fitted too: they learn a kernel whose scheme step matches the data,
  which is not the stencil.

Multistep schemes need a past. With `config.start = "data"` (default) the true past states
seed the history (the scheme's `F` is evaluated on them), so a one-step target really is one
step of the scheme's own formula; rollouts then start from the true `x_0 .. x_c` for every
scheme alike (`c` the longest past any compared scheme keeps) and continue on their own
predictions. `"euler"` / `"copy"` use the scheme's own start rule from `x_c` alone, as a
network's first block does.

Run directory (`--workdir`): `results.md` (table + notes), `results.csv`, `results.json` (every
number, the learned kernels), `config.json`, `plots/*.png`.

    python -m experiments.dynamics --config=experiments/configs/dynamics_ode.py --workdir=runs/dynamics_ode
    python -m experiments.dynamics --config=experiments/configs/dynamics_pde.py --workdir=runs/dynamics_pde
    python -m experiments.dynamics --config=experiments/configs/dynamics_ode.py:tiny --workdir=runs/dyn_tiny
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import math
import os
import pathlib
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib
import ml_collections
import numpy as np
from tqdm.auto import tqdm

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from cnn.data import synthetic  # noqa: E402
from cnn.ode import History, ODEStage, Scheme, get_scheme, knob_values  # noqa: E402
from cnn.ode.schemes import START_MODES as SCHEME_START_MODES  # noqa: E402
from cnn.train.optim import make_optimizer  # noqa: E402
from cnn.train.state import TrainState, create_train_state  # noqa: E402
from experiments import grid  # noqa: E402

EXPERIMENTS = ("ode", "pde")
START_MODES = ("data",) + tuple(SCHEME_START_MODES)
SYSTEMS = ("pendulum", "lotka_volterra")
INITIAL_FIELDS = ("white_noise", "smooth")
ACTIVATIONS = ("tanh", "gelu", "softplus", "silu", "relu")


# ------------------------------------------------------------------------------------------------
# Systems


@dataclasses.dataclass(frozen=True)
class System:
    """An autonomous ODE with its data generator.

    Attributes:
      name: "pendulum" or "lotka_volterra".
      state_names: names of the state components, e.g. ("theta", "omega").
      invariant_name: what `invariant` measures ("energy" for the pendulum).
      vector_field: `f(x)`, `[..., d] -> [..., d]` (numpy or JAX arrays).
      invariant: `[..., d] -> [...]`, conserved along exact trajectories when undamped.
      options: the generator options in use (all of them, defaults filled in).
    """

    name: str
    state_names: tuple[str, ...]
    invariant_name: str
    vector_field: Callable[[Any], Any]
    invariant: Callable[[Any], Any]
    options: Mapping[str, Any]

    def generate(self, num_trajectories: int, num_steps: int, dt: float, seed: int) -> np.ndarray:
        """True trajectories, float64 `[num_trajectories, num_steps + 1, d]` (accurate RK4)."""
        generator = getattr(synthetic, self.name)
        return generator(num_trajectories, num_steps, dt, seed=seed, **self.options)["states"]


def _generator_defaults(name: str) -> dict[str, Any]:
    signature = inspect.signature(getattr(synthetic, name))
    return {p.name: p.default for p in signature.parameters.values() if p.kind is p.KEYWORD_ONLY}


def make_system(name: str, options: Mapping[str, Any] | None = None) -> System:
    """The system `name` with generator `options` (keyword arguments of `cnn.data.synthetic.<name>`).

    The vector field and invariant use the same parameters as the generator (its defaults
    where `options` does not set them).

    Raises:
      ValueError: unknown system, or an option the generator does not take.
    """
    if name not in SYSTEMS:
        raise ValueError(f"system={name!r} is not supported; valid: {list(SYSTEMS)}")
    defaults = _generator_defaults(name)
    options = dict(options or {})
    for key in ("seed", "initial_states"):
        defaults.pop(key, None)
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ValueError(
            f"{name} options {unknown} are not options of cnn.data.synthetic.{name}; valid: {sorted(defaults)}"
        )
    full = {**defaults, **options}
    if name == "pendulum":
        nu2, damping = float(full["natural_frequency"]) ** 2, float(full["damping"])

        def field(x):
            xp = jnp if isinstance(x, jax.Array) else np
            return xp.stack([x[..., 1], -nu2 * xp.sin(x[..., 0]) - damping * x[..., 1]], axis=-1)

        def energy(x):
            xp = jnp if isinstance(x, jax.Array) else np
            return 0.5 * x[..., 1] ** 2 - nu2 * xp.cos(x[..., 0])

        return System(name, ("theta", "omega"), "energy", field, energy, full)

    alpha, beta, gamma, delta = (float(full[k]) for k in ("alpha", "beta", "gamma", "delta"))

    def lv_field(x):
        xp = jnp if isinstance(x, jax.Array) else np
        prey, predator = x[..., 0], x[..., 1]
        return xp.stack([alpha * prey - beta * prey * predator, delta * prey * predator - gamma * predator], axis=-1)

    def lv_invariant(x):
        xp = jnp if isinstance(x, jax.Array) else np
        prey, predator = x[..., 0], x[..., 1]
        return delta * prey - gamma * xp.log(prey) + beta * predator - alpha * xp.log(predator)

    return System(name, ("prey", "predator"), "V", lv_field, lv_invariant, full)


# ------------------------------------------------------------------------------------------------
# Residual functions


class MLPField(nn.Module):
    """The learned vector field `F_theta`: an MLP `[batch, d] -> [batch, d]`.

    The output layer starts at zero, so the untrained integrator is the identity map.
    """

    hidden: tuple[int, ...] = (64, 64)
    activation: str = "tanh"

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
        del train  # no BatchNorm / dropout
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation={self.activation!r}; valid: {list(ACTIVATIONS)}")
        act = getattr(nn, self.activation)
        y = x
        for i, width in enumerate(self.hidden):
            y = act(nn.Dense(width, name=f"hidden_{i}")(y))
        return nn.Dense(x.shape[-1], kernel_init=nn.initializers.zeros, name="out")(y)


class KnownField(nn.Module):
    """A fixed vector field as a residual function (no parameters): plugs the true `f` into
    exactly the integrator the experiment trains, to check the scheme's order."""

    field: Callable[[jnp.ndarray], jnp.ndarray]

    def __call__(self, x: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
        return self.field(x).astype(x.dtype)


class StencilConv(nn.Module):
    """One 3x3 convolution, single channel, no bias: `[batch, H, W, 1] -> [batch, H, W, 1]`.

    Padding follows the boundary condition of the data: circular for periodic fields, zeros for
    zero-Dirichlet fields (the unknowns are the interior points, the boundary value 0 is the
    padding). Like every Flax conv it is a cross-correlation; the Laplacian stencil is
    symmetric, so its kernel reads the same either way.
    """

    boundary: str = "periodic"

    @nn.compact
    def __call__(self, u: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
        del train
        if u.shape[-1] != 1:
            raise ValueError(f"StencilConv expects one channel, got input shape {u.shape}")
        if self.boundary not in ("periodic", "dirichlet"):
            raise ValueError(f"boundary={self.boundary!r}; valid: ['dirichlet', 'periodic']")
        padding = "CIRCULAR" if self.boundary == "periodic" else "SAME"
        return nn.Conv(1, (3, 3), padding=padding, use_bias=False, name="stencil")(u)


def make_integrator(
    scheme: str, block: Callable[..., nn.Module], *, h: float, scheme_options: Mapping[str, Any] | None = None,
    start: str = "data",
) -> ODEStage:
    """One step `x_t -> x_{t+1}` of `scheme` with step `h` applied to `block` (a residual-function
    factory), as a one-block tied `ODEStage`: calling it repeatedly integrates the time-invariant
    field `F_theta`. Learnable scheme knobs (LM's `k`) are then one scalar for all time.

    Parameter tree: `tied_block/block/...` (the field) and `knobs/<name>` `[1]`.
    """
    if start not in START_MODES:
        raise ValueError(f"start={start!r}; valid: {list(START_MODES)}")
    options = dict(scheme_options or {})
    if "h" in options:
        raise ValueError(f"scheme_options for {scheme!r} set h={options['h']!r}; the step is the data's dt")
    return ODEStage(
        scheme=get_scheme(scheme, h=float(h), **options),
        block=block,
        num_blocks=1,
        tied=True,
        scan=False,
        start="euler" if start == "data" else start,
    )


# ------------------------------------------------------------------------------------------------
# Stepping


def history_length(scheme: Scheme | str) -> int:
    """How many past states a scheme's step reads (0 for one-step schemes)."""
    scheme = get_scheme(scheme)
    return max(scheme.num_past_states, scheme.num_past_derivatives)


def predict(
    model: ODEStage, variables: Mapping[str, Any], window: jnp.ndarray, *, context: int, horizon: int, start: str
) -> jnp.ndarray:
    """Steps the integrator `horizon` times from the true state `window[:, context]`.

    Args:
      model: from `make_integrator`.
      variables: `{"params": ...}`.
      window: true states `[batch, time, ...]` with `time >= context + 1` (`x_0 .. x_context`
        are read; later entries are ignored).
      context: index of the state the rollout starts from; with `start == "data"` the true
        states before it seed a multistep scheme's history (a scheme keeping `p` past states
        reads the last `p`; `F` is evaluated on them).
      horizon: number of steps.
      start: "data", or a scheme start rule ("euler" / "copy", must match `model.start`).

    Returns:
      predictions `[batch, horizon, ...]` of `x_{context+1} .. x_{context+horizon}`.
    """
    if horizon < 1:
        raise ValueError(f"horizon={horizon}: must be >= 1")
    scheme = get_scheme(model.scheme)
    need = history_length(scheme)

    def step(x, history):
        return model.apply(variables, x, history, train=False)

    x = window[:, context]
    history: History | None = None
    if start == "data":
        if need > context:
            raise ValueError(f"scheme {scheme.name!r} needs {need} past states but context={context}")
        if need == 0:
            history = History()
        for past in range(context - need, context):  # oldest first: builds the history step by step
            _, history = step(window[:, past], history)
    predictions = []
    if history is None:  # the scheme's own start rule (its carry changes structure: not in the scan)
        x, history = step(x, None)
        predictions.append(x[:, None])
    remaining = horizon - len(predictions)
    if remaining:
        def body(carry, _):
            x_next, history_next = step(*carry)
            return (x_next, history_next), x_next

        _, xs = jax.lax.scan(body, (x, history), None, length=remaining)
        predictions.append(jnp.moveaxis(xs, 0, 1))
    return jnp.concatenate(predictions, axis=1)


def make_windows(trajectories: np.ndarray, length: int) -> np.ndarray:
    """All windows of `length` consecutive states: `[n, T, ...] -> [n * (T - length + 1), length, ...]`."""
    n, steps = trajectories.shape[:2]
    if not 1 <= length <= steps:
        raise ValueError(f"window length={length} must be in [1, {steps}] (trajectory length)")
    starts = np.arange(steps - length + 1)
    index = starts[:, None] + np.arange(length)[None, :]
    windows = trajectories[:, index]  # [n, num_starts, length, ...]
    return windows.reshape((n * len(starts), length) + trajectories.shape[2:])


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """A trained integrator: final state, per-step loss, wall times."""

    state: TrainState
    losses: np.ndarray
    seconds: float
    seconds_first_step: float


def make_train_step(model: ODEStage, *, context: int, horizon: int, start: str) -> Callable:
    """The pure step `(state, batch) -> (state, metrics)`, `batch = {"window": [B, context+1+horizon, ...]}`.

    Loss: mean squared error of the `horizon` predicted states (teacher-forced start, then the
    model's own predictions).
    """

    def train_step(state: TrainState, batch: Mapping[str, jnp.ndarray]):
        window = batch["window"]
        target = window[:, context + 1 : context + 1 + horizon]

        def loss_fn(params):
            prediction = predict(model, {"params": params}, window, context=context, horizon=horizon, start=start)
            return jnp.mean((prediction - target) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads=grads), {"loss": loss}

    return train_step


def train_integrator(
    model: ODEStage,
    windows: np.ndarray,
    *,
    context: int,
    horizon: int,
    start: str,
    optimizer: Any,
    num_steps: int,
    batch_size: int,
    seed: int,
    progress: bool = True,
    description: str = "",
) -> TrainResult:
    """Fits `model` to `windows` `[num_windows, context+1+horizon, ...]` with Adam/SGD (`optimizer`
    is an optimizer config for `cnn.train.make_optimizer`). Batches are drawn without replacement
    within a step by a numpy generator seeded with `seed` (the whole set when `batch_size` >=
    the number of windows); initialization uses the same seed."""
    if windows.shape[1] != context + 1 + horizon:
        raise ValueError(f"windows have length {windows.shape[1]}; expected context+1+horizon={context + 1 + horizon}")
    if num_steps < 1 or batch_size < 1:
        raise ValueError(f"need num_steps >= 1 and batch_size >= 1, got {num_steps}, {batch_size}")
    tx, _ = make_optimizer(optimizer, total_steps=num_steps)
    state = create_train_state(model, tx, rng=seed, input_shape=(1,) + windows.shape[2:])
    step = jax.jit(make_train_step(model, context=context, horizon=horizon, start=start))
    data = np.asarray(windows, np.float32)
    full = batch_size >= len(data)
    device_data = jnp.asarray(data) if full else None
    order = np.random.default_rng(seed)
    losses = []
    started = time.perf_counter()
    first = math.nan
    for i in tqdm(range(num_steps), desc=description, disable=not progress, leave=False):
        batch = device_data if full else data[order.choice(len(data), size=batch_size, replace=False)]
        state, metrics = step(state, {"window": batch})
        losses.append(metrics["loss"])
        if i == 0:
            jax.block_until_ready(metrics["loss"])
            first = time.perf_counter() - started
    losses_host = np.asarray(jax.device_get(jnp.stack(losses)), np.float64)
    return TrainResult(state, losses_host, time.perf_counter() - started, first)


def final_loss(losses: np.ndarray) -> float:
    """The training loss at the end: mean over the last 5% of steps (minibatch noise averaged out)."""
    return float(np.mean(losses[-max(1, len(losses) // 20) :]))


def field_scale(scheme: Scheme, knobs: Mapping[str, float] | None = None) -> float:
    """`c` such that the scheme is a consistent discretization of `x' = c F(x)`.

    Runge-Kutta: `c = sum(b)` (1). Linear multistep `x_{t+1} = sum_j alpha_j x_{t-j} + h sum_j
    beta_j F(x_{t-j})` with `k` steps: `rho(z) = z^k - sum_j alpha_j z^{k-1-j}`, `sigma(1) =
    sum_j beta_j`, `c = sigma(1) / rho'(1)`; for LM-ResNet `c = 1 / (1 + k)`.
    """
    if scheme.kind == "runge_kutta":
        return float(sum(scheme.rk_b))
    coefficients = scheme.coefficients(knobs if knobs is not None else scheme.default_knobs())
    alpha = [float(a) for a in coefficients["alpha"]]
    beta = [float(b) for b in coefficients["beta"]]
    k = max(len(alpha), len(beta))
    rho_prime = k - sum(a * (k - 1 - j) for j, a in enumerate(alpha))
    return float(sum(beta) / rho_prime)


def learned_knobs(params: Mapping[str, Any], scheme: Scheme) -> dict[str, float]:
    """The integrator's scheme knobs `{name: value}` (one scalar each; empty without knobs)."""
    if not scheme.knobs:
        return {}
    (values,) = knob_values(params, scheme).values()
    return {name: float(np.asarray(v).reshape(-1)[0]) for name, v in values.items()}


# ------------------------------------------------------------------------------------------------
# ODE experiment


def context_for(schemes: Sequence[str], scheme_options: Mapping[str, Any], start: str) -> int:
    """The common rollout start index `c`: the longest past of the compared schemes ("data"
    start), or 0 (the schemes' own start rules)."""
    if start != "data":
        return 0
    return max(history_length(get_scheme(s, **dict(scheme_options.get(s, {})))) for s in schemes)


def _scheme_options(config: ml_collections.ConfigDict, scheme: str) -> dict[str, Any]:
    options = config.get("scheme_options", None)
    if options is None or scheme not in options:
        return {}
    value = options[scheme]
    return dict(value.to_dict() if hasattr(value, "to_dict") else value)


def _validate_common(config: ml_collections.ConfigDict) -> None:
    if config.experiment not in EXPERIMENTS:
        raise ValueError(f"config.experiment={config.experiment!r}; valid: {list(EXPERIMENTS)}")
    if not config.schemes:
        raise ValueError("config.schemes is empty; name at least one scheme (e.g. ('euler',))")
    for scheme in config.schemes:
        get_scheme(scheme, **_scheme_options(config, scheme))  # fails early on bad names/options
    if config.start not in START_MODES:
        raise ValueError(f"config.start={config.start!r}; valid: {list(START_MODES)}")
    if int(config.train_steps) < 1:
        raise ValueError(f"config.train_steps={config.train_steps}: must be >= 1")
    if int(config.train_horizon) < 1:
        raise ValueError(f"config.train_horizon={config.train_horizon}: must be >= 1")


def _relative_l2(prediction: np.ndarray, truth: np.ndarray) -> float:
    """||prediction - truth|| / ||truth|| over everything; inf when the prediction blew up."""
    if not np.all(np.isfinite(prediction)):
        return math.inf
    return float(np.linalg.norm(prediction - truth) / np.linalg.norm(truth))


def evaluate_integrator(
    model: ODEStage, variables: Mapping[str, Any], pairs: np.ndarray, trajectories: np.ndarray, context: int,
    rollout_steps: int, start: str,
) -> tuple[np.ndarray, np.ndarray]:
    """Teacher-forced one-step predictions `[n_pairs, d]` of `pairs[:, context + 1]` and rollouts
    `[n, rollout_steps, d]` from `trajectories[:, context]`, in one compiled program."""

    @jax.jit
    def both(variables, pairs, trajectories):
        one = predict(model, variables, pairs, context=context, horizon=1, start=start)[:, 0]
        return one, predict(model, variables, trajectories, context=context, horizon=rollout_steps, start=start)

    one, rollout = both(variables, jnp.asarray(pairs, jnp.float32), jnp.asarray(trajectories, jnp.float32))
    return np.asarray(one, np.float64), np.asarray(rollout, np.float64)


def run_ode(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Trains one integrator per scheme on the system's trajectories and evaluates it.

    Returns the results (also written to `results.json`): `rows` (one dict per scheme) and the
    data needed for the plots.
    """
    _validate_common(config)
    system_options = config.system_options.get(config.system, None)
    system = make_system(config.system, system_options.to_dict() if system_options is not None else {})
    dt = float(config.dt)
    context = context_for(config.schemes, {s: _scheme_options(config, s) for s in config.schemes}, config.start)
    horizon = int(config.train_horizon)
    train = system.generate(int(config.num_train), int(config.train_steps_per_trajectory), dt, int(config.data_seed))
    rollout_steps = int(config.rollout_steps)
    test = system.generate(int(config.num_test), context + rollout_steps, dt, int(config.data_seed) + 1)
    train_windows = make_windows(train, context + 1 + horizon)
    test_pairs = make_windows(test, context + 2)
    test_states = jnp.asarray(test[:, context:].reshape(-1, test.shape[-1]), jnp.float32)
    true_field = np.asarray(system.vector_field(np.asarray(test_states, np.float64)))
    truth = test[:, context + 1 :]
    true_invariant = np.asarray(system.invariant(truth))

    block = functools.partial(MLPField, hidden=tuple(int(w) for w in config.hidden), activation=config.activation)
    refine = int(config.get("refine", 0) or 0)
    if refine < 0:
        raise ValueError(f"config.refine={refine}: must be >= 0 (0 or 1 skips the refined rollout)")
    rows, curves = [], {}
    for scheme_name in config.schemes:
        options = _scheme_options(config, scheme_name)
        model = make_integrator(scheme_name, block, h=dt, scheme_options=options, start=config.start)
        scheme = get_scheme(model.scheme)
        result = train_integrator(
            model, train_windows, context=context, horizon=horizon, start=config.start,
            optimizer=config.optimizer, num_steps=int(config.train_steps), batch_size=int(config.batch_size),
            seed=int(config.seed), progress=bool(config.progress), description=f"{scheme_name}",
        )
        variables = {"params": result.state.params}
        one_step, rollout = evaluate_integrator(
            model, variables, test_pairs, test, context, rollout_steps, config.start
        )
        one_step_rmse = float(np.sqrt(np.mean((one_step - test_pairs[:, context + 1]) ** 2)))
        errors = np.linalg.norm(rollout - truth, axis=-1)  # [n_test, T]
        finite = bool(np.all(np.isfinite(rollout)))
        relative_l2 = _relative_l2(rollout, truth)
        with np.errstate(invalid="ignore", divide="ignore"):
            invariant = np.asarray(system.invariant(rollout))
        # nan when a prediction leaves the invariant's domain (Lotka-Volterra: a population <= 0)
        invariant_error = float(np.mean(np.max(np.abs(invariant - true_invariant), axis=1))) if finite else math.inf
        knobs = learned_knobs(result.state.params, scheme)
        scale = field_scale(scheme, knobs)
        field_params = result.state.params["tied_block"]["block"]  # ODEStage's layout when tied
        learned = np.asarray(block().apply({"params": field_params}, test_states), np.float64)
        field_error = float(np.linalg.norm(scale * learned - true_field) / np.linalg.norm(true_field))
        refined_l2, fine_errors = math.nan, None
        if refine > 1:
            # The same F with a smaller step: meaningful only if F is (close to) the true field.
            fine_start = "euler" if config.start == "data" else config.start
            fine_model = make_integrator(scheme_name, block, h=dt / refine, scheme_options=options, start=fine_start)
            fine = jax.jit(lambda v, w, model=fine_model: predict(
                model, v, w, context=context, horizon=refine * rollout_steps, start=fine_start))
            fine_rollout = np.asarray(fine(variables, jnp.asarray(test, jnp.float32)), np.float64)
            fine_rollout = fine_rollout[:, refine - 1 :: refine]  # at the data times
            refined_l2 = _relative_l2(fine_rollout, truth)
            fine_errors = np.linalg.norm(fine_rollout - truth, axis=-1)
        rows.append({
            "scheme": scheme_name,
            "order": scheme.order,
            "evals_per_step": scheme.evals_per_step,
            "knobs": knobs,
            "field_scale": scale,
            "train_loss": final_loss(result.losses),
            "one_step_rmse": one_step_rmse,
            "rollout_relative_l2": relative_l2,
            "rollout_final_error": float(np.mean(errors[:, -1])) if finite else math.inf,
            "invariant_error": invariant_error,
            "field_relative_error": field_error,
            "refined_rollout_relative_l2": refined_l2,
            "train_seconds": result.seconds,
            "ms_per_step": 1000 * (result.seconds - result.seconds_first_step) / max(1, len(result.losses) - 1),
        })
        curves[scheme_name] = {
            "losses": result.losses,
            "rollout": rollout,
            "errors": errors,
            "invariant": invariant,
            "fine_errors": fine_errors,
        }
    return {
        "system": system,
        "context": context,
        "rows": rows,
        "curves": curves,
        "test": test,
        "true_invariant": true_invariant,
    }


def plot_ode(results: Mapping[str, Any], config: ml_collections.ConfigDict, plots: pathlib.Path) -> list[str]:
    """Writes the ODE plots; returns their file names."""
    system: System = results["system"]
    test, context, curves = results["test"], results["context"], results["curves"]
    dt = float(config.dt)
    schemes = list(curves)
    times = dt * np.arange(test.shape[1])
    rollout_times = times[context + 1 :]
    columns = min(4, len(schemes))
    rows_ = math.ceil(len(schemes) / columns)
    names = []
    # The widest-swinging test trajectory for the time plot; for the phase plot a spread of sizes.
    amplitude = np.ptp(test[:, :, 0], axis=1)
    example = int(np.argmax(amplitude))
    by_size = np.argsort(amplitude)
    shown = by_size[np.unique(np.linspace(0, len(by_size) - 1, min(4, len(by_size))).round().astype(int))]

    # Trajectories of the first test trajectory: every state component, learned vs true.
    fig, axes = plt.subplots(rows_, columns, figsize=(4 * columns, 3 * rows_), squeeze=False)
    for ax, scheme in zip(axes.flat, schemes):
        for j, (state_name, colour) in enumerate(zip(system.state_names, ("C0", "C1"))):
            ax.plot(times, test[example, :, j], color=colour, lw=1.5, label=f"{state_name} true")
            ax.plot(rollout_times, curves[scheme]["rollout"][example, :, j], color=colour, ls="--", lw=1.2,
                    label=f"{state_name} learned")
        ax.set_title(scheme)
        ax.set_xlabel("t")
    for ax in list(axes.flat)[len(schemes):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"{system.name}: rollout of the learned integrator from the true start (dashed) vs truth")
    fig.tight_layout()
    fig.savefig(plots / "trajectories.png", dpi=110)
    plt.close(fig)
    names.append("trajectories.png")

    # Phase portraits: a few test trajectories, learned vs true.
    fig, axes = plt.subplots(rows_, columns, figsize=(3.6 * columns, 3.4 * rows_), squeeze=False)
    for ax, scheme in zip(axes.flat, schemes):
        for colour, i in enumerate(shown):
            ax.plot(test[i, :, 0], test[i, :, 1], color="0.6", lw=2.5)
            ax.plot(curves[scheme]["rollout"][i, :, 0], curves[scheme]["rollout"][i, :, 1], color=f"C{colour}", lw=1)
        ax.set_title(scheme)
        ax.set_xlabel(system.state_names[0])
        ax.set_ylabel(system.state_names[1])
    for ax in list(axes.flat)[len(schemes):]:
        ax.axis("off")
    fig.suptitle(f"{system.name}: phase portraits, truth (grey) vs learned (colour)")
    fig.tight_layout()
    fig.savefig(plots / "phase_portraits.png", dpi=110)
    plt.close(fig)
    names.append("phase_portraits.png")

    # Error growth and invariant error over the rollout (and with the learned F at a smaller step).
    refined = all(curves[s]["fine_errors"] is not None for s in schemes)
    fig, axes = plt.subplots(1, 3 if refined else 2, figsize=(16.5 if refined else 11, 4))
    ax_err, ax_inv = axes[0], axes[1]
    for scheme in schemes:
        ax_err.semilogy(rollout_times, curves[scheme]["errors"].mean(axis=0), label=scheme)
        inv = np.abs(curves[scheme]["invariant"] - results["true_invariant"]).mean(axis=0)
        ax_inv.semilogy(rollout_times, inv, label=scheme)
        if refined:
            axes[2].semilogy(rollout_times, curves[scheme]["fine_errors"].mean(axis=0), label=scheme)
    if refined:
        axes[2].set_xlabel("t")
        axes[2].set_ylabel("|x_pred - x_true| (mean)")
        axes[2].set_title(f"learned F reused with h = dt/{config.refine}")
        axes[2].grid(alpha=0.3)
        axes[2].legend(fontsize=7)
    ax_err.set_xlabel("t")
    ax_err.set_ylabel("|x_pred - x_true| (mean over test trajectories)")
    ax_err.set_title("rollout error")
    ax_inv.set_xlabel("t")
    ax_inv.set_ylabel(f"|{system.invariant_name}_pred - {system.invariant_name}_true| (mean)")
    ax_inv.set_title(f"{system.invariant_name} error")
    for ax in (ax_err, ax_inv):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(plots / "rollout_error.png", dpi=110)
    plt.close(fig)
    names.append("rollout_error.png")

    names.append(_plot_losses({s: curves[s]["losses"] for s in schemes}, plots / "training_loss.png"))
    return names


def _plot_losses(losses: Mapping[str, np.ndarray], path: pathlib.Path) -> str:
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, values in losses.items():
        ax.semilogy(np.arange(1, len(values) + 1), values, lw=1, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (MSE of predicted states)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


# ------------------------------------------------------------------------------------------------
# PDE experiment


def heat_spacing(grid_size: int, boundary: str) -> float:
    """Grid spacing of `cnn.data.synthetic.heat_equation`: `1/G` periodic, `1/(G+1)` Dirichlet."""
    synthetic.heat_grid(grid_size, boundary)  # validates boundary
    return 1.0 / grid_size if boundary == "periodic" else 1.0 / (grid_size + 1)


def laplacian_stencil(grid_size: int, boundary: str, diffusivity: float, dt: float) -> np.ndarray:
    """`diffusivity * dt / dx^2 * [[0,1,0],[1,-4,1],[0,1,0]]`, the kernel of one explicit step."""
    ratio = diffusivity * dt / heat_spacing(grid_size, boundary) ** 2
    return ratio * np.array([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])


def heat_data(pde: ml_collections.ConfigDict, initial: str, num_samples: int, seed: int) -> tuple[np.ndarray, float]:
    """Snapshots `[n, num_steps+1, G, G, 1]` taken every `dt = courant * dx^2 / kappa`, one
    explicit step apart, and `dt`.

    Raises:
      ValueError: `courant` outside (0, 0.225] (then the generator would take several internal
        steps per snapshot and the stencil would not be the exact answer) or unknown `initial`.
    """
    grid_size, boundary, kappa = int(pde.grid_size), str(pde.boundary), float(pde.diffusivity)
    courant = float(pde.courant)
    if not 0 < courant <= 0.225:
        raise ValueError(
            f"pde.courant={courant}: must be in (0, 0.225] so that each snapshot is exactly one explicit step "
            "(the generator splits steps above 0.9 x the stability limit 0.25)"
        )
    if initial not in INITIAL_FIELDS:
        raise ValueError(f"initial fields {initial!r}; valid: {list(INITIAL_FIELDS)}")
    dt = courant * heat_spacing(grid_size, boundary) ** 2 / kappa
    if initial == "white_noise":
        fields = np.random.default_rng(seed).normal(size=(num_samples, grid_size, grid_size))
    else:
        fields = synthetic.random_heat_fields(num_samples, grid_size, boundary, seed=seed)
    data = synthetic.heat_equation(
        num_samples, int(pde.num_steps), dt, grid_size=grid_size, diffusivity=kappa, boundary=boundary,
        initial_fields=fields,
    )
    if not math.isclose(data["internal_dt"], dt, rel_tol=1e-12):  # one internal step per snapshot
        raise AssertionError(f"heat_equation took internal steps of {data['internal_dt']} for dt={dt}")
    return data["fields"], dt


def kernel_moments(kernel: np.ndarray) -> dict[str, float]:
    """Sum and second moments of a 3x3 kernel (offsets -1, 0, 1). The stencil `r L` has sum 0,
    second moments `2r` along each axis and 0 mixed: what a field varying slowly on the grid sees."""
    offsets = np.array([-1.0, 0.0, 1.0])
    rows, cols = np.meshgrid(offsets, offsets, indexing="ij")
    return {
        "sum": float(kernel.sum()),
        "second_moment_rows": float((kernel * rows**2).sum()),
        "second_moment_cols": float((kernel * cols**2).sum()),
        "mixed_moment": float((kernel * rows * cols).sum()),
    }


def shifted_copies(fields: np.ndarray, boundary: str) -> np.ndarray:
    """The design matrix of a 3x3 cross-correlation: column `3a + b` holds `u[i+a-1, j+b-1]` (padded
    like `StencilConv`) for every pixel. `fields: [n, H, W]` -> `[n * H * W, 9]`, so that
    `(K * u).ravel() == shifted_copies(u) @ K.ravel()`."""
    mode = "wrap" if boundary == "periodic" else "constant"
    padded = np.pad(fields, ((0, 0), (1, 1), (1, 1)), mode=mode)
    height, width = fields.shape[1:]
    columns = [padded[:, a : a + height, b : b + width].ravel() for a in range(3) for b in range(3)]
    return np.stack(columns, axis=1)


def least_squares_stencil(fields: np.ndarray, boundary: str) -> tuple[np.ndarray, float]:
    """Forward Euler's kernel fitted in closed form (float64 `lstsq`) to snapshots `[n, T+1, H, W, 1]`,
    and the condition number of the loss's Hessian `A^T A` (A = `shifted_copies`), which sets how
    fast gradient descent resolves all nine entries."""
    design = shifted_copies(fields[:, :-1, ..., 0].reshape((-1,) + fields.shape[2:4]), boundary)
    increments = (fields[:, 1:] - fields[:, :-1])[..., 0].ravel()
    kernel, *_ = np.linalg.lstsq(design, increments, rcond=None)
    return kernel.reshape(3, 3), float(np.linalg.cond(design) ** 2)


def run_pde(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Fits a 3x3 kernel per (scheme, initial-field kind) and compares it with the stencil."""
    _validate_common(config)
    pde = config.pde
    rows, extras, analysis = [], {}, {}
    if config.start != "data" or int(config.train_horizon) != 1:
        raise ValueError("the PDE experiment fits one-step pairs: use config.start='data', config.train_horizon=1")
    for initial in pde.initial_fields:
        train, dt = heat_data(pde, initial, int(pde.num_train), int(config.data_seed))
        test, _ = heat_data(pde, initial, int(pde.num_test), int(config.data_seed) + 1)
        target = laplacian_stencil(int(pde.grid_size), str(pde.boundary), float(pde.diffusivity), dt)
        pairs = make_windows(train, 2)
        test_pairs = make_windows(test, 2)
        block = functools.partial(StencilConv, boundary=str(pde.boundary))
        optimum, condition = least_squares_stencil(train, str(pde.boundary))
        analysis[initial] = {"lstsq_distance": float(np.max(np.abs(optimum - target))), "hessian_condition": condition}
        for scheme_name in config.schemes:
            model = make_integrator(scheme_name, block, h=1.0, scheme_options=_scheme_options(config, scheme_name))
            if history_length(model.scheme):
                raise ValueError(f"scheme {scheme_name!r} keeps a past; the PDE experiment fits one-step schemes only")
            result = train_integrator(
                model, pairs, context=0, horizon=1, start="data", optimizer=config.optimizer,
                num_steps=int(config.train_steps), batch_size=int(config.batch_size), seed=int(config.seed),
                progress=bool(config.progress), description=f"{scheme_name}/{initial}",
            )
            variables = {"params": result.state.params}
            kernel = result.state.params["tied_block"]["block"]["stencil"]["kernel"]  # [3, 3, 1, 1]
            kernel = np.asarray(kernel[:, :, 0, 0], np.float64)
            distance = float(np.max(np.abs(kernel - target)))
            steps = test.shape[1] - 1
            one_step, rollout = evaluate_integrator(model, variables, test_pairs, test, 0, steps, "data")
            increment = test_pairs[:, 1] - test_pairs[:, 0]
            one_step_error = float(np.linalg.norm(one_step - test_pairs[:, 1]) / np.linalg.norm(increment))
            rollout_error = float(np.linalg.norm(rollout - test[:, 1:]) / np.linalg.norm(test[:, 1:] - test[:, :1]))
            key = f"{scheme_name}/{initial}"
            rows.append({
                "scheme": scheme_name,
                "initial_fields": initial,
                "kernel": kernel.tolist(),
                "target": target.tolist(),
                "max_abs_distance": distance,
                "relative_distance": distance / float(np.max(np.abs(target))),
                "moments": kernel_moments(kernel),
                "one_step_error": one_step_error,
                "rollout_error": rollout_error,
                "train_loss": final_loss(result.losses),
                "train_seconds": result.seconds,
            })
            extras[key] = {"losses": result.losses, "rollout": rollout, "test": test}
    return {"rows": rows, "curves": extras, "target": target, "dt": dt, "analysis": analysis}


def pde_notes(results: Mapping[str, Any], config: ml_collections.ConfigDict) -> list[str]:
    """What the PDE table shows, from its own numbers."""
    r = float(np.asarray(results["target"])[0, 1])
    notes = []
    for initial, facts in results["analysis"].items():
        euler = [row for row in results["rows"] if row["scheme"] == "euler" and row["initial_fields"] == initial]
        learned = f"; forward Euler learned a kernel {euler[0]['max_abs_distance']:.1e} from it" if euler else ""
        notes.append(
            f"{initial} fields: the float64 least-squares optimum of forward Euler's problem is "
            f"{facts['lstsq_distance']:.1e} from the stencil (the data are one explicit step: the stencil is the "
            f"exact answer){learned}. Condition number of the loss's Hessian A^T A: {facts['hessian_condition']:.1e}."
        )
    if "white_noise" in results["analysis"]:
        notes.append(
            "White-noise fields excite every grid frequency, so the nine entries are equally well determined "
            "(condition number of order 1) and gradient descent reaches float32 rounding in a few hundred steps."
        )
    if "smooth" in results["analysis"]:
        notes.append(
            "Smooth fields (the generator's low Fourier modes) probe the kernel's symbol only at low frequencies, "
            "where it is governed by the kernel's sum and second moments (0 and 2r for the stencil); combinations "
            "of entries that differ only at high frequencies barely change the loss. The optimum is still the "
            "stencil, but with that condition number the same optimizer budget does not reach it (the table's "
            "moments and errors show how far it got)."
        )
    if any(row["scheme"] != "euler" for row in results["rows"]):
        notes.append(
            "Other schemes fit a kernel whose own step matches the data, not the stencil. Midpoint/RK2 steps "
            "u + K*u + K*(K*u)/2, a 5x5 operator with Fourier multiplier R = 1 + k + k^2/2 = ((1 + k)^2 + 1)/2 "
            "(k the kernel's symbol, real for a centrally symmetric kernel), so R >= 1/2 at every frequency; the "
            f"data multiply the most oscillating grid mode by 1 - 8r = {1 - 8 * r:+.2f}. No RK2 step with a "
            "symmetric 3x3 kernel reproduces that: on white noise the fit compromises (possibly with an asymmetric "
            "kernel, whose complex symbol lets R reach further) and its error stays large. "
            "On smooth data the needed multipliers are near 1, where an RK2 step can match them with "
            "K ~ rL - (rL)^2/2 (projected onto 3x3), but the conditioning problem above applies as well."
        )
    return notes


def plot_pde(results: Mapping[str, Any], plots: pathlib.Path) -> list[str]:
    """Learned kernels next to the stencil, a rollout of the first row's model, loss curves."""
    rows, target = results["rows"], np.asarray(results["target"])
    panels = [("stencil  r·[[0,1,0],[1,-4,1],[0,1,0]]", target)] + [
        (f"{r['scheme']} / {r['initial_fields']}\nmax|K - stencil| = {r['max_abs_distance']:.2e}",
         np.asarray(r["kernel"]))
        for r in rows
    ]
    limit = float(np.max(np.abs(target)))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4), squeeze=False)
    for ax, (title, kernel) in zip(axes[0], panels):
        ax.imshow(kernel, cmap="RdBu_r", vmin=-limit, vmax=limit)
        for (i, j), value in np.ndenumerate(kernel):
            ax.text(j, i, f"{value:.4f}", ha="center", va="center", fontsize=8,
                    color="white" if abs(value) > 0.6 * limit else "black")
        ax.set_title(title, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("learned 3x3 kernels vs the scaled Laplacian stencil")
    fig.tight_layout()
    fig.savefig(plots / "kernels.png", dpi=110)
    plt.close(fig)
    names = ["kernels.png"]

    first = rows[0]
    curve = results["curves"][f"{first['scheme']}/{first['initial_fields']}"]
    test, rollout = curve["test"][0, 1:, :, :, 0], curve["rollout"][0, :, :, :, 0]
    shown = sorted({0, len(test) // 2, len(test) - 1})
    fig, axes = plt.subplots(3, len(shown), figsize=(3 * len(shown), 8.4), squeeze=False)
    for column, t in enumerate(shown):
        scale = float(np.max(np.abs(test[t])))
        for row_index, (label, image) in enumerate((("true", test[t]), ("learned", rollout[t]),
                                                    ("learned - true", rollout[t] - test[t]))):
            ax = axes[row_index, column]
            shown_image = ax.imshow(image, cmap="RdBu_r", vmin=-scale if row_index < 2 else None,
                                    vmax=scale if row_index < 2 else None)
            ax.set_title(f"{label}, step {t + 1}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
            if row_index == 2:
                fig.colorbar(shown_image, ax=ax, fraction=0.046)
    fig.suptitle(f"heat equation rollout ({first['scheme']}, {first['initial_fields']} fields)")
    fig.tight_layout()
    fig.savefig(plots / "heat_rollout.png", dpi=110)
    plt.close(fig)
    names.append("heat_rollout.png")
    names.append(_plot_losses({k: v["losses"] for k, v in results["curves"].items()}, plots / "training_loss.png"))
    return names


# ------------------------------------------------------------------------------------------------
# Report


def _start_states(context: int) -> str:
    return "x_0" if context == 0 else f"x_0..x_{context}"


def _fmt(value: float, digits: int = 3) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return "diverged" if value == math.inf else "undefined"
    return f"{value:.{digits}e}"


def _listing(rows: Sequence[Mapping[str, Any]], key: str) -> str:
    return ", ".join(f"{r['scheme']} {_fmt(r[key], 1)}" for r in sorted(rows, key=lambda r: r[key]))


def ode_notes(results: Mapping[str, Any], config: ml_collections.ConfigDict) -> list[str]:
    """What the ODE table shows, from its own numbers (sorted lists, no verdict written in advance)."""
    rows = results["rows"]
    notes = [
        f"Rollout rel. L2 over {config.rollout_steps} steps, best first: {_listing(rows, 'rollout_relative_l2')}. "
        f"One-step RMSE: {_listing(rows, 'one_step_rmse')}.",
        f"Field rel. error, best first: {_listing(rows, 'field_relative_error')}.",
    ]
    if int(config.get("refine", 0) or 0) > 1:
        notes.append(f"Rollout rel. L2 with the learned F at h = dt/{config.refine}, best first: "
                     f"{_listing(rows, 'refined_rollout_relative_l2')}.")
    return notes


def ode_table(results: Mapping[str, Any], config: ml_collections.ConfigDict) -> tuple[list[str], list[list[Any]]]:
    """Header and rows of the ODE results table."""
    system: System = results["system"]
    header = ["scheme", "order", "F evals / step", "learned knobs", "one-step RMSE",
              f"rollout rel. L2 ({config.rollout_steps} steps)", "final-time error",
              f"max {system.invariant_name} error", "field rel. error"]
    refine = int(config.get("refine", 0) or 0)
    if refine > 1:
        header.append(f"rollout rel. L2, h = dt/{refine}")
    header += ["train loss", "train s"]
    rows = []
    for r in results["rows"]:
        knobs = ", ".join(f"{k}={v:+.3f}" for k, v in r["knobs"].items()) or "-"
        rows.append([r["scheme"], r["order"], r["evals_per_step"], knobs, _fmt(r["one_step_rmse"]),
                     _fmt(r["rollout_relative_l2"]), _fmt(r["rollout_final_error"]), _fmt(r["invariant_error"]),
                     _fmt(r["field_relative_error"])]
                    + ([_fmt(r["refined_rollout_relative_l2"])] if refine > 1 else [])
                    + [_fmt(r["train_loss"]), f"{r['train_seconds']:.1f}"])
    return header, rows


def pde_table(results: Mapping[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """Header and rows of the PDE results table."""
    header = ["scheme", "initial fields", "max abs(K - stencil)", "relative", "sum K", "2nd moments (rows, cols)",
              "one-step err / increment", "rollout err / change", "train loss", "train s"]
    rows = []
    for r in results["rows"]:
        m = r["moments"]
        rows.append([r["scheme"], r["initial_fields"], _fmt(r["max_abs_distance"]), _fmt(r["relative_distance"]),
                     f"{m['sum']:+.2e}", f"{m['second_moment_rows']:.4f}, {m['second_moment_cols']:.4f}",
                     _fmt(r["one_step_error"]), _fmt(r["rollout_error"]), _fmt(r["train_loss"]),
                     f"{r['train_seconds']:.1f}"])
    return header, rows


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Mapping):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def write_report(
    config: ml_collections.ConfigDict, results: Mapping[str, Any], workdir: pathlib.Path, command: str, seconds: float
) -> pathlib.Path:
    """Writes results.md, results.csv, results.json and plots/; returns the path of results.md."""
    plots = workdir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    machine = grid.hardware()
    head = [f"- command: `{command}`", f"- machine: {machine}; total {seconds:.0f} s"]
    if config.experiment == "ode":
        system: System = results["system"]
        header, rows = ode_table(results, config)
        names = plot_ode(results, config, plots)
        options = ", ".join(f"{k}={v}" for k, v in sorted(system.options.items()))
        body = [
            f"# Learned integrators: {system.name}",
            "",
            f"- data: {config.num_train} training trajectories of {config.train_steps_per_trajectory} steps, "
            f"{config.num_test} test trajectories; dt = {config.dt:g} (= the scheme's step h); {options}",
            f"- model: residual MLP F(x) hidden {tuple(config.hidden)} ({config.activation}), one field shared over "
            f"time (tied); targets: {config.train_horizon}-step windows, start `{config.start}` "
            f"(rollouts start from the true {_start_states(results['context'])}); {config.train_steps} steps of "
            f"{config.optimizer.name} lr {config.optimizer.learning_rate:g} ({config.optimizer.schedule}), batch "
            f"{config.batch_size}, seed {config.seed}",
            *head,
            "",
            grid.markdown_table(header, rows),
            "",
            "Train loss: mean over the last 5% of steps. "
            f"One-step RMSE: teacher-forced prediction of the next state on the test trajectories. Rollout: "
            f"{config.rollout_steps} steps ({config.rollout_steps * config.dt:g} time units) on the model's own "
            "predictions; relative L2 = ||X_pred - X_true|| / ||X_true|| over all test trajectories and times; "
            "final-time error = mean |x_pred - x_true| at the last step; "
            f"max {system.invariant_name} error = mean over trajectories of the largest |{system.invariant_name}"
            f"(x_pred) - {system.invariant_name}(x_true)| along the rollout (undefined: a prediction left its "
            "domain, e.g. a population <= 0); diverged: the rollout overflowed. Field rel. error = ||c F_theta - f|| / "
            "||f|| on the test states, where c = sigma(1)/rho'(1) makes the scheme a consistent discretization "
            "of x' = c F (1 for all but LM-ResNet, where c = 1/(1+k)): how close the learned residual function "
            "is to the true vector field. A scheme fitted to exact samples learns the field whose step "
            "reproduces the flow map; that field differs from f by O(h^order) (for Euler F = f + h/2 f'f + ...), "
            "so the field error is that plus the fit's own error."
            + (f" Rollout at h = dt/{config.refine}: the learned F reused with a {config.refine}x smaller step "
               f"({config.refine} x {config.rollout_steps} steps, multistep schemes start with the Euler step, "
               "compared at the data times): it stays accurate only if F is close to the true field."
               if int(config.get("refine", 0) or 0) > 1 else ""),
            "",
            "## What it shows",
            "",
            *[f"- {note}" for note in ode_notes(results, config)],
        ]
        csv_header, csv_rows = header, rows
    else:
        header, rows = pde_table(results)
        names = plot_pde(results, plots)
        pde = config.pde
        target = np.asarray(results["target"])
        body = [
            "# Learned stencil: 2-D heat equation",
            "",
            f"- data: grid {pde.grid_size}x{pde.grid_size} ({pde.boundary}), kappa = {pde.diffusivity:g}, "
            f"snapshots every dt = {results['dt']:.6g} = {pde.courant:g} dx^2 / kappa (one explicit 5-point step); "
            f"{pde.num_train} training fields x {pde.num_steps} steps, {pde.num_test} test fields",
            f"- model: u_(t+1) = step(u_t) with F = one 3x3 conv kernel (no bias, one channel), h = 1; "
            f"{config.train_steps} steps of {config.optimizer.name} lr {config.optimizer.learning_rate:g} "
            f"({config.optimizer.schedule}), batch {config.batch_size}, seed {config.seed}",
            f"- target stencil r·[[0,1,0],[1,-4,1],[0,1,0]] with r = kappa dt / dx^2 = {target[0, 1]:.6g}",
            *head,
            "",
            grid.markdown_table(header, rows),
            "",
            "max abs(K - stencil) is the largest entry-wise distance of the learned kernel to the stencil, relative = "
            "divided by the largest stencil entry (4r). Errors: one-step ||u_pred - u_true|| / ||u_true - u_t||, "
            "rollout over all test steps relative to ||u_t - u_0||. Train loss: mean over the last 5% of steps.",
            "",
            "## What it shows",
            "",
            *[f"- {note}" for note in pde_notes(results, config)],
        ]
        csv_header, csv_rows = header, rows
    body += ["", "## Plots", ""] + [f"![{n}](plots/{n})" for n in names] + [""]
    report = workdir / "results.md"
    report.write_text("\n".join(body))
    grid.write_csv(workdir / "results.csv", csv_header, csv_rows)
    serializable = {"experiment": config.experiment, "rows": results["rows"], "command": command,
                    "machine": machine, "seconds": seconds}
    (workdir / "results.json").write_text(json.dumps(_jsonable(serializable), indent=2) + "\n")
    return report


def run(config: ml_collections.ConfigDict, workdir: str | os.PathLike, command: str = "") -> pathlib.Path:
    """Runs the experiment named by `config.experiment` and writes the report; returns results.md."""
    workdir = pathlib.Path(workdir)
    if config.get("experiment") not in EXPERIMENTS:
        raise ValueError(f"config.experiment={config.get('experiment')!r}; valid: {list(EXPERIMENTS)}")
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
    started = time.perf_counter()
    results = run_ode(config) if config.experiment == "ode" else run_pde(config)
    seconds = time.perf_counter() - started
    return write_report(config, results, workdir, command or "python -m experiments.dynamics", seconds)


def main(argv: Sequence[str]) -> None:
    # One training per scheme, nothing compiled twice: no compilation cache.
    grid.cli_main(argv, "experiments/configs/dynamics_ode.py", run, "experiments.dynamics", compilation_cache=False)


if __name__ == "__main__":
    main(sys.argv)
