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
- `jacobian_eigenvalues` (Arnoldi), `jacobian_spectral_radius` (power iteration): leading
  eigenvalues of a function's Jacobian from JVPs only; `block_spectra`, `fraction_inside`,
  `plot_spectra_vs_stability`: `h lambda` of each trained block's dF/dx at the inputs it sees,
  against the stability region of the step it takes (is the ODE reading true of the network?).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
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


# ------------------------------------------------------------------ Jacobian spectra of blocks
#
# Is the ODE reading true of a trained network? A step x_{t+1} = x_t + h F_t(x_t) linearized at
# the state the block sees is x' = J x with J = dF_t/dx; the scheme is linearly stable there when
# every h * lambda(J) lies in its stability region. These functions estimate the leading
# eigenvalues of J from Jacobian-vector products only (no dense Jacobian) and place them on the
# region.


@dataclasses.dataclass(frozen=True)
class RitzEstimate:
    """Ritz values of a Jacobian from `num_steps` Arnoldi steps, per example.

    Attributes:
      values: complex `[examples, r]`, sorted by decreasing modulus.
      residuals: `[examples, r]`, `|J V y - theta V y|` for the unit Ritz vector `V y` of each
        value theta (`|h_{m+1,m}| |y_m|`): small means converged (it bounds the distance to the
        spectrum for a normal J; a non-normal J can amplify it).
      num_steps: Krylov dimension m.
    """

    values: np.ndarray
    residuals: np.ndarray
    num_steps: int


def _flat_matvec(f: Callable[..., Any], args: tuple[Any, ...], x: Any, examples: int):
    """`v [examples, size] -> J v` with J the Jacobian of `z -> f(z, *args)` at x.

    F is evaluated once; each call is one Jacobian-vector product, computed as the transpose of
    the (linear) VJP: the network's CPU convolution (`cnn.ops.conv.conv_general_dilated`) has a
    custom VJP and no forward-mode rule, so `jax.jvp` / `jax.linearize` fail on it, while the
    transposed VJP is exact for every differentiable F and costs about one JVP.
    """
    y, vjp = jax.vjp(lambda z: f(z, *args), x)
    if y.shape != x.shape:
        raise ValueError(
            f"F maps {tuple(x.shape)} to {tuple(y.shape)}: a Jacobian spectrum needs F with the same "
            "input and output shape (a shape-changing transition block has no eigenvalues)"
        )
    jvp = jax.linear_transpose(lambda cotangent: vjp(cotangent)[0], y)
    size = x.size // examples

    def matvec(v):
        (out,) = jvp(v.reshape(x.shape).astype(y.dtype))
        return out.reshape(examples, size).astype(v.dtype)

    return matvec


def _orthogonalize(basis: Any, w: Any) -> tuple[Any, Any]:
    """Classical Gram-Schmidt of `w [e, d]` against the rows of `basis [e, k, d]`, twice
    ("twice is enough": keeps the basis orthogonal to working precision). Zero rows of `basis`
    contribute nothing, so a partly filled basis can be passed whole."""
    total = 0
    for _ in range(2):
        coefficients = jnp.einsum("ekd,ed->ek", basis, w)
        w = w - jnp.einsum("ek,ekd->ed", coefficients, basis)
        total = total + coefficients
    return w, total


def _arnoldi(f, args, x, start, fresh, num_steps: int, examples: int):
    """The `[examples, m + 1, m]` Hessenberg matrices of m Arnoldi steps, one per example.

    On breakdown (J v in the span so far: an invariant subspace) the next basis vector is a
    fresh random direction orthogonal to the basis and the subdiagonal entry is 0; the Ritz
    values stay those of the compression `V^T J V`.
    """
    matvec = _flat_matvec(f, args, x, examples)
    dtype = start.dtype
    size = start.shape[-1]
    tiny = jnp.finfo(dtype).tiny
    threshold = 1000 * jnp.finfo(dtype).eps
    basis = jnp.zeros((examples, num_steps + 1, size), dtype).at[:, 0].set(start)
    hessenberg = jnp.zeros((examples, num_steps + 1, num_steps), dtype)

    def body(j, carry):
        basis, hessenberg = carry
        w = matvec(jax.lax.dynamic_index_in_dim(basis, j, axis=1, keepdims=False))
        scale = jnp.linalg.norm(w, axis=-1)
        w, coefficients = _orthogonalize(basis, w)
        norm = jnp.linalg.norm(w, axis=-1)
        broke = norm <= threshold * scale
        random, _ = _orthogonalize(basis, fresh[j])
        random = random / jnp.maximum(jnp.linalg.norm(random, axis=-1, keepdims=True), tiny)
        following = jnp.where(broke[:, None], random, w / jnp.maximum(norm, tiny)[:, None])
        hessenberg = hessenberg.at[:, :, j].set(coefficients)
        hessenberg = hessenberg.at[:, j + 1, j].set(jnp.where(broke, 0.0, norm))
        basis = basis.at[:, j + 1].set(following)
        return basis, hessenberg

    _, hessenberg = jax.lax.fori_loop(0, num_steps, body, (basis, hessenberg))
    return hessenberg


