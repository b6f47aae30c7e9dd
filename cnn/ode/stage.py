"""`ODEStage`: one residual stage of a network, stepped by any `Scheme`, under `nn.scan`.

A stage is a stack of residual functions `F_0, ..., F_{N-1}` (Flax modules that compute only
the residual branch, `[batch, height, width, channels] -> same`) and a scheme that turns them
into the update `x_t -> x_{t+1}` (`Scheme.step`, the same code `cnn.ode.analysis` validates).
Optionally block 0 changes shape (`entry_block` with stride / more channels, plus
`entry_shortcut` S mapping `x_0` to the new shape).

    stage = ODEStage(
        scheme=get_scheme("lm"),
        block=functools.partial(MyResidual, features=32),                 # F_1 .. F_{N-1}
        entry_block=functools.partial(MyResidual, features=32, strides=2),
        entry_shortcut=functools.partial(MyProjection, features=32, strides=2),
        num_blocks=N,
    )
    y, history = stage(x, history=None, train=True)

BatchNorm inside `F`: a scheme that evaluates `F` several times per step (Runge-Kutta stages,
implicit sweeps) calls the same BatchNorm layers on each evaluation's input. In training each
call normalizes with its own batch statistics; one running average would mix all calls, and
eval-mode accuracy of such schemes fell far below their training accuracy (measured:
experiments/RESULTS.md, section 2b). So the stage numbers the evaluations of each step and
passes `evaluation=k` to blocks that take it, whose `cnn.ode.EvaluationBatchNorm`s keep running
statistics per evaluation (`StageOptions.per_evaluation_stats`). Single-evaluation schemes are
unaffected.

Options. What a network passes through to every stage unchanged is one `StageOptions` value
(`ODEStage(..., options=StageOptions(tied=True))`; a ResNet family carries it as its `stage`
field): `tied`, `scan`, `remat`, `start`, `history_at_entry`, `per_evaluation_stats`, each
documented on its field. The stage's own fields, which a network sets per stage:
- `takes_history`: False declares that the stage is always called without a history (a
  network's first stage): its block 0 always takes the start step, so (with `start="euler"`)
  no knob is created for it, and passing a history raises.
- `drop_path_rates`: stochastic depth, one drop probability per block. In training each
  sample's `F_t` is replaced by `mask / (1 - rate) * F_t` with `mask ~ Bernoulli(1 - rate)`
  (rng stream "dropout"), so e.g. LM-ResNet becomes `x_{t+1} = (1-k) x_t + k x_{t-1} + h m F`.
- `step_activation`: applied to each step's result (`nn.relu` gives He et al.'s original
  post-activation ResNet, `x_{t+1} = relu(x_t + F(x_t))`); None is the pure scheme.

Implicit steps (backward Euler): `Scheme.step` sweeps to the scheme's `tolerance` (at most
`iterations` sweeps, masked after convergence, so the step stays jit-able and
reverse-differentiable). With `gradient="implicit"` the sweeps are not differentiated: the last
sweep `K = F(z)` is, with its cotangent `g` replaced by the solution of `w = g + h (dF/dz)^T w`
at `z` (fixed-point iteration, at most `iterations` sweeps, to the same tolerance): the
implicit-function-theorem gradient of the fixed point, as in deep-equilibrium models.

Diagnostics are sown into the collection `"ode_diagnostics"` (`DIAGNOSTICS`; apply with
`mutable=[DIAGNOSTICS]` to read them, otherwise they cost nothing): per step `evaluations`
(`arange(number of F calls)`, counted as the network calls `F`) and, for implicit steps,
`implicit_residual` and `implicit_sweeps`. `count_f_evaluations(model, input_shape)` and
`implicit_solve_stats(model, variables, x)` read them; `implicit_scheme_label` names a scheme
with the solve it actually did ("backward_euler, 2 sweeps, residual 0.31").

Parameter tree of a stage: `entry/{block,shortcut}` (when there is an entry block), `blocks`
(scanned, leading axis = number of identical blocks), or `blocks_{i}` (unrolled), or `tied_block`
(tied), and `knobs/<name>` when the scheme has learnable knobs: one scalar per block that can
use it, `[num_blocks - 1]` when block 0 always takes the start step (an entry block with
`history_at_entry="restart"`, or `takes_history=False`; with `start="euler"`), else
`[num_blocks]`. A stage without an entry block keeps block 0's knob because a history may be
passed to it; when none is (a network's first stage with `takes_history=True`) that knob's
gradient is 0. `fit_knob_layout` converts parameter trees saved with a knob for every block.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import itertools
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cnn.ode.schemes import START_MODES, History, Scheme, get_scheme

ModuleDef = Any
HISTORY_MODES = ("restart", "project")
DIAGNOSTICS = "ode_diagnostics"  # collection of the per-step diagnostics (module docstring)


def linear_drop_path_rates(num_blocks: int, final_survival: float) -> tuple[float, ...]:
    """Stochastic-depth drop rates with survival probability linear in depth (Huang et al. 2016).

    Block `l = 1..L` survives with probability `p_l = 1 - l/L * (1 - final_survival)`; returns
    the drop rates `1 - p_l` (so the last block has `1 - final_survival`).
    """
    if num_blocks < 1:
        raise ValueError(f"num_blocks={num_blocks}: must be >= 1")
    if not 0.0 < final_survival <= 1.0:
        raise ValueError(f"final_survival={final_survival}: must be in (0, 1]")
    return tuple(float(l / num_blocks * (1.0 - final_survival)) for l in range(1, num_blocks + 1))


@dataclasses.dataclass(frozen=True)
class StageOptions:
    """The `ODEStage` options a network passes through to every stage unchanged (hashable, so it
    can be a Flax module field). Defaults: the LM-ResNet reference code's ("euler", "restart").

    A network family carries one `stage: StageOptions` field; its factory also takes the fields
    as flat keywords (`scan=False`) and folds them in (`fold_stage_options`).

    Raises:
      ValueError: at construction, a field has a value it cannot take (`validate`).
    """

    tied: bool = False
    """Share the residual function's weights over the identical blocks (a time-invariant ODE;
    depth N with `h = T/N` approximates the flow to time T). BatchNorm statistics are then shared
    too, so `F` is the same function at every step (in training they are carried through the
    scan, so they must keep their dtype: flax stores them in float32, which suits float32 and
    bfloat16 compute but not float64 compute with float32 statistics). With an entry block,
    block 0 keeps its own weights."""

    scan: bool = True
    """True runs the identical blocks under `nn.scan` (compile time independent of depth); False
    unrolls them into modules `blocks_0 .. blocks_{M-1}` with identical results. Convert
    parameters between the layouts with `stack_unrolled` / `unstack_scanned`."""

    remat: bool = False
    """Recompute each step's activations in the backward pass (less memory, more compute)."""

    start: str = "euler"
    """How the first step of a multistep scheme is taken, one of `START_MODES` ("euler" |
    "copy"; see `cnn.ode.schemes`); it applies to block 0 when the stage receives no history."""

    history_at_entry: str = "restart"
    """One of `HISTORY_MODES`. At a shape-changing block 0, "restart" discards the incoming
    history and takes the start step `x_1 = S(x_0) + h F_0(x_0)` (the history becomes
    `(S(x_0), F_0(x_0))`); "project" maps the incoming past into the new shape and applies the
    scheme's own formula: past states through `S` itself, past derivatives (tangent vectors)
    through the linear part of `S`, its differential at `x_0` -- for an affine `S` (option A's
    subsample-and-pad, a 1x1 conv, conv + BatchNorm in eval mode) exactly `S` without its bias;
    in training mode a BatchNorm's batch statistics make `S` non-linear and the differential is
    taken at the current batch. These extra calls of `S` update no BatchNorm statistics (only
    `S(x_0)` does, once). Runge-Kutta schemes always take the Euler step at a transition.
    "restart" with `start="euler"` is what the LM-ResNet reference code does
    (`cnn.ode.schemes.lm`). A stage without an entry block continues the history it is given in
    both modes."""

    per_evaluation_stats: bool = True
    """Schemes that evaluate `F` several times per step (Runge-Kutta stages, implicit sweeps)
    number those evaluations `0, 1, ...` and pass `evaluation=k` to blocks whose `__call__` takes
    it; their `cnn.ode.EvaluationBatchNorm`s then keep running statistics per evaluation
    (`batch_stats/.../eval{k}/{mean,var}` for k >= 1), sharing scale and bias. A single shared
    average mixes differently distributed inputs and spoils eval mode (see `cnn.ode.norm`).
    False restores shared statistics; one-evaluation schemes are unaffected."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raises ValueError naming the first field whose value is not one it can take."""
        for name in ("tied", "scan", "remat", "per_evaluation_stats"):
            value = getattr(self, name)
            if not isinstance(value, (bool, np.bool_)):
                raise ValueError(f"{name}={value!r}: must be True or False")
        if self.start not in START_MODES:
            raise ValueError(f"start={self.start!r}: must be one of {START_MODES}")
        if self.history_at_entry not in HISTORY_MODES:
            raise ValueError(f"history_at_entry={self.history_at_entry!r}: must be one of {HISTORY_MODES}")

    @classmethod
    def from_value(cls, value: StageOptions | Mapping[str, Any] | None) -> StageOptions:
        """`value` as `StageOptions`: itself, the defaults for None, or built from a mapping
        (e.g. a config's `{"scan": False}`); raises ValueError naming unknown keys."""
        if value is None or isinstance(value, cls):
            return cls() if value is None else value
        if not isinstance(value, Mapping):
            raise ValueError(
                f"stage={value!r}: expected a StageOptions, a mapping of its fields "
                f"({', '.join(STAGE_OPTIONS)}) or None"
            )
        unknown = sorted(set(value) - set(STAGE_OPTIONS))
        if unknown:
            raise ValueError(
                f"stage={dict(value)!r}: unknown option(s) {unknown}; StageOptions takes {list(STAGE_OPTIONS)}"
            )
        return cls(**value)


