"""Residual networks read as integrators of a learned, time-invariant vector field.

A residual step `x_{t+1} = x_t + h F(x_t)` is forward Euler for `x' = F(x)`. An `Integrator` is
one residual function `F_theta` shared by every step (a `cnn.ode.ODEStage` of one block with
`StageOptions(tied=True)`), stepped by a scheme (`Scheme.step`, the code the classification networks run) and
rolled out in time. Two registered models:

    model = cnn.models.create("mlp_integrator", scheme="rk4", h=0.1, hidden=(64, 64), context=1)
    model = cnn.models.create("stencil_integrator", scheme="euler", boundary="periodic")

Input: a window of true states `[batch, time, *state]`, `time >= context + 2` (`state` is `[d]`
for an ODE, `[height, width, 1]` for a field on a grid). The model reads `x_0 .. x_context`
(`context`: how many true past states a multistep scheme is given) and predicts
`x_{context+1} .. x_{time-1}` on its own predictions; the window's length sets the horizon.
Output: `IntegratorOutput(rollout [batch, time - context - 1, *state], one_step)`, where in
inference mode `one_step` (same shape) holds the teacher-forced one-step predictions of every
state after `x_context` from the true states before it (None in training mode).

Start (`start`): "data" seeds a multistep scheme's history with the true past states (the
scheme's `F` is evaluated on them), so a one-step prediction is one step of the scheme's own
formula; "euler" / "copy" take the scheme's start rule from `x_context` alone, as a network's
first block does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cnn.models.registry import register
from cnn.ode import History, ODEStage, Scheme, StageOptions, get_scheme
from cnn.ode.schemes import START_MODES as SCHEME_START_MODES

START_MODES = ("data",) + tuple(SCHEME_START_MODES)
ACTIVATIONS = ("tanh", "gelu", "softplus", "silu", "relu")
BOUNDARIES = ("periodic", "dirichlet")


class MLPField(nn.Module):
    """A learned vector field: an MLP `[..., d] -> [..., d]` whose output layer starts at zero
    (the untrained integrator is the identity map)."""

    hidden: tuple[int, ...] = (64, 64)
    activation: str = "tanh"

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        del train  # no BatchNorm, no dropout
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation={self.activation!r}; valid: {list(ACTIVATIONS)}")
        y = x
        for i, width in enumerate(self.hidden):
            y = getattr(nn, self.activation)(nn.Dense(width, name=f"hidden_{i}")(y))
        return nn.Dense(x.shape[-1], kernel_init=nn.initializers.zeros, name="out")(y)


class StencilConv(nn.Module):
    """One 3x3 convolution, one channel, no bias: `[batch, H, W, 1] -> [batch, H, W, 1]`.

    Padding follows the data's boundary condition: circular for periodic fields, zeros for
    zero-Dirichlet fields (the unknowns are the interior points). Like every Flax conv it is a
    cross-correlation; the Laplacian stencil is symmetric, so it reads the same either way.
    """

    boundary: str = "periodic"

    @nn.compact
    def __call__(self, u: jax.Array, *, train: bool = False) -> jax.Array:
        del train
        if u.shape[-1] != 1:
            raise ValueError(f"StencilConv expects one channel, got input shape {u.shape}")
        if self.boundary not in BOUNDARIES:
            raise ValueError(f"boundary={self.boundary!r}; valid: {list(BOUNDARIES)}")
        padding = "CIRCULAR" if self.boundary == "periodic" else "SAME"
        return nn.Conv(1, (3, 3), padding=padding, use_bias=False, name="stencil")(u)


class KnownField(nn.Module):
    """A fixed vector field `field(x)` as a residual function (no parameters): plugs the true
    `f` into the integrator that is trained, e.g. to check a scheme's order."""

    field: Callable[[jax.Array], jax.Array]

    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        return self.field(x).astype(x.dtype)


class IntegratorOutput(NamedTuple):
    """`rollout [batch, horizon, *state]`; `one_step` the same shape, or None in training."""

    rollout: jax.Array
    one_step: jax.Array | None


def history_length(scheme: Scheme | str) -> int:
    """How many past states a scheme's step reads (0 for one-step schemes)."""
    scheme = get_scheme(scheme)
    return max(scheme.num_past_states, scheme.num_past_derivatives)