def _power_iteration(f, args, x, start, num_iterations: int, examples: int):
    """`log |J v_i|` for the unit iterates `v_i` of power iteration: `[num_iterations, examples]`."""
    matvec = _flat_matvec(f, args, x, examples)
    logs = jnp.zeros((num_iterations, examples), start.dtype)

    def body(i, carry):
        v, logs = carry
        w = matvec(v)
        norm = jnp.linalg.norm(w, axis=-1)
        logs = logs.at[i].set(jnp.where(norm > 0, jnp.log(jnp.where(norm > 0, norm, 1.0)), -jnp.inf))
        v = jnp.where((norm > 0)[:, None], w / jnp.where(norm > 0, norm, 1.0)[:, None], v)
        return v, logs

    return jax.lax.fori_loop(0, num_iterations, body, (start, logs))[1]


# `f` is static: a function object reused across blocks (same module definition, other variables
# in `args`) compiles once.
_arnoldi_jit = jax.jit(_arnoldi, static_argnames=("f", "num_steps", "examples"))
_power_iteration_jit = jax.jit(_power_iteration, static_argnames=("f", "num_iterations", "examples"))


def _start_vectors(key: Any, x: Any, per_example: bool, count: int = 1):
    examples = x.shape[0] if per_example else 1
    size = x.size // examples
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    vectors = jax.random.normal(key, (count, examples, size), dtype)
    return vectors / jnp.linalg.norm(vectors, axis=-1, keepdims=True), examples, size


def jacobian_eigenvalues(
    f: Callable[..., Any],
    x: Any,
    *,
    num_steps: int = 20,
    num_eigenvalues: int | None = None,
    key: Any = None,
    per_example: bool = True,
    args: tuple[Any, ...] = (),
) -> RitzEstimate:
    """Leading eigenvalues (by modulus) of the Jacobian dF/dx at `x`, from JVPs only (Arnoldi).

    Each Arnoldi step costs one Jacobian-vector product (F is evaluated once; `_flat_matvec`
    says how the products are formed); after m steps the eigenvalues of the m x m Hessenberg
    matrix `V^T J V` (Ritz values) approximate the outer eigenvalues of J first. With m equal to the dimension they are J's
    eigenvalues. No dense Jacobian is formed; memory is m + 1 vectors of x's size.

    Args:
      f: `f(x, *args) -> F(x)`, same shape as x. It must be a pure JAX function; a network block
        in eval mode (BatchNorm with running averages) acts on each example separately.
      x: `[examples, ...]` the point of linearization (e.g. `[batch, height, width, channels]`).
      num_steps: Krylov dimension m (at most the dimension per example).
      num_eigenvalues: how many Ritz values to return (default: all m).
      key: PRNG key of the start vectors (default `PRNGKey(0)`).
      per_example: True: one Jacobian per example (`dF(x)_i / dx_i`, the diagonal blocks; for a
        block acting on each example separately they are its whole Jacobian), one Krylov space
        each, computed together -- results are per example, nothing is averaged. False: x is one
        vector and the result the spectrum of the whole batch's Jacobian (`examples = 1`).
      args: extra arguments of f (e.g. a block's variables): passed as traced arguments, so
        calls with the same `f` object and shapes reuse one compiled program.

    Returns:
      A `RitzEstimate` (`values [examples, r]` sorted by decreasing modulus, with residuals).
    """
    x = jnp.asarray(x)
    key = jax.random.PRNGKey(0) if key is None else key
    start_key, fresh_key = jax.random.split(key)
    start, examples, size = _start_vectors(start_key, x, per_example)
    if not (isinstance(num_steps, int) and 1 <= num_steps <= size):
        raise ValueError(f"num_steps={num_steps!r}: must be an integer in [1, {size}] (the dimension per example)")
    count = num_steps if num_eigenvalues is None else num_eigenvalues
    if not (isinstance(count, int) and 1 <= count <= num_steps):
        raise ValueError(f"num_eigenvalues={num_eigenvalues!r}: must be an integer in [1, num_steps={num_steps}]")
    fresh, _, _ = _start_vectors(fresh_key, x, per_example, num_steps)
    hessenberg = _arnoldi_jit(f, tuple(args), x, start[0], fresh, num_steps=num_steps, examples=examples)
    hessenberg = np.asarray(hessenberg, dtype=np.float64)
    values, vectors = np.linalg.eig(hessenberg[:, :num_steps, :num_steps])
    residuals = np.abs(hessenberg[:, num_steps, num_steps - 1])[:, None] * np.abs(vectors[:, num_steps - 1, :])
    order = np.argsort(-np.abs(values), axis=-1, kind="stable")[:, :count]
    return RitzEstimate(
        np.take_along_axis(values, order, axis=-1), np.take_along_axis(residuals, order, axis=-1), num_steps
    )