STAGE_OPTIONS = tuple(field.name for field in dataclasses.fields(StageOptions))  # the flat keyword names


def fold_stage_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """A network factory's keywords with the stage options folded into one `stage` entry.

    `options` may hold the `StageOptions` fields as flat keywords (`scan=False`, as configs and
    callers pass them) and/or `stage` (a `StageOptions`, a mapping of its fields, or None). The
    result holds every other keyword unchanged plus `stage: StageOptions` (flat keywords
    override the defaults or fill the keys a `stage` mapping leaves out).

    Raises:
      ValueError: an option is given both flat and in `stage` (a `StageOptions` value sets every
        option), or `stage` is not a valid `StageOptions` / mapping.
    """
    rest = {name: value for name, value in options.items() if name != "stage" and name not in STAGE_OPTIONS}
    flat = {name: options[name] for name in STAGE_OPTIONS if name in options}
    given = options.get("stage")
    if isinstance(given, StageOptions):
        both = list(flat)
    elif isinstance(given, Mapping):
        both = [name for name in flat if name in given]
    else:
        both = []
    if both:
        name = both[0]
        inside = getattr(given, name) if isinstance(given, StageOptions) else given[name]
        raise ValueError(
            f"{name}={flat[name]!r} and stage.{name}={inside!r} are both given; set {name} in one place: "
            "the flat keyword or stage"
        )
    stage = StageOptions.from_value(given)
    rest["stage"] = dataclasses.replace(stage, **flat) if flat else stage
    return rest


