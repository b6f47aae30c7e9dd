"""Synthetic data with exact ground truth, deterministic by seed.

* `shapes`: circles, squares and triangles on a noisy background, with per-pixel class and
  instance masks (segmentation) and boxes + classes (detection). Objects never overlap, so every
  object is fully visible and its box is exactly the tight box of its pixels.
* `pendulum`, `lotka_volterra`: trajectories of small ODEs, integrated with classical RK4 on
  float64 with internal steps of at most `max_step` (default 1e-3), so the stored samples are
  accurate to about 1e-10 (tests compare with scipy's solve_ivp at rtol 1e-10).
* `heat_equation`: the 2-D heat equation u_t = kappa (u_xx + u_yy) on the unit square, periodic
  or zero-Dirichlet, by the explicit 5-point scheme (FTCS) with an internal step at most 0.9 of
  the stability limit h^2 / (4 kappa). The result is the exact solution of the discrete scheme
  (each Fourier/sine mode is multiplied by 1 - kappa dt lambda_k per step), which is within
  O(h^2) of the PDE.

Coordinates: pixel (row i, column j) covers [j, j+1) x [i, i+1) in (x, y) with y pointing down;
boxes are `[x0, y0, x1, y1]` in these pixel units.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

SHAPE_CLASSES = ("background", "circle", "square", "triangle")


def _rasterize(kind: int, cx: float, cy: float, size: float, image_size: int) -> np.ndarray:
    """Boolean [H, W] of the pixels whose centre lies inside the shape."""
    centres = np.arange(image_size) + 0.5
    y, x = np.meshgrid(centres, centres, indexing="ij")
    half = size / 2
    if kind == 1:  # circle of diameter `size`
        return (x - cx) ** 2 + (y - cy) ** 2 <= half**2
    if kind == 2:  # axis-aligned square of side `size`
        return (np.abs(x - cx) <= half) & (np.abs(y - cy) <= half)
    # isosceles triangle, apex up: apex (cx, cy-half), base corners (cx -+ half, cy+half)
    inside_base = y <= cy + half
    # the two slanted edges: |x - cx| <= (y - (cy - half)) / 2
    inside_sides = np.abs(x - cx) <= (y - (cy - half)) / 2
    return inside_base & inside_sides


def _shapes_example(
    rng: np.random.Generator,
    image_size: int,
    min_objects: int,
    max_objects: int,
    min_size: int,
    max_size: int,
    noise: float,
):
    background = rng.uniform(0, 255, size=3)
    image = np.broadcast_to(background, (image_size, image_size, 3)).copy()
    mask = np.zeros((image_size, image_size), np.int32)
    instance = np.zeros((image_size, image_size), np.int32)
    boxes = np.zeros((max_objects, 4), np.float32)
    classes = np.zeros(max_objects, np.int32)
    valid = np.zeros(max_objects, bool)
    taken: list[tuple[float, float, float, float]] = []
    wanted = rng.integers(min_objects, max_objects + 1)
    for _ in range(100 * max_objects):  # rejection sampling of non-overlapping placements
        if len(taken) == wanted:
            break
        kind = int(rng.integers(1, len(SHAPE_CLASSES)))
        size = rng.uniform(min_size, max_size)
        cx, cy = rng.uniform(size / 2, image_size - size / 2, size=2)
        extent = (cx - size / 2 - 1, cy - size / 2 - 1, cx + size / 2 + 1, cy + size / 2 + 1)  # 1 px gap
        if any(extent[0] < t[2] and t[0] < extent[2] and extent[1] < t[3] and t[1] < extent[3] for t in taken):
            continue
        pixels = _rasterize(kind, cx, cy, size, image_size)
        if pixels.sum() < 4:
            continue
        colour = rng.uniform(0, 255, size=3)
        while np.abs(colour - background).max() < 80:  # keep objects visible against the background
            colour = rng.uniform(0, 255, size=3)
        k = len(taken)
        taken.append(extent)
        image[pixels] = colour
        mask[pixels] = kind
        instance[pixels] = k + 1
        rows, cols = np.nonzero(pixels)
        boxes[k] = (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
        classes[k] = kind
        valid[k] = True
    image = np.clip(np.rint(image + rng.normal(0, noise, image.shape)), 0, 255).astype(np.uint8)
    pixel_counts = np.bincount(instance.ravel(), minlength=max_objects + 1)[1:]
    label = classes[int(np.argmax(pixel_counts))] - 1  # the object with most pixels (first on ties)
    return image, mask, instance, boxes, classes, valid, label


def shapes(
    num_examples: int,
    *,
    image_size: int = 32,
    min_objects: int = 1,
    max_objects: int = 3,
    min_size: int = 6,
    max_size: int = 14,
    noise: float = 8.0,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Images of non-overlapping circles / squares / triangles with exact masks and boxes.

    Example `i` depends only on `(seed, i)`, so it is the same for any `num_examples`.

    Returns:
      image: uint8 `[n, image_size, image_size, 3]`, shapes in a random colour on a random
        background colour, plus Gaussian noise of std `noise`.
      mask: int32 `[n, H, W]`, the class of each pixel: 0 background, 1 circle, 2 square, 3 triangle
        (`SHAPE_CLASSES`).
      instance_mask: int32 `[n, H, W]`, 0 background, `k + 1` for the pixels of object `k`.
      boxes: float32 `[n, max_objects, 4]`, `[x0, y0, x1, y1]` tight around each object's pixels
        (pixel units, exclusive upper edge); padding rows are zero.
      box_classes: int32 `[n, max_objects]`, 1..3 for objects, 0 for padding.
      box_valid: bool `[n, max_objects]`, True for real objects.
      label: int32 `[n]`, the class of the object with the most pixels (the first on ties) minus
        one (0 circle, 1 square, 2 triangle): a classification target.
    """
    if num_examples < 0:
        raise ValueError(f"num_examples must be >= 0, got {num_examples}")
    if not 1 <= min_objects <= max_objects:
        raise ValueError(
            f"need 1 <= min_objects <= max_objects, got min_objects={min_objects}, max_objects={max_objects}"
        )
    if not 2 <= min_size <= max_size or max_size + 2 > image_size:
        raise ValueError(
            f"need 2 <= min_size <= max_size <= image_size - 2, got min_size={min_size}, "
            f"max_size={max_size}, image_size={image_size}"
        )
    examples = [
        _shapes_example(
            np.random.default_rng([seed, i]), image_size, min_objects, max_objects, min_size, max_size, noise
        )
        for i in range(num_examples)
    ]
    names = ("image", "mask", "instance_mask", "boxes", "box_classes", "box_valid", "label")
    if not examples:
        shapes_ = {
            "image": (image_size, image_size, 3),
            "mask": (image_size, image_size),
            "instance_mask": (image_size, image_size),
            "boxes": (max_objects, 4),
            "box_classes": (max_objects,),
            "box_valid": (max_objects,),
            "label": (),
        }
        dtypes = {"image": np.uint8, "boxes": np.float32, "box_valid": bool}
        return {n: np.zeros((0, *shapes_[n]), dtypes.get(n, np.int32)) for n in names}
    out = {name: np.stack([e[k] for e in examples]) for k, name in enumerate(names)}
    out["label"] = out["label"].astype(np.int32)
    return out


