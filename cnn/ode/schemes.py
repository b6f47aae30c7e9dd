"""Discretization schemes for residual networks read as ODEs, as frozen data plus one step rule.

A residual network `x_{t+1} = x_t + F(x_t, theta_t)` is the forward Euler discretization of
`dx/dt = F(x, theta(t))` with step `h = 1`. A `Scheme` records another way of stepping the same
vector field: its name, formula, order, step `h`, coefficients, the history it keeps, how many
`F` evaluations a step costs, and any learnable scalars ("knobs", e.g. LM-ResNet's `k_t`).

Two families cover the catalogue:

- Runge-Kutta (one-step) schemes, given by a Butcher tableau `(a, b)`:
      K_i = F(x_t + h * sum_j a_ij K_j),   x_{t+1} = x_t + h * sum_i b_i K_i.
  Explicit tableaus (a strictly lower triangular) are evaluated stage by stage; an implicit one
  (backward Euler) is solved by fixed-point sweeps: a fixed number (`iterations`), or until the
  relative change of a sweep is at most `tolerance`, with `iterations` as the maximum. All stages
  call the same `F` -- in a network, the same block with the same weights.
- Linear multistep schemes with coefficients that may depend on knobs:
      x_{t+1} = sum_j alpha_j x_{t-j} + h * sum_j beta_j F(x_{t-j}),   j = 0, 1, ...
  `F(x_t)` is the only new evaluation per step; the past states and derivatives travel in a
  `History` (most recent first).

`Scheme.step` is the single implementation of every update rule. `cnn.ode.stage.ODEStage` calls
it inside `nn.scan` with a Flax block as `F`; `cnn.ode.analysis` calls it in float64 numpy with
a known vector field to measure convergence order and stability. The step code is plain
arithmetic on the arrays it is given, so the same lines run on numpy arrays, complex numbers
and traced JAX arrays.

How a step sequence starts (`start`): the first step of a multistep scheme has no past.
- `"euler"` (default): it is one forward Euler step `x_1 = x_0 + h F(x_0)`; the history is then
  `(x_0, F(x_0))`. This is what the LM-ResNet reference implementation does (see `lm`).
- `"copy"`: the missing past is filled with the present, `x_{-j} = x_0`, `F(x_{-j}) = F(x_0)`,
  and the scheme's own formula is applied. For LM-ResNet and AB2 this equals the Euler start;
  for leapfrog it gives `x_1 = x_0 + 2h F(x_0)`, which costs one order of accuracy.

A shape-changing transition (`shortcut` S, e.g. a strided 1x1 projection) has no ODE meaning:
the state space changes. Its step is `x_{t+1} = S(x_t) + h F(x_t)` for Runge-Kutta schemes
(their inner stages `x_t + h a K` cannot mix the two shapes) and the start step above for
multistep schemes with no history; given a history, multistep schemes map every past state and
derivative through `S` ("project") and apply their own formula. The stage decides which.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

START_MODES = ("euler", "copy")
GRADIENT_MODES = ("unrolled", "implicit")


class History(NamedTuple):
    """The past a multistep scheme keeps: `states = (x_{t-1}, x_{t-2}, ...)`, `derivatives =
    (F(x_{t-1}), ...)`, most recent first; each array has the shape of `x`. Empty for one-step
    schemes."""

    states: tuple[Any, ...] = ()
    derivatives: tuple[Any, ...] = ()


@dataclasses.dataclass(frozen=True)
class Knob:
    """A learnable scalar of a scheme, one per block (LM-ResNet's `k_t`).

    The parameter stored in a network is `raw`; the scheme uses `value`. Without `bounds`,
    `value = raw`. With `bounds = (low, high)`, `value = mid + half * tanh(raw)` (`mid`, `half` the
    interval's centre and half-width), so the value stays in the open interval whatever the
    optimizer does.

    Attributes:
      name: the coefficient's name in formulas and in the parameter tree (`knobs/<name>`).
      init_range: values are initialized `U[low, high]` (`low == high` gives a constant).
      bounds: the open interval kept by the reparametrization, or None.
    """

    name: str
    init_range: tuple[float, float]
    bounds: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        low, high = self.init_range
        if not low <= high:
            raise ValueError(f"{self.name}_init={self.init_range}: low must be <= high")
        if self.bounds is not None:
            lo, hi = self.bounds
            if not lo < hi:
                raise ValueError(f"{self.name}_bounds={self.bounds}: low must be < high")
            if not (lo < low and high < hi):
                raise ValueError(
                    f"{self.name}_init={self.init_range} lies outside the open interval "
                    f"{self.name}_bounds={self.bounds} kept by the constraint; choose an init range "
                    f"strictly inside it (or turn the constraint off)"
                )

    def to_value(self, raw: Any) -> Any:
        """The coefficient the scheme uses, from the stored parameter (any array shape)."""
        if self.bounds is None:
            return raw
        lo, hi = self.bounds
        return (lo + hi) / 2 + (hi - lo) / 2 * jnp.tanh(raw)

    def to_raw(self, value: Any) -> Any:
        """Inverse of `to_value` (values must lie inside `bounds`)."""
        if self.bounds is None:
            return value
        lo, hi = self.bounds
        return jnp.arctanh((value - (lo + hi) / 2) / ((hi - lo) / 2))


@dataclasses.dataclass(frozen=True)
class Coefficient:
    """An affine function of the knobs: `constant + sum_i weight_i * knob_i`.

    `Coefficient(1.0, (("k", -1.0),))` is LM-ResNet's `1 - k`.
    """

    constant: float
    terms: tuple[tuple[str, float], ...] = ()

    def __call__(self, knobs: Mapping[str, Any]) -> Any:
        value: Any = self.constant
        for name, weight in self.terms:
            value = value + weight * knobs[name]
        return value

    @property
    def is_zero(self) -> bool:
        """True when the coefficient is the constant 0 (its term can be skipped)."""
        return not self.terms and self.constant == 0.0


def _select(first: Any, when_first: Any, otherwise: Any) -> Any:
    """`when_first` if `first` else `otherwise`; `first` is a Python bool or a traced bool scalar."""
    if first is True:
        return when_first
    if first is False or first is None:
        return otherwise
    return jnp.where(first, when_first, otherwise)


@dataclasses.dataclass(frozen=True)
class Scheme:
    """A discretization scheme: immutable data plus `step`, the one update rule.

    Exactly one family is set: a Butcher tableau (`rk_a`, `rk_b`) or multistep coefficients
    (`alpha`, `beta`). Build schemes with `get_scheme(name, **options)` or the named
    constructors below rather than by hand.

    Attributes:
      name: catalogue name.
      formula: the update rule in words and symbols.
      order: global order of accuracy for a smooth autonomous `F`.
      h: step size (`h = 1` with forward Euler is the plain ResNet).
      rk_a, rk_b: Butcher tableau of a Runge-Kutta scheme.
      iterations: fixed-point sweeps per step for an implicit tableau (ignored when explicit):
        exactly this many without `tolerance`, at most this many with it.
      tolerance: for an implicit tableau, stop sweeping once a sweep changes the stage inputs by
        at most `tolerance` relative to the step's result (`|h (K_new - K)| / |x_{t+1}|`, norms
        over the whole array: in a network the batch is one state); None sweeps `iterations`
        times. Sweeps after convergence are still computed (a fixed count keeps the step
        reverse-differentiable and jit-able) but change nothing.
      gradient: how a network differentiates an implicit step: "unrolled" backpropagates
        through the sweeps; "implicit" uses the implicit-function theorem at the last sweep
        (as deep-equilibrium models do; `cnn.ode.stage`). `step` itself computes the same values
        either way.
      alpha: multistep coefficients on `x_t, x_{t-1}, ...`.
      beta: multistep coefficients on `F(x_t), F(x_{t-1}), ...` (explicit: no `F(x_{t+1})`).
      knobs: learnable per-block scalars used by `alpha` / `beta`.
    """

    name: str
    formula: str
    order: int
    h: float = 1.0
    rk_a: tuple[tuple[float, ...], ...] = ()
    rk_b: tuple[float, ...] = ()
    iterations: int = 1
    tolerance: float | None = None
    gradient: str = "unrolled"
    alpha: tuple[Coefficient, ...] = ()
    beta: tuple[Coefficient, ...] = ()
    knobs: tuple[Knob, ...] = ()

    def __post_init__(self) -> None:
        if not (isinstance(self.h, (int, float)) and np.isfinite(self.h) and self.h > 0):
            raise ValueError(f"h={self.h!r}: the step size must be a finite number > 0")
        if not (isinstance(self.iterations, int) and self.iterations >= 1):
            raise ValueError(
                f"iterations={self.iterations!r}: an implicit scheme needs at least 1 fixed-point iteration"
            )
        if self.tolerance is not None and not (
            isinstance(self.tolerance, (int, float)) and np.isfinite(self.tolerance) and self.tolerance > 0
        ):
            raise ValueError(
                f"tolerance={self.tolerance!r}: must be a finite number > 0 (or None for a fixed number of sweeps)"
            )
        if self.gradient not in GRADIENT_MODES:
            raise ValueError(f"gradient={self.gradient!r}: must be one of {GRADIENT_MODES}")
        if bool(self.rk_b) == bool(self.beta):
            raise ValueError(f"scheme {self.name!r}: give either a Butcher tableau or multistep coefficients")
        if self.rk_b:
            s = len(self.rk_b)
            if len(self.rk_a) != s or any(len(row) != s for row in self.rk_a):
                raise ValueError(f"scheme {self.name!r}: rk_a must be {s}x{s} to match rk_b")
        elif not self.alpha:
            raise ValueError(f"scheme {self.name!r}: a multistep scheme needs alpha")
        if self.gradient == "implicit" and not (self.rk_b and self.is_implicit and len(self.rk_b) == 1):
            raise ValueError(
                f"scheme {self.name!r}: gradient='implicit' needs a one-stage implicit tableau (backward Euler); "
                "use gradient='unrolled'"
            )
        known = {knob.name for knob in self.knobs}
        used = {name for c in self.alpha + self.beta for name, _ in c.terms}
        if used - known:
            raise ValueError(f"scheme {self.name!r}: coefficients use undeclared knobs {sorted(used - known)}")

    # ----------------------------------------------------------------------------------- records

    @property
    def kind(self) -> str:
        """`"runge_kutta"` or `"multistep"`."""
        return "runge_kutta" if self.rk_b else "multistep"

    @property
    def is_implicit(self) -> bool:
        """True for a tableau with a nonzero entry on or above the diagonal."""
        return any(self.rk_a[i][j] != 0.0 for i in range(len(self.rk_b)) for j in range(i, len(self.rk_b)))

    @property
    def num_past_states(self) -> int:
        """How many past states `x_{t-1}, ...` the scheme keeps."""
        return max(len(self.alpha) - 1, 0)

    @property
    def num_past_derivatives(self) -> int:
        """How many past derivatives `F(x_{t-1}), ...` the scheme keeps."""
        return max(len(self.beta) - 1, 0)

    @property
    def evals_per_step(self) -> int:
        """`F` evaluations per step (stages x sweeps for an implicit tableau; with a `tolerance`
        the maximum, which is what a network computes)."""
        if self.kind == "multistep":
            return 1
        return len(self.rk_b) * (self.iterations if self.is_implicit else 1)

    @property
    def knob_names(self) -> tuple[str, ...]:
        return tuple(knob.name for knob in self.knobs)

    def default_knobs(self) -> dict[str, float]:
        """Each knob at the middle of its init range (what the analysis tools use when not told)."""
        return {knob.name: 0.5 * (knob.init_range[0] + knob.init_range[1]) for knob in self.knobs}

    def with_step(self, h: float) -> Scheme:
        """The same scheme with step size `h` (validated)."""
        return dataclasses.replace(self, h=h)

    def coefficients(self, knobs: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The numeric coefficients: `{"a", "b"}` (tableau) or `{"alpha", "beta"}` (multistep)."""
        if self.kind == "runge_kutta":
            return {"a": np.array(self.rk_a, dtype=float), "b": np.array(self.rk_b, dtype=float)}
        knobs = self._check_knobs(knobs)
        return {"alpha": [c(knobs) for c in self.alpha], "beta": [c(knobs) for c in self.beta]}

    def empty_history(self, x: Any) -> History:
        """A history of the right structure filled with `x` (states) and zeros (derivatives).

        Used as the scan carry before the first step, whose start rule ignores these values.
        """
        zero = x * 0
        return History((x,) * self.num_past_states, (zero,) * self.num_past_derivatives)

    def _check_knobs(self, knobs: Mapping[str, Any] | None) -> Mapping[str, Any]:
        knobs = {} if knobs is None else knobs
        missing = [name for name in self.knob_names if name not in knobs]
        if missing:
            raise ValueError(
                f"knobs={dict(knobs)!r} lacks {missing} needed by scheme {self.name!r} (knobs: {list(self.knob_names)})"
            )
        return knobs

    # ------------------------------------------------------------------------------- the rule

    def step(
        self,
        f: Callable[[Any], Any],
        x: Any,
        history: History | None = None,
        knobs: Mapping[str, Any] | None = None,
        *,
        first: Any = False,
        start: str = "euler",
        shortcut: Callable[[Any], Any] | None = None,
        project_state: Callable[[Any], Any] | None = None,
        project_derivative: Callable[[Any], Any] | None = None,
        on_solve: Callable[[dict[str, Any]], None] | None = None,
        implicit_gradient: Callable[[Callable[[Any], Any], Any, Any], Any] | None = None,
    ) -> tuple[Any, History]:
        """One step `x_t -> x_{t+1}` of the scheme.

        Args:
          f: the vector field / residual function `F`, same input and output shape
            (`[batch, height, width, channels]` in a network), except at a transition where it
            maps the input shape to the output shape.
          x: the state `x_t`.
          history: the past (`History`), or None at the first step of a multistep scheme.
          knobs: `{name: scalar}` values of the scheme's knobs (this block's `k_t`, ...).
          first: whether this is the first step (Python bool, or a traced bool scalar under
            `nn.scan`); `history=None` implies it. Ignored by one-step schemes.
          start: `"euler"` or `"copy"`, how a multistep scheme takes its first step (module doc).
          shortcut: `S` of a shape-changing transition, or None. See the module docstring.
          project_state, project_derivative: how a multistep scheme given a history at a
            transition maps past states and past derivatives to the new shape (default: both
            through `shortcut`). A network passes `S` without side effects for states and the
            linear part of `S` for derivatives (`cnn.ode.stage`).
          on_solve: called once per implicit step with `{"residual": r, "sweeps": n}`: the
            relative change of the last sweep that counted (the implicit equation's residual at
            the previous iterate, relative to the result) and the sweeps used (scalars).
          implicit_gradient: for `gradient="implicit"`, `implicit_gradient(f, x, k)` computes the
            last sweep's stage value `F(x + h a k)` from the previous one `k` (one-stage
            tableau) in place of `f(...)`; a network attaches the implicit-function-theorem
            gradient there (`cnn.ode.stage`). None: `f(x + h a k)`.

        Returns:
          `(x_next, history_next)`, `history_next` ready for the following step.
        """
        if start not in START_MODES:
            raise ValueError(f"start={start!r}: must be one of {START_MODES}")
        knobs = self._check_knobs(knobs)
        h = self.h
        if self.kind == "runge_kutta":
            if shortcut is not None:
                return shortcut(x) + h * f(x), History()
            return self._runge_kutta(f, x, on_solve, implicit_gradient), History()

        derivative = f(x)
        state = x if shortcut is None else shortcut(x)
        p, q = self.num_past_states, self.num_past_derivatives
        if history is None:
            first = True
            past_states, past_derivatives = (state,) * p, (derivative,) * q
        else:
            past_states, past_derivatives = tuple(history.states), tuple(history.derivatives)
            if len(past_states) != p or len(past_derivatives) != q:
                raise ValueError(
                    f"history has {len(past_states)} states and {len(past_derivatives)} derivatives; "
                    f"scheme {self.name!r} keeps {p} and {q}"
                )
            if shortcut is not None:
                map_state = project_state or shortcut
                map_derivative = project_derivative or shortcut
                past_states = tuple(map_state(s) for s in past_states)
                past_derivatives = tuple(map_derivative(d) for d in past_derivatives)
            if start == "copy":
                past_states = tuple(_select(first, state, s) for s in past_states)
                past_derivatives = tuple(_select(first, derivative, d) for d in past_derivatives)

        alpha = [c(knobs) for c in self.alpha]
        beta = [c(knobs) for c in self.beta]
        static_zero_alpha = [c.is_zero for c in self.alpha]
        static_zero_beta = [c.is_zero for c in self.beta]
        if start == "euler" and first is not False and first is not None:
            euler_alpha = [1.0] + [0.0] * p
            euler_beta = [1.0] + [0.0] * q
            alpha = [_select(first, e, a) for e, a in zip(euler_alpha, alpha)]
            beta = [_select(first, e, b) for e, b in zip(euler_beta, beta)]
            # a term is skippable only if it vanishes in both the start step and the scheme
            static_zero_alpha = [z and e == 0.0 for z, e in zip(static_zero_alpha, euler_alpha)]
            static_zero_beta = [z and e == 0.0 for z, e in zip(static_zero_beta, euler_beta)]

        states = (state,) + past_states
        derivatives = (derivative,) + past_derivatives
        x_next: Any = 0
        for a, s, zero in zip(alpha, states, static_zero_alpha):
            if not zero:
                x_next = x_next + a * s
        update: Any = 0
        for b, d, zero in zip(beta, derivatives, static_zero_beta):
            if not zero:
                update = update + b * d
        x_next = x_next + h * update
        return x_next, History(states[:p], derivatives[:q])

    def _runge_kutta(
        self,
        f: Callable[[Any], Any],
        x: Any,
        on_solve: Callable[[dict[str, Any]], None] | None = None,
        implicit_gradient: Callable[[Callable[[Any], Any], Any, Any], Any] | None = None,
    ) -> Any:
        a, b, h = self.rk_a, self.rk_b, self.h
        s = len(b)

        def stage_input(i: int, ks: list[Any]) -> Any:
            z = x
            for j, k in enumerate(ks):
                if a[i][j] != 0.0:
                    z = z + (h * a[i][j]) * k
            return z

        def combine(ks: list[Any]) -> Any:
            update: Any = 0
            for bi, k in zip(b, ks):
                if bi != 0.0:
                    update = update + bi * k
            return x + h * update

        if not self.is_implicit:
            ks: list[Any] = []
            for i in range(s):
                ks.append(f(stage_input(i, ks)))
            return combine(ks)

        # Fixed-point (Jacobi) sweeps from K = 0: the first sweep evaluates F(x) for every stage.
        tolerance = self.tolerance
        track = tolerance is not None or on_solve is not None
        ks = [f(x) for _ in range(s)]
        if track:
            residual = _relative_change(h, ks, None, combine(ks))
            sweeps: Any = 1
            done: Any = False if tolerance is None else residual <= tolerance
        for sweep in range(2, self.iterations + 1):
            last_implicit = implicit_gradient is not None and sweep == self.iterations
            if last_implicit:  # one stage (checked by __post_init__): K = F(x + h a K)
                new = [implicit_gradient(f, x, ks[0])]
            else:
                new = [f(stage_input(i, ks)) for i in range(s)]
            if not track:
                ks = new
                continue
            change = _relative_change(h, new, ks, combine(new))
            if tolerance is None:
                ks, residual, sweeps = new, change, sweep
                continue
            xp = _namespace(change, *new)
            # Converged sweeps keep their K. (The implicit-gradient sweep is always taken: the
            # gradient enters there; after convergence it moves K by at most the tolerance.)
            ks = new if last_implicit else [xp.where(done, k, n) for k, n in zip(ks, new)]
            residual = xp.where(done, residual, change)
            sweeps = xp.where(done, sweeps, sweep)
            done = done | (change <= tolerance)
        if on_solve is not None:
            on_solve({"residual": residual, "sweeps": sweeps})
        return combine(ks)


def _namespace(*values: Any) -> Any:
    """`jax.numpy` when any value is a JAX array (or tracer), else numpy: the step keeps numpy
    float64 / complex inputs (the analysis tools) in numpy."""
    return jnp if any(isinstance(v, jax.Array) for v in values) else np


def _sum_of_squares(value: Any) -> Any:
    xp = _namespace(value)
    value = xp.asarray(value)
    if xp is jnp and jnp.issubdtype(value.dtype, jnp.floating):
        value = value.astype(jnp.promote_types(value.dtype, jnp.float32))  # bfloat16 sums lose digits
    return xp.sum(xp.abs(value) ** 2)


def _relative_change(h: float, new: list[Any], old: list[Any] | None, result: Any) -> Any:
    """`|h (new - old)| / |result|` over every stage (old = 0 when None): the change of the stage
    inputs made by a sweep, relative to the step's result."""
    change = sum(_sum_of_squares(h * (n if old is None else n - o)) for n, o in zip(new, old or new))
    xp = _namespace(change)
    scale = xp.sqrt(_sum_of_squares(result))
    return xp.sqrt(change) / xp.maximum(scale, xp.finfo(xp.asarray(scale).dtype).tiny)


# ------------------------------------------------------------------------------------ catalogue


def _const(*values: float) -> tuple[Coefficient, ...]:
    return tuple(Coefficient(float(v)) for v in values)


def euler(h: float = 1.0) -> Scheme:
    """Forward Euler: `x_{t+1} = x_t + h F(x_t)`. Order 1, 1 evaluation. `h = 1`: the plain ResNet."""
    return Scheme("euler", "x_{t+1} = x_t + h F(x_t)", order=1, h=h, rk_a=((0.0,),), rk_b=(1.0,))


def lm(
    h: float = 1.0,
    k_init: tuple[float, float] = (-0.1, 0.0),
    constrain: bool = False,
    k_bounds: tuple[float, float] = (-1.0, 1.0),
) -> Scheme:
    """LM-ResNet (Lu, Zhong, Li, Dong, ICML 2018), a linear two-step scheme with learnable `k_t`:

        x_{t+1} = (1 - k_t) x_t + k_t x_{t-1} + h F(x_t).

    One learnable scalar per block, initialized `k_t ~ U[-0.1, 0]` as in the paper.

    Accuracy: Taylor expansion gives the modified equation `(1 + k) x' + h (1 - k)/2 x'' = F`, so
    the scheme is a consistent first-order discretization of `x' = F / (1 + k)` (for `k = 1` it is
    leapfrog on that field, order 2); `order = 1`.

    Zero-stability: with `F = 0` the recurrence `x_{t+1} = (1-k) x_t + k x_{t-1}` has
    characteristic polynomial `rho(z) = z^2 - (1-k) z - k = (z - 1)(z + k)`, roots `1` and `-k`.
    The root condition (all roots in the closed unit disc, those on the circle simple) holds iff
    `-1 < k <= 1`: `k = -1` makes `1` a double root (linear growth), `k = 1` gives the simple roots
    `+-1` (weakly stable, like leapfrog), `|k| < 1` is strongly stable. `constrain=True` keeps
    `k_t` in the open interval `k_bounds` (default `(-1, 1)`, the strongly stable set) by the
    reparametrization `k = tanh(raw)`; `k_init` must then lie strictly inside `k_bounds`.

    Start and transitions as in the reference code (github.com/2prime/LM-ResNet, `MResNet.py`,
    classes `MResNet`/`MResNetC`): the network's first block is a plain residual step
    (`x = blocks[0](x) + x`, the history becoming `x_0`), and every shape-changing block is a
    plain residual step with the projection shortcut `x = b(x) + downsample(x)` whose
    `downsample(x_t)` becomes the next block's `x_{t-1}` (the code keeps commented-out lines
    for projecting the older state too). In `cnn.ode` terms: `start="euler"` and
    `history_at_entry="restart"`, the defaults. (The reference writes the update as
    `ks[i] * x_t + (1 - ks[i]) * x_{t-1} + F`, i.e. its `ks = 1 - k`, initialized U[1, 1.1] in
    `MResNet`.)
    """
    knob = Knob("k", tuple(map(float, k_init)), tuple(map(float, k_bounds)) if constrain else None)
    return Scheme(
        "lm",
        "x_{t+1} = (1 - k_t) x_t + k_t x_{t-1} + h F(x_t)   (k_t learnable, one per block)",
        order=1,
        h=h,
        alpha=(Coefficient(1.0, (("k", -1.0),)), Coefficient(0.0, (("k", 1.0),))),
        beta=_const(1.0),
        knobs=(knob,),
    )


def lm_fixed(k: float = -0.05, h: float = 1.0) -> Scheme:
    """LM-ResNet with a fixed `k`: `x_{t+1} = (1 - k) x_t + k x_{t-1} + h F(x_t)` (no parameters).

    Order 1 for `x' = F / (1 + k)` (see `lm`); zero-stable iff `-1 < k <= 1`.
    """
    if not np.isfinite(k):
        raise ValueError(f"k={k!r}: must be a finite number")
    k = float(k)
    return Scheme(
        "lm_fixed",
        f"x_{{t+1}} = (1 - k) x_t + k x_{{t-1}} + h F(x_t)   (k = {k:g} fixed)",
        order=1,
        h=h,
        alpha=_const(1.0 - k, k),
        beta=_const(1.0),
    )


def midpoint(h: float = 1.0) -> Scheme:
    """Explicit midpoint (RK2): `x_{t+1} = x_t + h F(x_t + h/2 F(x_t))`. Order 2, 2 evaluations."""
    return Scheme(
        "midpoint", "x_{t+1} = x_t + h F(x_t + h/2 F(x_t))", order=2, h=h,
        rk_a=((0.0, 0.0), (0.5, 0.0)), rk_b=(0.0, 1.0),
    )


def heun(h: float = 1.0) -> Scheme:
    """Heun (RK2, explicit trapezoid): `K1 = F(x_t)`, `K2 = F(x_t + h K1)`,
    `x_{t+1} = x_t + h/2 (K1 + K2)`. Order 2, 2 evaluations."""
    return Scheme(
        "heun", "K1 = F(x_t), K2 = F(x_t + h K1), x_{t+1} = x_t + h/2 (K1 + K2)", order=2, h=h,
        rk_a=((0.0, 0.0), (1.0, 0.0)), rk_b=(0.5, 0.5),
    )


def rk4(h: float = 1.0) -> Scheme:
    """Classical Runge-Kutta: `K1 = F(x)`, `K2 = F(x + h/2 K1)`, `K3 = F(x + h/2 K2)`,
    `K4 = F(x + h K3)`, `x_{t+1} = x_t + h/6 (K1 + 2 K2 + 2 K3 + K4)`. Order 4, 4 evaluations."""
    return Scheme(
        "rk4",
        "K1 = F(x), K2 = F(x + h/2 K1), K3 = F(x + h/2 K2), K4 = F(x + h K3), "
        "x_{t+1} = x_t + h/6 (K1 + 2 K2 + 2 K3 + K4)",
        order=4, h=h,
        rk_a=((0.0, 0.0, 0.0, 0.0), (0.5, 0.0, 0.0, 0.0), (0.0, 0.5, 0.0, 0.0), (0.0, 0.0, 1.0, 0.0)),
        rk_b=(1 / 6, 1 / 3, 1 / 3, 1 / 6),
    )


def ab2(h: float = 1.0) -> Scheme:
    """Adams-Bashforth 2: `x_{t+1} = x_t + h (3/2 F(x_t) - 1/2 F(x_{t-1}))`.

    Order 2 with 1 evaluation per step: `F(x_{t-1})` is the previous block's output, kept in
    the history. (In a network with untied weights it is `F_{t-1}(x_{t-1})`, the previous block.)
    """
    return Scheme(
        "ab2", "x_{t+1} = x_t + h (3/2 F(x_t) - 1/2 F(x_{t-1}))", order=2, h=h,
        alpha=_const(1.0), beta=_const(1.5, -0.5),
    )


def leapfrog(h: float = 1.0) -> Scheme:
    """Leapfrog (explicit midpoint two-step): `x_{t+1} = x_{t-1} + 2h F(x_t)`.

    Order 2, 1 evaluation. Characteristic roots at `h = 0`: `+1, -1` (weakly stable only: the
    parasitic root `-1` makes it unstable for any decaying linear field in the long run).
    """
    return Scheme(
        "leapfrog", "x_{t+1} = x_{t-1} + 2h F(x_t)", order=2, h=h,
        alpha=_const(0.0, 1.0), beta=_const(2.0),
    )


def backward_euler(
    h: float = 1.0, iterations: int = 3, tolerance: float | None = None, gradient: str = "unrolled"
) -> Scheme:
    """Backward (implicit) Euler `x_{t+1} = x_t + h F(x_{t+1})`, solved by fixed-point iteration:

        z_0 = x_t,   z_{i+1} = x_t + h F(z_i),   x_{t+1} = z_n.

    Without `tolerance`, `n = iterations` sweeps: a fixed explicit rule (`iterations = 1` is
    forward Euler, 2 is `x + h F(x + h F(x))`) that approaches the implicit solution only when
    `h * Lip(F) < 1` (each sweep multiplies the distance by about that factor). With a
    `tolerance`, sweeping stops at the first `i` with `|z_{i+1} - z_i| / |z_{i+1}| <= tolerance`
    (`|z_{i+1} - z_i|` is the implicit equation's residual at `z_i`), `iterations` being the
    maximum; the network reports the residual reached and the sweeps used per block
    (`cnn.ode.stage.implicit_solve_stats`), since nothing guarantees convergence at `h = 1`.
    `gradient="implicit"` differentiates the solution by the implicit-function theorem
    instead of through the sweeps. Order 1.
    """
    if tolerance is None:
        solve = f"{iterations} fixed-point sweeps z <- x_t + h F(z) from z_0 = x_t; no tolerance"
    else:
        solve = (
            f"fixed-point sweeps z <- x_t + h F(z) from z_0 = x_t until |dz|/|z| <= {tolerance:g}, "
            f"at most {iterations}"
        )
    return Scheme(
        "backward_euler",
        f"x_{{t+1}} = x_t + h F(x_{{t+1}})   ({solve})",
        order=1, h=h, rk_a=((1.0,),), rk_b=(1.0,), iterations=iterations, tolerance=tolerance, gradient=gradient,
    )


def two_step(
    h: float = 1.0,
    a1_init: tuple[float, float] = (0.0, 0.0),
    b1_init: tuple[float, float] = (0.0, 0.0),
    constrain: bool = False,
    a1_bounds: tuple[float, float] = (-1.0, 1.0),
) -> Scheme:
    """The general explicit linear two-step scheme, learnable, with consistency built in:

        x_{t+1} = (1 - a1) x_t + a1 x_{t-1} + h ((1 + a1 - b1) F(x_t) + b1 F(x_{t-1})).

    With `rho(z) = z^2 - a0 z - a1` and `sigma(z) = b0 z + b1`, consistency is `rho(1) = 0`
    (`a0 = 1 - a1`) and `rho'(1) = sigma(1)` (`b0 = 1 + a1 - b1`), so the two free knobs `a1`,
    `b1` (one of each per block) range over exactly the consistent schemes: order >= 1 for every
    value. Forward Euler is `(0, 0)` (the default init), AB2 `(0, -1/2)`, leapfrog `(1, 0)`.
    Zero-stable iff `-1 < a1 <= 1` (roots `1`, `-a1`, as for LM); `constrain=True` keeps `a1`
    inside the open interval `a1_bounds`.
    """
    knobs = (
        Knob("a1", tuple(map(float, a1_init)), tuple(map(float, a1_bounds)) if constrain else None),
        Knob("b1", tuple(map(float, b1_init))),
    )
    return Scheme(
        "two_step",
        "x_{t+1} = (1 - a1) x_t + a1 x_{t-1} + h ((1 + a1 - b1) F(x_t) + b1 F(x_{t-1}))   (a1, b1 learnable)",
        order=1,
        h=h,
        alpha=(Coefficient(1.0, (("a1", -1.0),)), Coefficient(0.0, (("a1", 1.0),))),
        beta=(Coefficient(1.0, (("a1", 1.0), ("b1", -1.0))), Coefficient(0.0, (("b1", 1.0),))),
        knobs=knobs,
    )


CATALOGUE: dict[str, Callable[..., Scheme]] = {
    "euler": euler,
    "lm": lm,
    "lm_fixed": lm_fixed,
    "midpoint": midpoint,
    "heun": heun,
    "rk4": rk4,
    "ab2": ab2,
    "leapfrog": leapfrog,
    "backward_euler": backward_euler,
    "two_step": two_step,
}
ALIASES = {"resnet": "euler", "forward_euler": "euler", "rk2": "midpoint", "implicit_euler": "backward_euler"}


def available_schemes() -> list[str]:
    """All scheme names accepted by `get_scheme`, aliases included."""
    return sorted(set(CATALOGUE) | set(ALIASES))


def get_scheme(name: str | Mapping[str, Any] | SchemeSpec | Scheme, **options: Any) -> Scheme:
    """A scheme by name, e.g. `get_scheme("lm", k_init=(-0.1, 0.0), constrain=True)`.

    Names: euler (alias resnet, forward_euler), lm, lm_fixed, midpoint (alias rk2), heun, rk4,
    ab2, leapfrog, backward_euler (alias implicit_euler), two_step. Every scheme takes `h`; the
    other options are the keyword arguments of the constructor of the same name in this module.
    A `Scheme` passes through unchanged (with no options). A config's scheme value (a mapping
    `{"name": "lm", "constrain": True}` or a `SchemeSpec`, see `SchemeSpec.parse`) is accepted
    too; `options` then add to its own.

    Raises:
      ValueError: unknown name, unknown option (the message names it and lists the valid ones),
        or an invalid value (`h <= 0`, `iterations < 1`, `k_init` outside `k_bounds`, ...).
    """
    if isinstance(name, Scheme):
        if options:
            raise ValueError(f"options {sorted(options)} cannot be applied to an already built Scheme {name.name!r}")
        return name
    if isinstance(name, (Mapping, SchemeSpec)) or hasattr(name, "to_dict"):
        spec = SchemeSpec.parse(name)
        both = sorted(set(spec.options) & set(options))
        if both:
            raise ValueError(f"scheme option(s) {both} given twice: in the scheme value {name!r} and as keywords")
        return get_scheme(spec.name, **spec.options, **options)
    if not isinstance(name, str):
        raise ValueError(f"scheme={name!r}: expected a scheme name, a mapping with a 'name', or a Scheme")
    key = ALIASES.get(name.lower(), name.lower())
    if key not in CATALOGUE:
        raise ValueError(f"unknown scheme name={name!r}; valid names: {', '.join(available_schemes())}")
    constructor = CATALOGUE[key]
    valid = list(inspect.signature(constructor).parameters)
    for option in options:
        if option not in valid:
            raise ValueError(f"scheme {key!r} has no option {option}=...; valid options: {', '.join(valid)}")
    return constructor(**options)


@dataclasses.dataclass(frozen=True)
class SchemeSpec:
    """A scheme and its options as one config value: what an experiment config writes at its one
    scheme address (`config.schemes[i]` of a scheme comparison or a dynamics experiment,
    `config.variants[v].scheme` of an ablation).

    The value is a name (`"lm"`) or a mapping of a name, the scheme's options and an optional
    label: `{"name": "backward_euler", "iterations": 20, "tolerance": 1e-3}`, `{"name": "lm",
    "constrain": True, "label": "lm_constrained"}`. The label names the cells and table rows
    (default: the name); two specs of one experiment need distinct labels.

    Attributes:
      name: a scheme name for `get_scheme` (as written; aliases allowed).
      options: the scheme's keyword options (`h`, `k_init`, `iterations`, ...), a plain dict.
      label: the row / cell label.
    """

    name: str
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    label: str = ""

    @classmethod
    def parse(cls, value: str | Mapping[str, Any] | SchemeSpec) -> SchemeSpec:
        """A `SchemeSpec` from a config value (a name, a mapping or a spec); checks the name and
        the options by building the scheme once, so a typo fails when the config is read."""
        if isinstance(value, SchemeSpec):
            return value
        value = _plain(value)  # a ConfigDict is not a Mapping
        if isinstance(value, str):
            spec = cls(name=value, options={}, label=value)
        elif isinstance(value, Mapping):
            fields = {key: _plain(item) for key, item in dict(value).items()}
            name = fields.pop("name", None)
            if not isinstance(name, str) or not name:
                raise ValueError(f"scheme value {dict(value)!r} has no 'name': write e.g. "
                                 "{'name': 'backward_euler', 'iterations': 20}")
            label = fields.pop("label", name)
            if not isinstance(label, str) or not label or any(c in label for c in "/\\ "):
                raise ValueError(f"scheme label={label!r}: expected a non-empty name without spaces or slashes "
                                 "(it names run directories)")
            spec = cls(name=name, options=fields, label=label)
        else:
            raise ValueError(f"scheme value {value!r} ({type(value).__name__}): expected a scheme name or a mapping "
                             "like {'name': 'lm', 'constrain': True}")
        get_scheme(spec.name, **spec.options)
        return spec

    def build(self) -> Scheme:
        """The `Scheme` this value names."""
        return get_scheme(self.name, **self.options)

    def model_options(self) -> dict[str, Any]:
        """The model keywords that build a network with this scheme: `{"scheme": name}` and,
        with options, `{"scheme_options": {...}}` (what `cnn.models.create` takes)."""
        return {"scheme": self.name, **({"scheme_options": dict(self.options)} if self.options else {})}


def _plain(value: Any) -> Any:
    """Config containers as plain Python: ConfigDict / mappings to dicts, lists to tuples."""
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return tuple(_plain(item) for item in value)
    return value


def scheme_specs(values: Any) -> tuple[SchemeSpec, ...]:
    """The specs of a config's scheme list (`config.schemes`), with distinct labels.

    Raises:
      ValueError: an empty list, an invalid value (see `SchemeSpec.parse`), or two specs with one
        label (give one of them a `"label"`).
    """
    if isinstance(values, (str, Mapping)) or values is None:
        raise ValueError(f"schemes={values!r}: expected a tuple of scheme values, e.g. ('euler', 'lm')")
    specs = tuple(SchemeSpec.parse(value) for value in values)
    if not specs:
        raise ValueError("schemes is empty; name at least one scheme (e.g. ('euler',))")
    labels = [spec.label for spec in specs]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise ValueError(f"schemes have the label(s) {repeated} more than once; give each variant its own "
                         "'label', e.g. {'name': 'lm', 'constrain': True, 'label': 'lm_constrained'}")
    return specs


__all__ = [
    "ALIASES",
    "CATALOGUE",
    "GRADIENT_MODES",
    "START_MODES",
    "Coefficient",
    "History",
    "Knob",
    "Scheme",
    "SchemeSpec",
    "ab2",
    "available_schemes",
    "backward_euler",
    "euler",
    "get_scheme",
    "heun",
    "leapfrog",
    "lm",
    "lm_fixed",
    "midpoint",
    "rk4",
    "scheme_specs",
    "two_step",
]