def takes_evaluation(module: nn.Module) -> bool:
    """Whether a residual block's `__call__` takes `evaluation` (the index of the scheme's `F`
    evaluation within a step), i.e. keeps per-evaluation BatchNorm statistics."""
    try:
        parameters = inspect.signature(type(module).__call__).parameters
    except (TypeError, ValueError):
        return False
    return "evaluation" in parameters


class SchemeKnobs(nn.Module):
    """The scheme's learnable scalars for a stage: one raw parameter array per knob.

    Returns `{name: values [num_blocks]}` (after the knob's reparametrization). With
    `skip_first`, block 0 has no parameter (its step never reads the knob): the raw arrays are
    `[num_blocks - 1]` and the returned values hold a placeholder 0 at index 0. The init draws
    `num_blocks` values and drops the first, so blocks 1.. start where they started when every
    block had a knob.
    """

    scheme: Scheme
    num_blocks: int
    param_dtype: Any = jnp.float32
    skip_first: bool = False

    @nn.compact
    def __call__(self) -> dict[str, jnp.ndarray]:
        values = {}
        skip = int(self.skip_first)
        for knob in self.scheme.knobs:
            low, high = knob.init_range

            def init(key: jax.Array, shape: Sequence[int], dtype: Any = self.param_dtype, knob=knob, low=low, high=high):
                full = (shape[0] + skip,)
                value = jax.random.uniform(key, full, jnp.float32, low, high) if high > low else jnp.full(full, low)
                return knob.to_raw(value[skip:]).astype(dtype)

            raw = self.param(knob.name, init, (self.num_blocks - skip,), self.param_dtype)
            value = knob.to_value(raw)
            if skip:
                value = jnp.concatenate([jnp.zeros((1,), value.dtype), value])
            values[knob.name] = value
        return values


def _pure_apply(module: nn.Module, train: bool, **kwargs: Any) -> Callable[[Any, jnp.ndarray], jnp.ndarray]:
    """`apply(variables, z)`: `module`'s call as a pure function of its variables and input.

    In training, BatchNorm normalizes with the batch statistics of `z` and its running-average
    update is discarded: calls made through this function update no statistics.
    """
    unbound = module.clone(parent=None)

    def apply(variables: Any, z: jnp.ndarray) -> jnp.ndarray:
        if train:
            return unbound.apply(variables, z, train=True, mutable=["batch_stats"], **kwargs)[0]
        return unbound.apply(variables, z, train=False, **kwargs)

    return apply


def _bound_variables(module: nn.Module) -> dict[str, Any]:
    """The `params` and `batch_stats` of a bound module that has been called."""
    return {name: value for name, value in module.variables.items() if name in ("params", "batch_stats")}


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _implicit_adjoint(apply, coefficient, max_sweeps, tolerance, k, z, variables, scale):
    """Identity on `k = F(z)`; its cotangent `g` becomes `w` with `w = g + c (dF/dz)(z)^T w`."""
    del apply, coefficient, max_sweeps, tolerance, z, variables, scale
    return k


def _implicit_adjoint_fwd(apply, coefficient, max_sweeps, tolerance, k, z, variables, scale):
    return k, (z, variables, scale)


