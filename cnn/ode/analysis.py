"""Numerical diagnostics of the schemes: convergence order, linear stability, learned `k_t`.

Everything here drives `Scheme.step` -- the exact code a network stage runs -- with a known
vector field in float64 numpy (or complex numbers), so the diagnostics validate the network's
update rule itself, not a re-implementation.

- `integrate`, `convergence_study`: global error at time T against an exact solution for
  N = 8 ... 512 steps and its log-log slope (the observed order).
- `step_matrix`, `characteristic_roots`, `amplification_factor`: the scheme applied to the test
  equation `x' = lambda x` is a linear map on (x_t, past states, past derivatives); its
  eigenvalues are the roots of the characteristic polynomial `rho(zeta) - z sigma(zeta)`,
  `z = h lambda` (plus zeros for stored derivatives). For a one-step scheme the single
  eigenvalue is the amplification factor R(z).
- `stability_region`, `plot_stability_regions`: `{z : spectral radius <= 1}`.
- `satisfies_root_condition`, `zero_stability_interval`: the range of a knob (LM-ResNet's k)
  for which the scheme is zero-stable.
- `learned_knobs`, `plot_learned_knobs`: read the trained `k_t` of an LM-ResNet per block.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from cnn.ode.schemes import History, Scheme, get_scheme
from cnn.ode.stage import knob_values

DEFAULT_STEPS = (8, 16, 32, 64, 128, 256, 512)


# ------------------------------------------------------------------------------ test problems


def rotation_decay(decay: float = 0.5, omega: float = 2.0) -> tuple[Callable, Callable, np.ndarray]:
    """The linear field `x' = A x`, `A = [[-decay, -omega], [omega, -decay]]` (a damped rotation).

    Returns `(f, exact, A)`: `f(x)` for `x: [..., 2]`, `exact(x0, t) = expm(A t) x0`.
    """
    a = np.array([[-decay, -omega], [omega, -decay]], dtype=np.float64)

    def f(x: np.ndarray) -> np.ndarray:
        return x @ a.T

    def exact(x0: np.ndarray, t: float) -> np.ndarray:
        c, s = np.cos(omega * t), np.sin(omega * t)
        return np.exp(-decay * t) * (np.asarray(x0) @ np.array([[c, -s], [s, c]]).T)

    return f, exact, a


def stuart_landau(omega: float = 1.0) -> tuple[Callable, Callable]:
    """The nonlinear field `z' = (1 + i omega) z - |z|^2 z` on `z = x + i y` (Hopf normal form).

    Exact solution: `r(t) = r0 e^t / sqrt(1 + r0^2 (e^{2t} - 1))`, `theta(t) = theta0 + omega t`.
    Returns `(f, exact)` acting on `x: [..., 2]`.
    """

    def f(x: np.ndarray) -> np.ndarray:
        u, v = x[..., 0], x[..., 1]
        r2 = u * u + v * v
        return np.stack([u - omega * v - r2 * u, omega * u + v - r2 * v], axis=-1)

    def exact(x0: np.ndarray, t: float) -> np.ndarray:
        x0 = np.asarray(x0, dtype=np.float64)
        r0 = np.hypot(x0[..., 0], x0[..., 1])
        theta = np.arctan2(x0[..., 1], x0[..., 0]) + omega * t
        r = r0 * np.exp(t) / np.sqrt(1.0 + r0**2 * (np.exp(2 * t) - 1.0))
        return np.stack([r * np.cos(theta), r * np.sin(theta)], axis=-1)

    return f, exact


# --------------------------------------------------------------------------------- convergence


def integrate(
    scheme: Scheme | str,
    f: Callable[[Any], Any],
    x0: Any,
    num_steps: int,
    knobs: Mapping[str, Any] | None = None,
    *,
    start: str = "euler",
    return_trajectory: bool = False,
) -> Any:
    """Applies `scheme.step` `num_steps` times from `x0` (with the scheme's own `h`).

    `knobs` default to `scheme.default_knobs()` (the middle of each init range), here and in the
    other analysis functions. Returns `x_N`, or the list `[x_0, ..., x_N]` when `return_trajectory`.
    """
    scheme = get_scheme(scheme)
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps}: must be >= 1")
    knobs = scheme.default_knobs() if knobs is None else knobs
    x, history = x0, None
    trajectory = [x0]
    for _ in range(num_steps):
        x, history = scheme.step(f, x, history, knobs, start=start)
        trajectory.append(x)
    return trajectory if return_trajectory else x


@dataclasses.dataclass(frozen=True)
class ConvergenceResult:
    """Global errors `|x_N - x(T)|` for several N and the fitted order (slope of log err vs log h)."""

    scheme: str
    steps: tuple[int, ...]
    step_sizes: tuple[float, ...]
    errors: tuple[float, ...]
    slope: float


def fit_slope(step_sizes: Sequence[float], errors: Sequence[float]) -> float:
    """Least-squares slope of `log(error)` against `log(h)`."""
    log_h, log_e = np.log(np.asarray(step_sizes)), np.log(np.asarray(errors))
    return float(np.polyfit(log_h, log_e, 1)[0])


def convergence_study(
    scheme: Scheme | str,
    f: Callable[[np.ndarray], np.ndarray],
    exact: Callable[[np.ndarray, float], np.ndarray],
    x0: np.ndarray,
    t_final: float = 1.0,
    steps: Sequence[int] = DEFAULT_STEPS,
    knobs: Mapping[str, Any] | None = None,
    *,
    start: str = "euler",
) -> ConvergenceResult:
    """Integrates to `t_final` with `h = t_final / N` for every N in `steps`, in float64.

    Args:
      scheme: the scheme (its own `h` is replaced).
      f: vector field on `[..., d]` float64 arrays.
      exact: `exact(x0, t)`, the true solution.
      x0: initial state `[..., d]`.
    """
    scheme = get_scheme(scheme)
    x0 = np.asarray(x0, dtype=np.float64)
    target = exact(x0, t_final)
    sizes, errors = [], []
    for n in steps:
        h = t_final / n
        xn = integrate(scheme.with_step(h), f, x0, n, knobs, start=start)
        sizes.append(h)
        errors.append(float(np.max(np.abs(np.asarray(xn) - target))))
    return ConvergenceResult(scheme.name, tuple(steps), tuple(sizes), tuple(errors), fit_slope(sizes, errors))


def plot_convergence(results: Sequence[ConvergenceResult], path: str | os.PathLike, title: str = "") -> str:
    """Log-log plot of global error against step size, one line per scheme; saved to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for result in results:
        ax.loglog(result.step_sizes, result.errors, "o-", label=f"{result.scheme} (slope {result.slope:.2f})")
    ax.set_xlabel("step size h")
    ax.set_ylabel("global error at T")
    ax.set_title(title or "convergence order")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


# ----------------------------------------------------------------------------- linear stability


def step_matrix(scheme: Scheme | str, z: Any, knobs: Mapping[str, Any] | None = None) -> np.ndarray:
    """The one-step map of the scheme on `x' = lambda x` (`z = h lambda`), as a matrix.

    The state is `(x_t, x_{t-1}, ..., F_{t-1}, ...)` of dimension `d = 1 + past states + past
    derivatives`; column `i` is `scheme.step` applied to the `i`-th unit state with
    `F(x) = lambda x` (the same code as the network; fixed-point sweeps included).

    Args:
      z: complex scalar or array of any shape.

    Returns:
      complex array `[*z.shape, d, d]`.
    """
    scheme = get_scheme(scheme)
    z = np.asarray(z, dtype=np.complex128)
    lam = z / scheme.h
    knobs = scheme.default_knobs() if knobs is None else knobs
    p, q = scheme.num_past_states, scheme.num_past_derivatives
    d = 1 + p + q

    def f(x: np.ndarray) -> np.ndarray:
        return lam * x

    columns = []
    for i in range(d):
        unit = [np.full(z.shape, 1.0 + 0j) if j == i else np.zeros(z.shape, complex) for j in range(d)]
        history = History(tuple(unit[1 : 1 + p]), tuple(unit[1 + p :])) if scheme.kind == "multistep" else None
        x_next, new = scheme.step(f, unit[0], history, knobs, first=False)
        parts = [x_next, *new.states, *new.derivatives] if scheme.kind == "multistep" else [x_next]
        columns.append(np.stack([np.broadcast_to(np.asarray(v, complex), z.shape) for v in parts], axis=-1))
    return np.stack(columns, axis=-1)


def characteristic_roots(scheme: Scheme | str, z: Any = 0.0, knobs: Mapping[str, Any] | None = None) -> np.ndarray:
    """Eigenvalues of `step_matrix` (`[*z.shape, d]`), sorted by decreasing modulus.

    For a multistep scheme they are the roots of `rho(zeta) - z sigma(zeta)` padded with zeros;
    at `z = 0` the roots of `rho` (zero-stability).
    """
    roots = np.linalg.eigvals(step_matrix(scheme, z, knobs))
    order = np.argsort(-np.abs(roots), axis=-1, kind="stable")
    return np.take_along_axis(roots, order, axis=-1)


def amplification_factor(scheme: Scheme | str, z: Any, knobs: Mapping[str, Any] | None = None) -> np.ndarray:
    """`R(z)` with `x_{t+1} = R(z) x_t` on `x' = lambda x`, for one-step (Runge-Kutta) schemes."""
    scheme = get_scheme(scheme)
    if scheme.kind != "runge_kutta":
        raise ValueError(
            f"scheme={scheme.name!r} is a multistep scheme; it has characteristic roots, not one "
            "amplification factor (use characteristic_roots)"
        )
    return step_matrix(scheme, z, knobs)[..., 0, 0]


def spectral_radius(scheme: Scheme | str, z: Any, knobs: Mapping[str, Any] | None = None) -> np.ndarray:
    """Largest root modulus at each `z`."""
    return np.abs(characteristic_roots(scheme, z, knobs))[..., 0]


def stability_region(
    scheme: Scheme | str, real: np.ndarray, imag: np.ndarray, knobs: Mapping[str, Any] | None = None
) -> np.ndarray:
    """Boolean grid `[len(imag), len(real)]`: spectral radius <= 1 at `z = real + i imag`."""
    zz = np.asarray(real)[None, :] + 1j * np.asarray(imag)[:, None]
    return spectral_radius(scheme, zz, knobs) <= 1.0 + 1e-9


def plot_stability_regions(
    schemes: Sequence[Scheme | str | tuple[Scheme | str, Mapping[str, Any]]],
    path: str | os.PathLike,
    *,
    extent: tuple[float, float, float, float] = (-4.0, 2.0, -3.5, 3.5),
    resolution: int = 241,
) -> str:
    """One panel per scheme: the region `{z = h lambda : spectral radius <= 1}` shaded.

    Entries are schemes, names, or `(scheme, knobs)` pairs (LM-ResNet needs its `k`). Leapfrog's
    region is the segment `[-i, i]` of the imaginary axis (zero area). Saved to `path`.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = [item if isinstance(item, tuple) else (item, None) for item in schemes]
    cols = min(4, len(entries))
    rows = -(-len(entries) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    real = np.linspace(extent[0], extent[1], resolution)
    imag = np.linspace(extent[2], extent[3], resolution)
    zz = real[None, :] + 1j * imag[:, None]
    for ax, (scheme, knobs) in zip(axes.flat, entries):
        scheme = get_scheme(scheme)
        radius = spectral_radius(scheme, zz, knobs)
        ax.contourf(real, imag, radius <= 1.0 + 1e-9, levels=[0.5, 1.5], colors=["tab:blue"], alpha=0.35)
        ax.contour(real, imag, radius, levels=[1.0], colors=["tab:blue"], linewidths=1.0)
        ax.axhline(0, color="k", lw=0.5)
        ax.axvline(0, color="k", lw=0.5)
        label = scheme.name + ("" if not knobs else " " + ", ".join(f"{k}={v:g}" for k, v in knobs.items()))
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("Re z")
        ax.set_ylabel("Im z")
        ax.set_aspect("equal")
    for ax in list(axes.flat)[len(entries) :]:
        ax.axis("off")
    fig.suptitle("stability regions {z = h lambda : spectral radius <= 1}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def satisfies_root_condition(roots: np.ndarray, tol: float = 1e-9, simple_tol: float = 1e-7) -> bool:
    """The root condition: every root has `|zeta| <= 1`, and roots on the unit circle are simple.

    Roots within `simple_tol` of each other count as repeated (a double root computed in floating
    point splits by about sqrt(machine epsilon)).
    """
    roots = np.asarray(roots).ravel()
    if np.any(np.abs(roots) > 1.0 + tol):
        return False
    on_circle = roots[np.abs(np.abs(roots) - 1.0) <= max(tol, simple_tol)]
    for i in range(len(on_circle)):
        for j in range(i + 1, len(on_circle)):
            if abs(on_circle[i] - on_circle[j]) < simple_tol:
                return False
    return True


@dataclasses.dataclass(frozen=True)
class Interval:
    """A real interval with open or closed ends."""

    low: float
    high: float
    low_closed: bool
    high_closed: bool

    def __contains__(self, value: float) -> bool:
        above = value >= self.low if self.low_closed else value > self.low
        below = value <= self.high if self.high_closed else value < self.high
        return bool(above and below)

    def __str__(self) -> str:
        return f"{'[' if self.low_closed else '('}{self.low:.6g}, {self.high:.6g}{']' if self.high_closed else ')'}"


def zero_stability_interval(
    scheme: Scheme | str,
    knob: str | None = None,
    *,
    knobs: Mapping[str, float] | None = None,
    around: float = 0.0,
    search: tuple[float, float] = (-4.0, 4.0),
    num: int = 801,
) -> Interval:
    """The connected set of values of `knob` around `around` for which the scheme is zero-stable.

    The roots at `z = 0` (`characteristic_roots(scheme, 0, ...)`) are tested with
    `satisfies_root_condition` on a grid over `search`; each end is located by bisection (to
    within the root-separation tolerance 1e-7 where two roots merge), reported rounded to 6
    decimals, and counted as included when the root condition holds at the rounded value (ends
    at "nice" values such as -1 and 1 are classified exactly).

    Args:
      scheme: a scheme with knobs (LM-ResNet: `knob="k"`).
      knob: the knob to vary (default: the scheme's only knob).
      knobs: values of the other knobs (two_step's `b1` does not affect zero-stability).
    """
    scheme = get_scheme(scheme)
    if not scheme.knobs:
        raise ValueError(f"scheme={scheme.name!r} has no knobs; its zero-stability is characteristic_roots(scheme, 0)")
    if knob is None:
        if len(scheme.knobs) != 1:
            raise ValueError(f"knob=None is ambiguous for scheme {scheme.name!r}; choose one of {list(scheme.knob_names)}")
        knob = scheme.knob_names[0]
    if knob not in scheme.knob_names:
        raise ValueError(f"knob={knob!r}: scheme {scheme.name!r} has knobs {list(scheme.knob_names)}")
    others = {name: 0.0 for name in scheme.knob_names}
    others.update(knobs or {})

    def stable(value: float) -> bool:
        return satisfies_root_condition(characteristic_roots(scheme, 0.0, {**others, knob: value}))

    if not stable(around):
        raise ValueError(f"around={around}: the scheme is not zero-stable there; choose a stable {knob} value")
    grid = np.round(np.linspace(search[0], search[1], num), 12)
    flags = np.array([stable(v) for v in grid])
    centre = int(np.argmin(np.abs(grid - around)))
    if not flags[centre]:
        flags[centre] = True  # the grid point nearest `around` may fall just outside

    def bisect(inside: float, outside: float) -> float:
        for _ in range(200):
            mid = 0.5 * (inside + outside)
            if stable(mid):
                inside = mid
            else:
                outside = mid
            if abs(inside - outside) < 1e-12:
                break
        return 0.5 * (inside + outside)

    lo_index = centre
    while lo_index > 0 and flags[lo_index - 1]:
        lo_index -= 1
    hi_index = centre
    while hi_index < len(grid) - 1 and flags[hi_index + 1]:
        hi_index += 1
    low = -np.inf if lo_index == 0 else bisect(grid[lo_index], grid[lo_index - 1])
    high = np.inf if hi_index == len(grid) - 1 else bisect(grid[hi_index], grid[hi_index + 1])
    low = float(round(low, 6)) if np.isfinite(low) else low
    high = float(round(high, 6)) if np.isfinite(high) else high
    low_closed = bool(np.isfinite(low) and stable(low))
    high_closed = bool(np.isfinite(high) and stable(high))
    return Interval(
        low,
        high,
        low_closed,
        high_closed,
    )


# --------------------------------------------------------------------------------- learned k_t


def learned_knobs(params: Mapping[str, Any], scheme: Scheme | str = "lm", knob: str = "k") -> np.ndarray:
    """All blocks' values of `knob` in a trained model, concatenated in stage order: `[blocks]`.

    `params` is the model's `params` collection (or a full variables dict holding it).
    """
    scheme = get_scheme(scheme)
    if knob not in scheme.knob_names:
        raise ValueError(f"knob={knob!r}: scheme {scheme.name!r} has knobs {list(scheme.knob_names)}")
    if "params" in params and isinstance(params["params"], Mapping):
        params = params["params"]
    per_stage = knob_values(params, scheme)
    if not per_stage:
        raise ValueError(f"no '{knob}' knobs found in params (was the model built with scheme={scheme.name!r}?)")
    return np.concatenate([values[knob] for values in per_stage.values()])


def plot_learned_knobs(
    params: Mapping[str, Any],
    path: str | os.PathLike,
    scheme: Scheme | str = "lm",
    knob: str = "k",
    *,
    title: str = "",
) -> str:
    """Plots the learned `knob` per block, stages in order separated by dashed lines; saved to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scheme = get_scheme(scheme)
    if "params" in params and isinstance(params["params"], Mapping):
        params = params["params"]
    per_stage = knob_values(params, scheme)
    if not per_stage:
        raise ValueError(f"no '{knob}' knobs found in params")
    fig, ax = plt.subplots(figsize=(7, 3.5))
    offset = 0
    for stage, values in per_stage.items():
        v = values[knob]
        ax.plot(np.arange(offset, offset + len(v)), v, "o-", ms=3, label=stage or "stage")
        offset += len(v)
        ax.axvline(offset - 0.5, color="gray", ls="--", lw=0.7)
    ax.axhline(0.0, color="k", lw=0.5)
    ax.set_xlabel("block t")
    ax.set_ylabel(f"learned {knob}_t")
    ax.set_title(title or f"learned {knob}_t per block ({scheme.name})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


__all__ = [
    "DEFAULT_STEPS",
    "ConvergenceResult",
    "Interval",
    "amplification_factor",
    "characteristic_roots",
    "convergence_study",
    "fit_slope",
    "integrate",
    "learned_knobs",
    "plot_convergence",
    "plot_learned_knobs",
    "plot_stability_regions",
    "rotation_decay",
    "satisfies_root_condition",
    "spectral_radius",
    "stability_region",
    "step_matrix",
    "stuart_landau",
    "zero_stability_interval",
]