# --------------------------------------------------------------------------------------------
# Ordinary differential equations.
# --------------------------------------------------------------------------------------------


def integrate_rk4(
    vector_field: Callable[[np.ndarray], np.ndarray],
    initial_states: np.ndarray,
    num_steps: int,
    dt: float,
    *,
    max_step: float = 1e-3,
) -> np.ndarray:
    """Samples `y' = f(y)` at `t = 0, dt, ..., num_steps*dt` with classical RK4 in float64.

    Each sampling interval is split into `ceil(dt / max_step)` equal RK4 steps (global error
    O(step^4)). `vector_field` maps `[n, d]` to `[n, d]`.

    Returns:
      float64 `[n, num_steps + 1, d]`.
    """
    if dt <= 0 or max_step <= 0 or num_steps < 0:
        raise ValueError(
            f"need dt > 0, max_step > 0, num_steps >= 0; got dt={dt}, max_step={max_step}, num_steps={num_steps}"
        )
    substeps = int(np.ceil(dt / max_step - 1e-12))
    h = dt / substeps
    y = np.asarray(initial_states, np.float64)
    out = [y]
    for _ in range(num_steps):
        for _ in range(substeps):
            k1 = vector_field(y)
            k2 = vector_field(y + 0.5 * h * k1)
            k3 = vector_field(y + 0.5 * h * k2)
            k4 = vector_field(y + h * k3)
            y = y + (h / 6) * (k1 + 2 * k2 + 2 * k3 + k4)
        out.append(y)
    return np.stack(out, axis=1)