def _implicit_adjoint_bwd(apply, coefficient, max_sweeps, tolerance, residuals, g):
    z, variables, scale = residuals
    _, vjp = jax.vjp(lambda v: apply(variables, v, scale), z)

    def norm(v):
        return jnp.sqrt(jnp.sum(jnp.square(v.astype(jnp.promote_types(v.dtype, jnp.float32)))))

    def sweep(state):
        w, count, _ = state
        new = g + coefficient * vjp(w)[0].astype(g.dtype)
        change = norm(new - w) / jnp.maximum(norm(new), jnp.finfo(jnp.float32).tiny)
        return new, count + 1, change.astype(jnp.float32)

    def keep_going(state):
        _, count, change = state
        return (count < max_sweeps) & (change > tolerance)

    # w_0 = g is one sweep (the Neumann series' first term); at most `max_sweeps` in all.
    w, _, _ = jax.lax.while_loop(keep_going, sweep, (g, jnp.int32(1), jnp.float32(jnp.inf)))
    zeros = functools.partial(jax.tree_util.tree_map, jnp.zeros_like)
    return w, jnp.zeros_like(z), zeros(variables), zeros(scale)


_implicit_adjoint.defvjp(_implicit_adjoint_fwd, _implicit_adjoint_bwd)


class SchemeStep(nn.Module):
    """One residual block stepped by the scheme: the body of the stage's scan.

    `__call__((x, history), (knobs, drop_rate, drop_key, first)) -> ((x_next, history_next), None)`
    with `x: [batch, height, width, channels]`, `knobs: {name: scalar}`, `drop_rate: scalar`
    (ignored unless `drop_path`), `drop_key`: PRNG key or None, `first`: bool or None.
    """

    scheme: Scheme
    block: ModuleDef
    shortcut: ModuleDef | None = None
    train: bool = False
    start: str = "euler"
    drop_path: bool = False
    step_activation: Callable[[jnp.ndarray], jnp.ndarray] | None = None
    per_evaluation_stats: bool = True

    @nn.compact
    def __call__(self, carry: tuple[jnp.ndarray, History | None], xs: tuple[Any, ...]):
        x, history = carry
        knobs, drop_rate, drop_key, first = xs
        residual = self.block(name="block")
        scale = None
        if self.drop_path and self.train:
            survival = 1.0 - drop_rate
            keep = jax.random.bernoulli(drop_key, survival, (x.shape[0],) + (1,) * (x.ndim - 1))
            scale = keep / survival
        # The scheme calls f once per evaluation of F, in a fixed Python order: number them, so
        # that blocks taking `evaluation` keep BatchNorm statistics per evaluation (cnn.ode.norm),
        # and count them (the F evaluations this network really makes).
        numbered = self.per_evaluation_stats and takes_evaluation(residual)
        evaluations = itertools.count()
        calls: list[int] = []

        def f(z: jnp.ndarray, call: Callable[..., jnp.ndarray] | None = None) -> jnp.ndarray:
            index = next(evaluations)
            calls.append(index)
            options = {"evaluation": index} if numbered else {}
            out = residual(z, train=self.train, **options) if call is None else call(residual, z, train=self.train, **options)
            return out if scale is None else out * scale.astype(out.dtype)

        implicit = self.scheme.gradient == "implicit" and self.shortcut is None
        if implicit:
            # The sweeps before the last are not differentiated: their parameters and inputs enter
            # without gradient (BatchNorm statistics still update), so no activations are kept.
            frozen = nn.map_variables(
                lambda module, z, **options: module(jax.lax.stop_gradient(z), **options), "params",
                trans_in_fn=lambda tree: jax.tree_util.tree_map(jax.lax.stop_gradient, tree), mutable=True,
            )

            def sweep(z: jnp.ndarray) -> jnp.ndarray:
                return f(z, frozen)

        shortcut = project_state = project_derivative = None
        if self.shortcut is not None:
            module = self.shortcut(name="shortcut")

            def shortcut(z: jnp.ndarray) -> jnp.ndarray:
                return module(z, train=self.train)

            if history is not None:  # "project": the past enters S without touching its statistics
                pure_shortcut = _pure_apply(module, self.train)

                def project_state(z: jnp.ndarray) -> jnp.ndarray:
                    return pure_shortcut(_bound_variables(module), z)

                def project_derivative(d: jnp.ndarray) -> jnp.ndarray:
                    # a derivative is a tangent vector: the differential of S at x, no bias
                    variables = _bound_variables(module)
                    return jax.jvp(lambda z: pure_shortcut(variables, z), (x,), (d.astype(x.dtype),))[1]

        implicit_gradient = None
        if implicit:
            coefficient = self.scheme.h * self.scheme.rk_a[0][0]

            def implicit_gradient(unused_f: Callable, x_t: jnp.ndarray, k_previous: jnp.ndarray) -> jnp.ndarray:
                # K* = F(x + c K*): differentiate K = F(x + c stop(K_prev)) with its cotangent g
                # replaced by w = (I - c J^T)^{-1} g, J = dF/dz: then the parameters get
                # (dF/dtheta)^T w and x gets J^T w, the implicit-function theorem's gradient.
                z = x_t + coefficient * jax.lax.stop_gradient(k_previous)
                k = f(z)
                pure = _pure_apply(residual, self.train, **({"evaluation": calls[-1]} if numbered else {}))

                def apply(variables, v, scale):
                    out = pure(variables, v)
                    return out if scale is None else out * scale.astype(out.dtype)

                tolerance = 0.0 if self.scheme.tolerance is None else float(self.scheme.tolerance)
                return _implicit_adjoint(apply, coefficient, self.scheme.iterations, tolerance, k,
                                         jax.lax.stop_gradient(z), _bound_variables(residual), scale)

        def sow(name: str, value: jnp.ndarray) -> None:
            # Not at init: the diagnostics must not end up among the model's variables.
            if not self.is_initializing():
                self.sow(DIAGNOSTICS, name, value)

        def on_solve(info: Mapping[str, Any]) -> None:
            sow("implicit_residual", jnp.asarray(info["residual"], jnp.float32))
            sow("implicit_sweeps", jnp.asarray(info["sweeps"], jnp.int32))

        x_next, history_next = self.scheme.step(
            sweep if implicit else f, x, history, knobs, first=first, start=self.start, shortcut=shortcut,
            project_state=project_state, project_derivative=project_derivative,
            on_solve=on_solve if self.scheme.is_implicit else None, implicit_gradient=implicit_gradient,
        )
        sow("evaluations", jnp.arange(len(calls), dtype=jnp.int32))
        if self.step_activation is not None:
            x_next = self.step_activation(x_next)
        return (x_next, history_next), None