class Integrator(nn.Module):
    """`F_theta = field(**field_options)` stepped by `scheme` (see the module docstring).

    Attributes:
      field: the residual function's class, `field(**field_options)(x, *, train) -> F(x)`.
      field_options: its constructor arguments as `(name, value)` pairs (hashable).
      scheme: a `Scheme` (its `h` is the time step) or a scheme name.
      context: index of the true state the rollout starts from.
      start: "data", "euler" or "copy".

    Parameters: `stage/tied_block/block/...` (the field) and `stage/knobs/<name>` `[1]` (a
    scheme's learnable knobs, e.g. LM-ResNet's `k`: one scalar for all time).
    """

    field: type[nn.Module]
    field_options: tuple[tuple[str, Any], ...] = ()
    scheme: Scheme | str = "euler"
    context: int = 0
    start: str = "data"

    def setup(self):
        if self.start not in START_MODES:
            raise ValueError(f"start={self.start!r}; valid: {list(START_MODES)}")
        need = history_length(self.scheme)
        if self.start == "data" and need > self.context:
            raise ValueError(
                f"scheme {get_scheme(self.scheme).name!r} needs {need} true past states but context={self.context}; "
                f"set context >= {need}"
            )
        options = StageOptions(tied=True, scan=False, start="euler" if self.start == "data" else self.start)
        self.stage = ODEStage(scheme=self.scheme, block=_Field(self.field, self.field_options), num_blocks=1,
                              options=options)

    def rollout(self, past: jax.Array, horizon: int, *, train: bool = False) -> jax.Array:
        """`horizon` steps from the true states `past [batch, context + 1, *state]` (the last is
        the start) -> predictions `[batch, horizon, *state]`."""
        if horizon < 1:
            raise ValueError(f"horizon={horizon}: must be >= 1")
        history: History | None = None
        if self.start == "data":
            need = history_length(self.scheme)
            history = History() if need == 0 else None
            for t in range(past.shape[1] - 1 - need, past.shape[1] - 1):  # oldest first
                _, history = self.stage(past[:, t], history, train=train)
        # The first step is taken outside the scan: a scheme's own start rule changes the carry's
        # structure (no history -> a history), and it creates the parameters at init.
        x, history = self.stage(past[:, -1], history, train=train)
        if horizon == 1:
            return x[:, None]

        def body(module: Integrator, carry, _):
            x_next, history_next = module.stage(*carry, train=train)
            return (x_next, history_next), x_next

        scan = nn.scan(body, variable_broadcast="params", split_rngs={"params": False}, length=horizon - 1)
        _, xs = scan(self, (x, history), None)
        return jnp.concatenate([x[:, None], jnp.moveaxis(xs, 0, 1)], axis=1)

    def __call__(self, window: jax.Array, *, train: bool = False) -> IntegratorOutput:
        """`window [batch, time, *state]` -> `IntegratorOutput` (module docstring)."""
        horizon = window.shape[1] - self.context - 1
        if horizon < 1:
            raise ValueError(f"window of shape {window.shape} has no state after x_context (context={self.context})")
        rollout = self.rollout(window[:, : self.context + 1], horizon, train=train)
        if train:
            return IntegratorOutput(rollout, None)
        # Every run of context + 1 true states, as one batch: [batch * horizon, context + 1, *state].
        index = np.arange(horizon)[:, None] + np.arange(self.context + 1)[None, :]
        pasts = window[:, index].reshape((-1, self.context + 1) + window.shape[2:])
        one_step = self.rollout(pasts, 1)[:, 0].reshape((window.shape[0], horizon) + window.shape[2:])
        return IntegratorOutput(rollout, one_step)


class _Field:
    """A hashable factory `_Field(cls, options)(name=...) -> cls(**options, name=...)`."""

    def __init__(self, cls: type[nn.Module], options: tuple[tuple[str, Any], ...]):
        self.cls, self.options = cls, tuple(options)

    def __call__(self, **kwargs: Any) -> nn.Module:
        return self.cls(**dict(self.options), **kwargs)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Field) and (self.cls, self.options) == (other.cls, other.options)

    def __hash__(self) -> int:
        return hash((self.cls, self.options))


def field_variables(params: Mapping[str, Any]) -> dict[str, Any]:
    """The field's `{"params": ...}` inside an `Integrator`'s params (apply `field(**options)` to it)."""
    return {"params": params["stage"]["tied_block"]["block"]}


def _scheme(scheme: str | Scheme, scheme_options: Mapping[str, Any] | None, h: float) -> Scheme:
    options = dict(scheme_options or {})
    if "h" in options:
        raise ValueError(f"scheme_options for {scheme!r} set h={options['h']!r}; the step is the model's h")
    return get_scheme(scheme, h=float(h), **options)


@register("mlp_integrator")
def mlp_integrator(
    *,
    scheme: str = "euler",
    scheme_options: Mapping[str, Any] | None = None,
    h: float = 0.1,
    hidden: tuple[int, ...] = (64, 64),
    activation: str = "tanh",
    context: int = 0,
    start: str = "data",
) -> Integrator:
    """An ODE integrator: `F_theta` a residual MLP `[d] -> [d]`, step `h` (the data's `dt`).

    Input `[batch, time, d]`; `scheme_options` go to `cnn.ode.get_scheme` (not `h`).
    """
    options = (("hidden", tuple(int(w) for w in hidden)), ("activation", str(activation)))
    return Integrator(MLPField, options, _scheme(scheme, scheme_options, h), int(context), str(start))


@register("stencil_integrator")
def stencil_integrator(
    *,
    scheme: str = "euler",
    scheme_options: Mapping[str, Any] | None = None,
    h: float = 1.0,
    boundary: str = "periodic",
    context: int = 0,
    start: str = "data",
) -> Integrator:
    """A PDE integrator on a grid: `F_theta` one 3x3 conv kernel (`StencilConv`), step `h`.

    Input `[batch, time, height, width, 1]`; with forward Euler and `h = 1` the learned kernel is
    the explicit scheme's stencil.
    """
    if boundary not in BOUNDARIES:
        raise ValueError(f"boundary={boundary!r}; valid: {list(BOUNDARIES)}")
    return Integrator(StencilConv, (("boundary", boundary),), _scheme(scheme, scheme_options, h), int(context),
                      str(start))


__all__ = [
    "ACTIVATIONS",
    "BOUNDARIES",
    "START_MODES",
    "Integrator",
    "IntegratorOutput",
    "KnownField",
    "MLPField",
    "StencilConv",
    "field_variables",
    "history_length",
    "mlp_integrator",
    "stencil_integrator",
]