def pendulum(
    num_trajectories: int,
    num_steps: int = 100,
    dt: float = 0.1,
    *,
    natural_frequency: float = 1.0,
    damping: float = 0.0,
    max_angle: float = 2.5,
    max_velocity: float = 1.0,
    initial_states: np.ndarray | None = None,
    max_step: float = 1e-3,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Trajectories of `theta'' = -natural_frequency^2 sin(theta) - damping * theta'`.

    Initial angles are uniform in `[-max_angle, max_angle]` rad, velocities uniform in
    `[-max_velocity, max_velocity]`, unless `initial_states` `[n, 2]` is given. Without damping
    the energy `omega^2 / 2 - natural_frequency^2 cos(theta)` is conserved.

    Returns:
      times: float64 `[num_steps + 1]`; states: float64 `[n, num_steps + 1, 2]` of (theta, omega).
    """
    if initial_states is None:
        rng = np.random.default_rng(seed)
        initial_states = np.stack(
            [
                rng.uniform(-max_angle, max_angle, num_trajectories),
                rng.uniform(-max_velocity, max_velocity, num_trajectories),
            ],
            axis=1,
        )

    def field(y):
        return np.stack([y[:, 1], -(natural_frequency**2) * np.sin(y[:, 0]) - damping * y[:, 1]], axis=1)

    states = integrate_rk4(field, initial_states, num_steps, dt, max_step=max_step)
    return {"times": dt * np.arange(num_steps + 1), "states": states}


def lotka_volterra(
    num_trajectories: int,
    num_steps: int = 100,
    dt: float = 0.1,
    *,
    alpha: float = 1.5,
    beta: float = 1.0,
    gamma: float = 3.0,
    delta: float = 1.0,
    initial_range: tuple[float, float] = (0.5, 3.0),
    initial_states: np.ndarray | None = None,
    max_step: float = 1e-3,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Predator-prey trajectories: `x' = alpha x - beta x y`, `y' = delta x y - gamma y`.

    Initial populations are uniform in `initial_range` unless `initial_states` `[n, 2]` is given.
    `V = delta x - gamma ln x + beta y - alpha ln y` is conserved along every trajectory.

    Returns:
      times: float64 `[num_steps + 1]`; states: float64 `[n, num_steps + 1, 2]` of (prey, predator).
    """
    if initial_states is None:
        rng = np.random.default_rng(seed)
        initial_states = rng.uniform(*initial_range, size=(num_trajectories, 2))

    def field(y):
        prey, predator = y[:, 0], y[:, 1]
        return np.stack([alpha * prey - beta * prey * predator, delta * prey * predator - gamma * predator], axis=1)

    states = integrate_rk4(field, initial_states, num_steps, dt, max_step=max_step)
    return {"times": dt * np.arange(num_steps + 1), "states": states}


# --------------------------------------------------------------------------------------------
# 2-D heat equation.
# --------------------------------------------------------------------------------------------


def heat_grid(grid_size: int, boundary: str) -> np.ndarray:
    """Coordinates `[grid_size]` of the unknowns along one axis of the unit square.

    Periodic: `x_j = j h`, `h = 1/grid_size`. Dirichlet: interior points `x_j = (j+1) h`,
    `h = 1/(grid_size+1)` (u = 0 on the boundary, which is not stored).
    """
    if boundary == "periodic":
        return np.arange(grid_size) / grid_size
    if boundary == "dirichlet":
        return (np.arange(grid_size) + 1) / (grid_size + 1)
    raise ValueError(f"boundary={boundary!r} is not supported; valid: ['dirichlet', 'periodic']")


def stable_heat_step(grid_size: int, boundary: str, diffusivity: float) -> float:
    """The largest explicit (FTCS) step that is stable: `h^2 / (4 kappa)`."""
    heat_grid(grid_size, boundary)  # validates `boundary`
    spacing = 1 / grid_size if boundary == "periodic" else 1 / (grid_size + 1)
    return spacing**2 / (4 * diffusivity)


def random_heat_fields(
    num_samples: int, grid_size: int, boundary: str, *, max_mode: int = 4, seed: int = 0
) -> np.ndarray:
    """Smooth random initial temperatures `[n, grid_size, grid_size]`: random low Fourier/sine modes.

    Mode `(k, l)` gets a normal amplitude scaled by `1 / (1 + k^2 + l^2)`; periodic fields use
    `cos/sin(2 pi (k x + l y))`, Dirichlet fields `sin(pi k x) sin(pi l y)`, so they satisfy the
    boundary condition.
    """
    rng = np.random.default_rng(seed)
    x = heat_grid(grid_size, boundary)
    xx, yy = np.meshgrid(x, x, indexing="xy")  # rows are y, columns are x
    fields = np.zeros((num_samples, grid_size, grid_size))
    for k in range(0 if boundary == "periodic" else 1, max_mode + 1):
        for m in range(0 if boundary == "periodic" else 1, max_mode + 1):
            scale = 1 / (1 + k**2 + m**2)
            if boundary == "periodic":
                phase = 2 * np.pi * (k * xx + m * yy)
                a, b = rng.normal(0, scale, (2, num_samples, 1, 1))
                fields += a * np.cos(phase) + b * np.sin(phase)
            else:
                a = rng.normal(0, scale, (num_samples, 1, 1))
                fields += a * np.sin(np.pi * k * xx) * np.sin(np.pi * m * yy)
    return fields


def _laplacian(u: np.ndarray, boundary: str, spacing: float) -> np.ndarray:
    if boundary == "periodic":
        neighbours = np.roll(u, 1, -1) + np.roll(u, -1, -1) + np.roll(u, 1, -2) + np.roll(u, -1, -2)
    else:
        padded = np.pad(u, [(0, 0)] * (u.ndim - 2) + [(1, 1), (1, 1)])  # zero Dirichlet boundary
        neighbours = padded[..., :-2, 1:-1] + padded[..., 2:, 1:-1] + padded[..., 1:-1, :-2] + padded[..., 1:-1, 2:]
    return (neighbours - 4 * u) / spacing**2


def heat_equation(
    num_samples: int,
    num_steps: int = 20,
    dt: float = 0.25,
    *,
    grid_size: int = 32,
    diffusivity: float = 0.01,
    boundary: str = "periodic",
    initial_fields: np.ndarray | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Solutions of `u_t = diffusivity * (u_xx + u_yy)` on the unit square, sampled every `dt`.

    The explicit 5-point scheme runs with `ceil(dt / (0.9 * h^2 / (4 kappa)))` equal internal
    steps per sample (stable). Initial fields come from `random_heat_fields` unless
    `initial_fields` `[n, grid_size, grid_size]` is given.

    Returns:
      times: float64 `[num_steps + 1]`; fields: float64 `[n, num_steps + 1, grid_size, grid_size, 1]`
      (each time slice is an NHWC batch); internal_dt: the internal step used (a float).
    """
    if diffusivity <= 0 or dt <= 0:
        raise ValueError(f"need diffusivity > 0 and dt > 0, got diffusivity={diffusivity}, dt={dt}")
    heat_grid(grid_size, boundary)  # validates `boundary`
    spacing = 1 / grid_size if boundary == "periodic" else 1 / (grid_size + 1)
    if initial_fields is None:
        initial_fields = random_heat_fields(num_samples, grid_size, boundary, seed=seed)
    u = np.asarray(initial_fields, np.float64)
    if u.shape[-2:] != (grid_size, grid_size):
        raise ValueError(f"initial_fields must be [n, {grid_size}, {grid_size}], got {u.shape}")
    substeps = int(np.ceil(dt / (0.9 * stable_heat_step(grid_size, boundary, diffusivity))))
    step = dt / substeps
    out = [u]
    for _ in range(num_steps):
        for _ in range(substeps):
            u = u + step * diffusivity * _laplacian(u, boundary, spacing)
        out.append(u)
    return {"times": dt * np.arange(num_steps + 1), "fields": np.stack(out, axis=1)[..., None], "internal_dt": step}