class ODEStage(nn.Module):
    """A residual stage `x_0 -> x_N` stepped by `scheme` (see the module docstring).

    Attributes:
      scheme: a `Scheme` or a scheme name for `get_scheme`.
      block: factory of the identical residual modules: `block(name=...)` builds a module with
        `__call__(x, *, train) -> F(x)`, same shape in and out.
      num_blocks: number of blocks N including the entry block.
      entry_block: factory of block 0 when it changes shape (needs `entry_shortcut`), else None.
      entry_shortcut: factory of S for block 0, `__call__(x, *, train)`.
      options: `StageOptions` (tied, scan, remat, start, history_at_entry, per_evaluation_stats).
      takes_history, drop_path_rates, step_activation: see the module docstring.
      param_dtype: dtype of the knob parameters.
    """

    scheme: Scheme | str
    block: ModuleDef
    num_blocks: int
    entry_block: ModuleDef | None = None
    entry_shortcut: ModuleDef | None = None
    options: StageOptions = StageOptions()
    takes_history: bool = True
    drop_path_rates: tuple[float, ...] = ()
    step_activation: Callable[[jnp.ndarray], jnp.ndarray] | None = None
    param_dtype: Any = jnp.float32

    def first_block_uses_no_knob(self) -> bool:
        """Whether block 0 always takes the start step (so its knobs are never read and not
        created): with `start="euler"`, an entry block under "restart", or `takes_history=False`."""
        has_entry = self.entry_block is not None
        restarts = has_entry and self.options.history_at_entry == "restart"
        return self.options.start == "euler" and (restarts or not self.takes_history)

    def _validate(self) -> None:
        if not isinstance(self.options, StageOptions):
            raise ValueError(
                f"options={self.options!r}: expected a StageOptions (e.g. StageOptions(scan=False)); "
                "StageOptions.from_value converts a mapping"
            )
        if not (isinstance(self.num_blocks, int) and self.num_blocks >= 1):
            raise ValueError(f"num_blocks={self.num_blocks!r}: must be an integer >= 1")
        if (self.entry_block is None) != (self.entry_shortcut is None):
            raise ValueError(
                "entry_block and entry_shortcut go together: a shape-changing block 0 needs the shortcut "
                f"S that maps x_0 to its output shape (got entry_block={self.entry_block!r}, "
                f"entry_shortcut={self.entry_shortcut!r})"
            )
        rates = tuple(self.drop_path_rates)
        if rates and len(rates) != self.num_blocks:
            raise ValueError(
                f"drop_path_rates has {len(rates)} entries; expected one per block (num_blocks={self.num_blocks})"
            )
        if any(not 0.0 <= r < 1.0 for r in rates):
            raise ValueError(f"drop_path_rates={rates}: every rate must be in [0, 1)")

    @nn.compact
    def __call__(
        self, x: jnp.ndarray, history: History | None = None, *, train: bool
    ) -> tuple[jnp.ndarray, History | None]:
        """Runs the stage.

        Args:
          x: `[batch, height, width, channels]` input `x_0`.
          history: the previous stage's history (multistep schemes), or None.
          train: BatchNorm batch statistics and drop path on.

        Returns:
          `(x_N, history)`: the output and the history to pass to the next stage (empty
          `History()` for one-step schemes).
        """
        self._validate()
        if history is not None and not self.takes_history:
            raise ValueError(
                "this stage was built with takes_history=False (its block 0 has no knobs) but was called with a "
                "history; build it with takes_history=True to continue a history"
            )
        scheme = get_scheme(self.scheme)
        n = self.num_blocks
        has_entry = self.entry_block is not None
        drop_path = bool(self.drop_path_rates) and max(self.drop_path_rates) > 0.0

        skip_first = self.first_block_uses_no_knob()
        if scheme.knobs and n - int(skip_first) > 0:
            knobs = SchemeKnobs(scheme, n, self.param_dtype, skip_first, name="knobs")()
        else:  # no block reads a knob: placeholders for the (start) step
            knobs = {name: jnp.zeros((n,), self.param_dtype) for name in scheme.knob_names}
        knobs = {name: value.astype(x.dtype) for name, value in knobs.items()}
        rates = jnp.asarray(self.drop_path_rates if drop_path else (0.0,) * n, jnp.float32)
        keys = jax.random.split(self.make_rng("dropout"), n) if (drop_path and train) else None

        def xs_at(i: int, first: Any) -> tuple[Any, ...]:
            return ({k: v[i] for k, v in knobs.items()}, rates[i], None if keys is None else keys[i], first)

        options = self.options
        step_cls = nn.remat(SchemeStep) if options.remat else SchemeStep
        common = dict(scheme=scheme, train=train, start=options.start, drop_path=drop_path,
                      step_activation=self.step_activation, per_evaluation_stats=options.per_evaluation_stats)

        index = 0
        if has_entry:
            incoming = history if options.history_at_entry == "project" else None
            entry = step_cls(block=self.entry_block, shortcut=self.entry_shortcut, name="entry", **common)
            (x, history), _ = entry((x, incoming), xs_at(0, incoming is None))
            index = 1

        num_identical = n - index
        if num_identical == 0:
            return x, history
        # Block `index` is the very first step of the stage when nothing came before it.
        starts_here = history is None
        if history is None:
            history = scheme.empty_history(x)

        if options.tied:
            # One module, used at every step. During init (and when unrolled) it is simply called
            # N times; under scan its params are broadcast and its BatchNorm statistics carried.
            if self.is_initializing() or not options.scan:
                tied = step_cls(block=self.block, name="tied_block", **common)
                carry = (x, history)
                for i in range(num_identical):
                    carry, _ = tied(carry, xs_at(index + i, starts_here and i == 0))
                return carry
            stats_mutable = self.is_mutable_collection("batch_stats")
            scanned = nn.scan(
                step_cls,
                variable_axes={DIAGNOSTICS: 0},
                variable_broadcast=["params"] if stats_mutable else ["params", "batch_stats"],
                variable_carry=["batch_stats"] if stats_mutable else [],
                split_rngs={"params": False, "dropout": True},
                length=num_identical,
            )
            body = scanned(block=self.block, name="tied_block", **common)
        elif options.scan:
            scanned = nn.scan(
                step_cls,
                variable_axes={"params": 0, "batch_stats": 0, DIAGNOSTICS: 0},
                split_rngs={"params": True, "dropout": True},
                length=num_identical,
            )
            body = scanned(block=self.block, name="blocks", **common)
        else:
            carry = (x, history)
            for i in range(num_identical):
                step = step_cls(block=self.block, name=f"blocks_{i}", **common)
                carry, _ = step(carry, xs_at(index + i, starts_here and i == 0))
            return carry

        stacked_xs = (
            {k: v[index:] for k, v in knobs.items()},
            rates[index:],
            None if keys is None else keys[index:],
            (jnp.arange(num_identical) == 0) if starts_here else None,
        )
        carry, _ = body((x, history), stacked_xs)
        return carry