def jacobian_spectral_radius(
    f: Callable[..., Any],
    x: Any,
    *,
    num_iterations: int = 100,
    key: Any = None,
    per_example: bool = True,
    args: tuple[Any, ...] = (),
) -> np.ndarray:
    """Spectral radius of dF/dx at `x` by power iteration on JVPs: `[examples]` (see
    `jacobian_eigenvalues` for `f`, `per_example`, `args`).

    The estimate is the mean growth rate over the second half of the iterations,
    `(|J^m v| / |J^{m/2} v|)^{2/m}`: it converges to the spectral radius whether the dominant
    eigenvalue is real (geometrically, at rate |lambda_2 / lambda_1|) or a complex pair (the
    iterates rotate in its plane and `|J v|` oscillates; the mean over half the iterations is off
    by at most `log(cond) / (m/2)`, cond the condition number of that plane's eigenbasis).
    """
    x = jnp.asarray(x)
    if not (isinstance(num_iterations, int) and num_iterations >= 2):
        raise ValueError(f"num_iterations={num_iterations!r}: must be an integer >= 2")
    key = jax.random.PRNGKey(0) if key is None else key
    start, examples, _ = _start_vectors(key, x, per_example)
    logs = _power_iteration_jit(f, tuple(args), x, start[0], num_iterations=num_iterations, examples=examples)
    logs = np.asarray(logs, dtype=np.float64)
    return np.exp(logs[num_iterations // 2 :].mean(axis=0))


@dataclasses.dataclass(frozen=True)
class BlockSpectrum:
    """The Jacobian spectrum of one residual block of a network at the inputs it sees.

    Attributes:
      name: the step module's path, e.g. "stage1/blocks_0", "stage2/entry",
        "stage1/tied_block#3" (call 3 of a tied block).
      index: position among all blocks, in the order the network calls them.
      transition: block 0 of a shape-changing stage: F maps one shape to another, there is no
        eigenvalue and no ODE step (`cnn.ode.schemes`); its spectral fields are None.
      step: the rule the block's step follows, e.g. "lm (k=-0.041)", "euler (start step)".
      region_scheme, knobs: the scheme and knob values (a block's learned `k_t`) whose stability
        region applies: the network's scheme, except forward Euler for a multistep scheme's
        start step (`start="euler"`), and the one-step map `x + h (sum beta) F` for the "copy"
        start.
      h: the step size; points are `z = h lambda`.
      eigenvalues: complex `[examples, r]` Ritz values of dF/dx, decreasing modulus, per example.
      residuals: `[examples, r]` their Arnoldi residuals.
      spectral_radius: `[examples]` by power iteration, or None when not asked for.
    """

    name: str
    index: int
    transition: bool
    step: str
    region_scheme: Scheme | None
    knobs: Mapping[str, float]
    h: float
    eigenvalues: np.ndarray | None
    residuals: np.ndarray | None
    spectral_radius: np.ndarray | None

    @property
    def h_lambda(self) -> np.ndarray | None:
        """`h lambda`, `[examples, r]`."""
        return None if self.eigenvalues is None else self.h * self.eigenvalues

    @property
    def leading_h_lambda(self) -> np.ndarray | None:
        """`h lambda` of the largest-modulus eigenvalue of each example, `[examples]`."""
        return None if self.eigenvalues is None else self.h * self.eigenvalues[:, 0]

    def inside(self, z: Any) -> np.ndarray:
        """Whether each `z = h lambda` lies in this block's stability region (spectral radius of
        the step's linear map <= 1)."""
        if self.region_scheme is None:
            raise ValueError(f"block {self.name} is a shape-changing transition: it has no stability region")
        return spectral_radius(self.region_scheme, z, dict(self.knobs)) <= 1.0 + 1e-9

    @property
    def fraction_inside(self) -> float:
        """Fraction of examples whose leading `h lambda` lies in the region (nan for a transition)."""
        if self.eigenvalues is None:
            return float("nan")
        return float(np.mean(self.inside(self.leading_h_lambda)))

    @property
    def is_inside(self) -> bool:
        """The block counts as inside when at least half of its examples' leading `h lambda` is."""
        return bool(self.fraction_inside >= 0.5)


def _step_region(scheme: Scheme, first: bool, start: str, knobs: Mapping[str, float]) -> tuple[Scheme, dict, str]:
    """The scheme (and knobs) whose stability region applies to one non-transition step."""
    from cnn.ode.schemes import Coefficient, euler

    if scheme.kind == "runge_kutta" or not first:
        label = scheme.name + ("" if not scheme.knobs else " (" + ", ".join(f"{k}={v:.3g}" for k, v in knobs.items()) + ")")
        return scheme, dict(knobs), label
    if start == "euler":
        return euler(scheme.h), {}, "euler (start step)"
    growth = sum(c(knobs) for c in scheme.alpha)
    slope = sum(c(knobs) for c in scheme.beta)
    copy_start = Scheme(
        f"{scheme.name} start (copy)", f"x_1 = {growth:g} x_0 + {slope:g} h F(x_0)", order=1, h=scheme.h,
        alpha=(Coefficient(float(growth)),), beta=(Coefficient(float(slope)),),
    )
    return copy_start, {}, f"{scheme.name} start step (copy): x + {slope:g} h F"


@dataclasses.dataclass(frozen=True)
class _BlockFunction:
    """A residual block's F in eval mode (running BatchNorm statistics; evaluation 0):
    `(z, variables) -> F(z)`. Equal (and hashing equal) for equal module definitions, so the
    jitted estimators compile once per block definition and input shape, across calls."""

    module: Any

    def __call__(self, z: Any, variables: Any) -> Any:
        return self.module.apply(variables, z, train=False)


def block_spectra(
    model: Any,
    variables: Mapping[str, Any],
    x: Any,
    *,
    num_steps: int = 20,
    num_eigenvalues: int = 6,
    power_iterations: int = 0,
    key: Any = None,
) -> list[BlockSpectrum]:
    """Per residual block of a network built from `cnn.ode.ODEStage`s (e.g. any CifarResNet,
    any scheme): the leading eigenvalues of dF_t/dx at the state `x_t` the block's step sees on
    the batch `x`, with the block's stability region.

    The network runs once in eval mode with its identical blocks unrolled (`StageOptions.scan=False`,
    variables converted by `cnn.ode.stage.unstack_scanned`); an interceptor records every
    `SchemeStep` call: its input state `x_t`, knob values (learned `k_t`), whether it is the
    stage's start step, and its residual module and variables. `F_t` is then that module applied
    in eval mode with evaluation 0, the evaluation at `x_t` itself for every scheme (a
    Runge-Kutta scheme's later stages are evaluated near it). A post-activation network's ReLU
    after each step is not part of F (the ODE reading is of the pure scheme).

    Args:
      model: the Flax model (`scan` and `remat` of its `StageOptions` fields, if any, are turned off).
      variables: its `{"params", "batch_stats"}` (scanned or unrolled layout).
      x: `[batch, height, width, channels]` inputs (e.g. test images).
      num_steps: Arnoldi steps per block (clipped to the dimension per example).
      num_eigenvalues: Ritz values kept per example.
      power_iterations: > 0 also estimates each example's spectral radius by power iteration.
      key: PRNG key of the start vectors (block i uses `fold_in(key, i)`).

    Returns:
      One `BlockSpectrum` per block in call order (transition blocks included, without spectra).
    """
    import flax.linen as nn

    from cnn.ode.stage import SchemeStep, StageOptions, unstack_scanned

    # unrolled and without remat wherever the model keeps StageOptions (`stage`, an ODEStage's `options`)
    unrolled_options = {
        field.name: dataclasses.replace(getattr(model, field.name), scan=False, remat=False)
        for field in dataclasses.fields(model) if isinstance(getattr(model, field.name, None), StageOptions)
    }
    unrolled = model.clone(**unrolled_options) if unrolled_options else model
    unrolled_variables = unstack_scanned(dict(variables))
    records: list[dict[str, Any]] = []

    def record(next_fun, args, kwargs, context):
        module = context.module
        if isinstance(module, SchemeStep) and context.method_name == "__call__":
            (state, _), (knobs, _, _, first) = args[0], args[1]
            records.append({
                "path": tuple(module.scope.path), "x": state, "first": bool(first) if first is not None else False,
                "knobs": {name: float(value) for name, value in knobs.items()}, "block": module.block,
                "transition": module.shortcut is not None, "scheme": module.scheme, "start": module.start,
            })
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        unrolled.apply(unrolled_variables, x, train=False)

    key = jax.random.PRNGKey(0) if key is None else key
    calls: dict[tuple[str, ...], int] = {}
    spectra = []
    for index, item in enumerate(records):
        path = item["path"]
        calls[path] = calls.get(path, 0) + 1
        name = "/".join(path) + (f"#{calls[path] - 1}" if path[-1] == "tied_block" else "")
        scheme: Scheme = item["scheme"]
        if item["transition"]:
            spectra.append(BlockSpectrum(name, index, True, "transition (shape change)", None, {}, scheme.h,
                                         None, None, None))
            continue
        region, knobs, label = _step_region(scheme, item["first"], item["start"], item["knobs"])
        function = _BlockFunction(item["block"](parent=None))
        block_variables = {}
        for collection, tree in unrolled_variables.items():
            node = tree
            for part in path + ("block",):
                node = node.get(part) if isinstance(node, Mapping) else None
            if node is not None:
                block_variables[collection] = node
        state = item["x"]
        size = state.size // state.shape[0]
        steps = min(num_steps, size)
        block_key = jax.random.fold_in(key, index)
        estimate = jacobian_eigenvalues(
            function, state, num_steps=steps, num_eigenvalues=min(num_eigenvalues, steps),
            key=block_key, args=(block_variables,),
        )
        radius = None
        if power_iterations:
            radius = jacobian_spectral_radius(function, state, num_iterations=power_iterations,
                                              key=block_key, args=(block_variables,))
        spectra.append(BlockSpectrum(name, index, False, label, region, knobs, scheme.h, estimate.values,
                                     estimate.residuals, radius))
    return spectra


def fraction_inside(spectra: Sequence[BlockSpectrum]) -> float:
    """Fraction of the non-transition blocks whose leading `h lambda` lies in their stability
    region (`BlockSpectrum.is_inside`: for at least half of the examples); nan without any."""
    blocks = [s for s in spectra if not s.transition]
    return float(np.mean([s.is_inside for s in blocks])) if blocks else float("nan")


def plot_spectra_vs_stability(
    spectra: Sequence[BlockSpectrum],
    path: str | os.PathLike,
    *,
    title: str = "",
    extent: tuple[float, float, float, float] | None = None,
    resolution: int = 241,
) -> float:
    """`h lambda` of every block over its scheme's stability region; returns `fraction_inside`.

    Filled dots: each example's leading `h lambda`, coloured by block; small grey dots: the other
    Ritz values. Shaded: the region of the most common step rule at the median of its blocks'
    knobs (e.g. LM at the median learned k); each block whose own region differs (its own `k_t`;
    an Euler start step) has its boundary drawn in its colour. Saved to `path`.

    Note: the leading eigenvalue by modulus is not always the one that leaves the region first
    (forward Euler's region is the disc |1 + z| <= 1: a small eigenvalue with positive real part
    is outside), so `BlockSpectrum.inside` of all Ritz values is worth a look too.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = [s for s in spectra if not s.transition]
    if not blocks:
        raise ValueError("spectra has no block with an eigenvalue (only transitions); nothing to plot")
    points = np.concatenate([s.h_lambda.ravel() for s in blocks])
    if extent is None:
        extent = (
            min(-2.5, 1.1 * float(points.real.min())), max(0.5, 1.1 * float(points.real.max())),
            -max(1.5, 1.1 * float(np.abs(points.imag).max())), max(1.5, 1.1 * float(np.abs(points.imag).max())),
        )
    real = np.linspace(extent[0], extent[1], resolution)
    imag = np.linspace(extent[2], extent[3], resolution)
    zz = real[None, :] + 1j * imag[:, None]
    colours = plt.get_cmap("viridis")(np.linspace(0.0, 1.0, max(len(blocks), 2)))

    # Shaded: the most common step rule, at the median of its blocks' knob values.
    rules: dict[Any, list[BlockSpectrum]] = {}
    for s in blocks:
        rules.setdefault((s.region_scheme.name, s.region_scheme.formula, s.h), []).append(s)
    common = max(rules.values(), key=len)
    shaded_scheme = common[0].region_scheme
    shaded_knobs = {name: float(np.median([s.knobs[name] for s in common])) for name in common[0].knobs}
    shaded_label = shaded_scheme.name + "".join(f", median {k}={v:.3g}" for k, v in shaded_knobs.items())
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    radius = spectral_radius(shaded_scheme, zz, shaded_knobs)
    ax.contourf(real, imag, radius <= 1.0 + 1e-9, levels=[0.5, 1.5], colors=["tab:blue"], alpha=0.2)
    ax.contour(real, imag, radius, levels=[1.0], colors=["tab:blue"], linewidths=1.0)
    # Every block whose own region differs (another rule, another k_t): its boundary, its colour.
    for i, s in enumerate(blocks):
        if s.region_scheme == shaded_scheme and all(abs(s.knobs[k] - v) < 1e-3 for k, v in shaded_knobs.items()):
            continue
        own = spectral_radius(s.region_scheme, zz, dict(s.knobs))
        ax.contour(real, imag, own, levels=[1.0], colors=[colours[i]], linewidths=0.7, alpha=0.8)
    for i, s in enumerate(blocks):
        values = s.h_lambda
        ax.scatter(values[:, 1:].real.ravel(), values[:, 1:].imag.ravel(), s=3, color="0.6", zorder=2)
        ax.scatter(values[:, 0].real, values[:, 0].imag, s=12, color=colours[i], zorder=3,
                   label=s.name if len(blocks) <= 12 else None)
    ax.axhline(0, color="k", lw=0.5)
    ax.axvline(0, color="k", lw=0.5)
    ax.set_xlim(extent[0], extent[1])
    ax.set_ylim(extent[2], extent[3])
    ax.set_aspect("equal")
    ax.set_xlabel("Re h λ")
    ax.set_ylabel("Im h λ")
    fraction = fraction_inside(spectra)
    inside = sum(s.is_inside for s in blocks)
    ax.set_title((title + "\n" if title else "") + f"leading h·λ of dF/dx per block: {inside} of {len(blocks)} "
                 f"blocks inside ({100 * fraction:.0f}%); shaded: {shaded_label}", fontsize=9)
    if len(blocks) <= 12:
        ax.legend(fontsize=6, loc="lower left")
    else:
        mappable = plt.cm.ScalarMappable(cmap="viridis", norm=plt.Normalize(0, len(blocks) - 1))
        fig.colorbar(mappable, ax=ax, label="block (call order, transitions left out)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return fraction


__all__ = [
    "DEFAULT_STEPS",
    "BlockSpectrum",
    "ConvergenceResult",
    "Interval",
    "RitzEstimate",
    "amplification_factor",
    "block_spectra",
    "characteristic_roots",
    "convergence_study",
    "fit_slope",
    "fraction_inside",
    "integrate",
    "jacobian_eigenvalues",
    "jacobian_spectral_radius",
    "learned_knobs",
    "plot_convergence",
    "plot_learned_knobs",
    "plot_spectra_vs_stability",
    "plot_stability_regions",
    "rotation_decay",
    "satisfies_root_condition",
    "spectral_radius",
    "stability_region",
    "step_matrix",
    "stuart_landau",
    "zero_stability_interval",
]