# ------------------------------------------------------------------------------ param layouts

_UNROLLED = re.compile(r"^blocks_(\d+)$")


def stack_unrolled(tree: Mapping[str, Any]) -> dict[str, Any]:
    """Converts variables of unrolled stages (`blocks_0 .. blocks_{M-1}`) to the scanned layout
    (`blocks`, every leaf stacked on a new leading axis). Works on any collection and nesting."""
    out: dict[str, Any] = {}
    unrolled: dict[int, Any] = {}
    for key, value in tree.items():
        match = _UNROLLED.match(key)
        if match:
            unrolled[int(match.group(1))] = value
        else:
            out[key] = stack_unrolled(value) if isinstance(value, Mapping) else value
    if unrolled:
        if sorted(unrolled) != list(range(len(unrolled))):
            raise ValueError(f"unrolled blocks {sorted(unrolled)} are not numbered 0..{len(unrolled) - 1}")
        parts = [stack_unrolled(unrolled[i]) if isinstance(unrolled[i], Mapping) else unrolled[i]
                 for i in range(len(unrolled))]
        out["blocks"] = jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *parts)
    return out


def unstack_scanned(tree: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of `stack_unrolled`: splits every `blocks` subtree along its leading axis."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if key == "blocks" and isinstance(value, Mapping):
            leaves = jax.tree_util.tree_leaves(value)
            count = int(leaves[0].shape[0])
            for i in range(count):
                out[f"blocks_{i}"] = unstack_scanned(jax.tree_util.tree_map(lambda leaf, i=i: leaf[i], value))
        else:
            out[key] = unstack_scanned(value) if isinstance(value, Mapping) else value
    return out


def knob_values(
    params: Mapping[str, Any], scheme: Scheme | str, scheme_options: Mapping[str, Any] | None = None
) -> dict[str, dict[str, np.ndarray]]:
    """The learned knob values of every stage: `{stage_path: {knob_name: values [blocks]}}`.

    The one reader of learned knobs (the analysis plots, the experiments' summaries): give it the
    scheme the model was built with -- a `Scheme`, or a name plus the `scheme_options` it was
    built with -- since a constrained knob (`constrain=True`) stores `raw` and has the value
    `tanh(raw)` (mapped into its bounds): the bare name would report the raw parameter.

    `params` is a model's `params` collection; stages are found by their `knobs` subtree and
    listed in parameter-tree order (creation order, i.e. stage order). Each array has one value
    per block that has a knob: a stage's block 0 has none when it always takes the start step
    (`ODEStage.first_block_uses_no_knob`).
    """
    scheme = get_scheme(scheme, **dict(scheme_options or {}))
    found: dict[str, dict[str, np.ndarray]] = {}

    def visit(node: Mapping[str, Any], path: tuple[str, ...]) -> None:
        for key, value in node.items():
            if not isinstance(value, Mapping):
                continue
            if key == "knobs" and all(name in value for name in scheme.knob_names):
                found["/".join(path)] = {
                    knob.name: np.asarray(knob.to_value(jnp.asarray(value[knob.name]))) for knob in scheme.knobs
                }
            else:
                visit(value, path + (key,))

    visit(params, ())
    return found


def fit_knob_layout(tree: Any, template: Any) -> Any:
    """`tree` (e.g. params or a whole train state restored from an older checkpoint) with its
    knob arrays fitted to `template`'s layout.

    Checkpoints written before a stage's block 0 stopped having knobs hold one more value per
    knob (`[num_blocks]`, index 0 unused); those arrays lose index 0, and `knobs` subtrees
    that `template` no longer has are dropped. Everything else must match `template`'s
    structure. Works on nested mappings, lists and tuples (optimizer states mirror the params).

    Raises:
      ValueError: the structures differ other than in `knobs`, or a knob array has another length
        than the template's or the template's + 1.
    """

    def fit(node: Any, like: Any, path: str) -> Any:
        if isinstance(like, Mapping):
            if not isinstance(node, Mapping):
                raise ValueError(f"{path or 'tree'}: expected a mapping like the template, got {type(node).__name__}")
            missing = [key for key in like if key not in node]
            if missing:
                raise ValueError(f"{path or 'tree'} lacks {missing} that the template has")
            extra = [key for key in node if key not in like and key != "knobs"]
            if extra:
                raise ValueError(f"{path or 'tree'} has {extra} that the template does not have")
            return {key: fit_knobs(node[key], value, f"{path}/{key}") if key == "knobs" else fit(node[key], value, f"{path}/{key}")
                    for key, value in like.items()}
        if isinstance(like, (list, tuple)) and not hasattr(like, "shape"):
            if len(node) != len(like):
                raise ValueError(f"{path}: {len(node)} entries, the template has {len(like)}")
            items = [fit(a, b, f"{path}[{i}]") for i, (a, b) in enumerate(zip(node, like))]
            return type(like)(*items) if hasattr(like, "_fields") else type(like)(items)
        return node

    def fit_knobs(node: Any, like: Any, path: str) -> Any:
        if not isinstance(like, Mapping):
            return fit(node, like, path)
        out = {}
        for name, value in like.items():
            array = node[name]
            have, want = np.shape(array), np.shape(value)
            if have == want:
                out[name] = array
            elif len(have) == len(want) >= 1 and have[0] == want[0] + 1 and have[1:] == want[1:]:
                out[name] = array[1:]  # the old layout's unused block-0 value
            else:
                raise ValueError(f"{path}/{name}: shape {have} fits neither the template's {want} nor the old layout")
        return out

    return fit(tree, template, "")


# ------------------------------------------------------------------------------------ diagnostics


def _diagnostic_leaves(tree: Any, name: str) -> dict[str, list[np.ndarray]]:
    """`{owner path: [arrays sown under name, in call order]}` from a DIAGNOSTICS tree."""
    found: dict[str, list[Any]] = {}

    def visit(node: Any, path: tuple[str, ...]) -> None:
        if not isinstance(node, Mapping):
            return
        for key, value in node.items():
            if key == name:
                found.setdefault("/".join(path), []).extend(value if isinstance(value, tuple) else (value,))
            else:
                visit(value, path + (key,))

    visit(tree, ())
    return found


def count_f_evaluations(model: nn.Module, input_shape: Sequence[int], *, dtype: Any = jnp.float32, **call_kwargs: Any) -> int:
    """The residual-function evaluations of one forward pass of `model`, as the network makes them.

    Every `SchemeStep` records one entry per call of `F`; this traces `model` (with
    `jax.eval_shape`: no compilation, no arithmetic) on an input `input_shape`
    (`[batch, height, width, channels]`) and adds them up -- a Runge-Kutta scheme's Euler step
    at a transition, a multistep scheme's single evaluation and an implicit step's maximum
    sweeps all count what runs. `call_kwargs` go to `model.init` / `model.apply`.
    """
    x = jax.ShapeDtypeStruct(tuple(int(d) for d in input_shape), dtype)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False, **call_kwargs), x)
    _, state = jax.eval_shape(
        lambda v, x: model.apply(v, x, train=False, mutable=[DIAGNOSTICS], **call_kwargs), variables, x
    )
    leaves = _diagnostic_leaves(state.get(DIAGNOSTICS, {}), "evaluations")
    return int(sum(int(np.prod(leaf.shape)) for arrays in leaves.values() for leaf in arrays))


def implicit_solve_stats(
    model: nn.Module, variables: Mapping[str, Any], x: jnp.ndarray, *, train: bool = False, **call_kwargs: Any
) -> dict[str, dict[str, np.ndarray]]:
    """Residual reached and sweeps used by every implicit step of one forward pass on batch `x`.

    Returns `{block path: {"residual": [steps], "sweeps": [steps]}}` (a scanned stage's blocks
    are one path with one entry per block; a tied stage one entry per step); empty when the
    model has no implicit steps. `residual` is the relative change of the last sweep that
    counted (`Scheme.step`'s `on_solve`). `train=True` normalizes with batch statistics (the
    statistics' updates are discarded). Compiles the forward pass once per call.
    """
    mutable = [DIAGNOSTICS] + (["batch_stats"] if train else [])
    _, state = jax.jit(lambda v, x: model.apply(v, x, train=train, mutable=mutable, **call_kwargs))(variables, x)
    tree = state.get(DIAGNOSTICS, {})
    residuals = _diagnostic_leaves(tree, "implicit_residual")
    sweeps = _diagnostic_leaves(tree, "implicit_sweeps")
    return {
        path: {
            "residual": np.concatenate([np.ravel(np.asarray(a, np.float64)) for a in residuals[path]]),
            "sweeps": np.concatenate([np.ravel(np.asarray(a, np.int64)) for a in sweeps[path]]),
        }
        for path in residuals
    }


def summarize_implicit_solve(stats: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, float]:
    """`{"steps", "max_residual", "mean_residual", "mean_sweeps", "max_sweeps"}` over all implicit
    steps of `implicit_solve_stats` (empty dict when there are none), for logs and tables."""
    if not stats:
        return {}
    residual = np.concatenate([np.asarray(v["residual"], np.float64) for v in stats.values()])
    sweeps = np.concatenate([np.asarray(v["sweeps"], np.float64) for v in stats.values()])
    return {
        "steps": int(residual.size),
        "max_residual": float(np.max(residual)),
        "mean_residual": float(np.mean(residual)),
        "mean_sweeps": float(np.mean(sweeps)),
        "max_sweeps": int(np.max(sweeps)),
    }


def implicit_scheme_label(scheme: Scheme | str, summary: Mapping[str, float] | None = None, **scheme_options: Any) -> str:
    """The scheme's name for tables, saying what an implicit solve achieved.

    One-step explicit and multistep schemes: their name. An implicit scheme: its name alone when
    every step met its `tolerance` (`summary` from `summarize_implicit_solve`), else what was
    done, e.g. "backward_euler, 2 sweeps, residual 0.31" (largest residual over the steps; with
    no summary, "backward_euler, 2 sweeps, residual not measured").
    """
    scheme = get_scheme(scheme, **scheme_options)
    if not scheme.is_implicit:
        return scheme.name
    if summary and scheme.tolerance is not None and summary["max_residual"] <= scheme.tolerance:
        return f"{scheme.name} (residual <= {scheme.tolerance:g}, {summary['mean_sweeps']:.1f} sweeps)"
    if not summary:
        return f"{scheme.name}, {scheme.iterations} sweeps, residual not measured"
    sweeps = summary["max_sweeps"]
    return f"{scheme.name}, {sweeps} sweep{'s' if sweeps != 1 else ''}, residual {summary['max_residual']:.2g}"


__all__ = [
    "DIAGNOSTICS",
    "HISTORY_MODES",
    "ODEStage",
    "STAGE_OPTIONS",
    "SchemeKnobs",
    "SchemeStep",
    "StageOptions",
    "count_f_evaluations",
    "fit_knob_layout",
    "fold_stage_options",
    "implicit_scheme_label",
    "implicit_solve_stats",
    "knob_values",
    "linear_drop_path_rates",
    "stack_unrolled",
    "summarize_implicit_solve",
    "unstack_scanned",
]
