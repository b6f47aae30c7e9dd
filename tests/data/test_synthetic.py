"""Synthetic data: exact masks and boxes, accurate ODE trajectories, the discrete heat equation."""

import numpy as np
import pytest
from scipy.integrate import solve_ivp

from cnn.data import synthetic


@pytest.fixture(scope="module")
def shapes_data():
    return synthetic.shapes(64, seed=11)


def test_shapes_are_deterministic_per_example(shapes_data):
    again = synthetic.shapes(64, seed=11)
    for key in shapes_data:
        np.testing.assert_array_equal(shapes_data[key], again[key])
    prefix = synthetic.shapes(5, seed=11)  # example i depends on (seed, i) only
    np.testing.assert_array_equal(prefix["image"], shapes_data["image"][:5])
    other = synthetic.shapes(5, seed=12)
    assert not np.array_equal(other["image"], prefix["image"])


def test_shapes_masks_and_boxes_are_exact(shapes_data):
    for n in range(len(shapes_data["image"])):
        mask, instance = shapes_data["mask"][n], shapes_data["instance_mask"][n]
        np.testing.assert_array_equal(mask > 0, instance > 0)
        valid = shapes_data["box_valid"][n]
        assert 1 <= valid.sum() <= 3 and set(np.unique(instance)) == set(range(valid.sum() + 1))
        areas = []
        for k in range(len(valid)):
            if not valid[k]:
                assert shapes_data["box_classes"][n, k] == 0 and not shapes_data["boxes"][n, k].any()
                continue
            rows, cols = np.nonzero(instance == k + 1)
            # Tight box with exclusive upper edges, found by scanning the pixels.
            x0, y0, x1, y1 = 99, 99, -1, -1
            for r, c in zip(rows, cols):
                x0, y0, x1, y1 = min(x0, c), min(y0, r), max(x1, c + 1), max(y1, r + 1)
            np.testing.assert_array_equal(shapes_data["boxes"][n, k], [x0, y0, x1, y1])
            assert set(mask[rows, cols]) == {shapes_data["box_classes"][n, k]}
            areas.append((len(rows), -k, shapes_data["box_classes"][n, k]))
        assert shapes_data["label"][n] == max(areas)[2] - 1  # most pixels, first object on ties
    assert set(np.unique(shapes_data["mask"])) == {0, 1, 2, 3}


def test_rasterization_by_hand():
    square = synthetic._rasterize(2, 10.0, 10.0, 4.0, 16)  # centres 8.5..11.5 lie in [8, 12]
    rows, cols = np.nonzero(square)
    assert (rows.min(), rows.max(), cols.min(), cols.max(), square.sum()) == (8, 11, 8, 11, 16)
    circle = synthetic._rasterize(1, 8.0, 8.0, 4.0, 16)  # radius 2: centres within distance 2 of (8, 8)
    assert circle.sum() == 12  # the 4x4 block around the centre minus its 4 corners (distance 2.12)
    triangle = synthetic._rasterize(3, 8.0, 8.0, 8.0, 16)  # apex (8, 4), base y = 12 from x = 4 to 12
    # Row r is inside where |x - 8| <= (y - 4) / 2 at the centre y = r + 0.5.
    assert triangle[11, 4] and triangle[11, 11] and triangle[5, 7] and triangle[5, 8]
    assert not triangle[5, 6] and not triangle[4].any() and not triangle[12].any()
    assert triangle.sum() == sum(2 * int(((r + 0.5 - 4) / 2 + 0.5)) for r in range(5, 12))


def test_shapes_rejects_bad_arguments():
    with pytest.raises(ValueError, match="max_size"):
        synthetic.shapes(1, image_size=16, max_size=16)
    with pytest.raises(ValueError, match="min_objects"):
        synthetic.shapes(1, min_objects=0)


def test_pendulum_matches_solve_ivp_and_conserves_energy():
    out = synthetic.pendulum(4, num_steps=50, dt=0.2, seed=3)
    states, times = out["states"], out["times"]
    assert states.shape == (4, 51, 2) and times[-1] == pytest.approx(10.0)
    for y0, trajectory in zip(states[:, 0], states):
        reference = solve_ivp(
            lambda t, y: [y[1], -np.sin(y[0])], (0, 10), y0, t_eval=times, rtol=1e-12, atol=1e-12, method="DOP853"
        )
        np.testing.assert_allclose(trajectory, reference.y.T, atol=1e-8)
    energy = 0.5 * states[..., 1] ** 2 - np.cos(states[..., 0])
    assert np.abs(energy - energy[:, :1]).max() < 1e-10
    small = synthetic.pendulum(1, 30, 0.1, initial_states=np.array([[1e-3, 0.0]]))["states"][0, :, 0]
    np.testing.assert_allclose(small, 1e-3 * np.cos(np.arange(31) * 0.1), atol=1e-9)  # small-angle limit
    damped = synthetic.pendulum(2, 100, 0.1, damping=0.5, seed=1)["states"]
    damped_energy = 0.5 * damped[..., 1] ** 2 - np.cos(damped[..., 0])
    assert np.all(np.diff(damped_energy, axis=1) <= 1e-12)


def test_lotka_volterra_conserves_its_first_integral():
    out = synthetic.lotka_volterra(3, num_steps=100, dt=0.1, seed=5)
    x, y = out["states"][..., 0], out["states"][..., 1]
    invariant = 1.0 * x - 3.0 * np.log(x) + 1.0 * y - 1.5 * np.log(y)
    assert np.abs(invariant - invariant[:, :1]).max() < 1e-9
    y0 = out["states"][0, 0]
    reference = solve_ivp(
        lambda t, s: [1.5 * s[0] - s[0] * s[1], s[0] * s[1] - 3 * s[1]],
        (0, 10),
        y0,
        t_eval=out["times"],
        rtol=1e-12,
        atol=1e-12,
        method="DOP853",
    )
    np.testing.assert_allclose(out["states"][0], reference.y.T, atol=1e-8)


@pytest.mark.parametrize("boundary", ["periodic", "dirichlet"])
def test_heat_equation_is_the_exact_discrete_solution_of_a_mode(boundary):
    grid, kappa, dt, steps = 24, 0.02, 0.1, 10
    x = synthetic.heat_grid(grid, boundary)
    xx, yy = np.meshgrid(x, x)  # columns x, rows y
    if boundary == "periodic":
        h, k, m = 1 / grid, 2, 1
        mode = np.sin(2 * np.pi * k * xx) * np.cos(2 * np.pi * m * yy)
        eigenvalue = 4 / h**2 * (np.sin(np.pi * k * h) ** 2 + np.sin(np.pi * m * h) ** 2)
        continuous = 4 * np.pi**2 * (k**2 + m**2)
    else:
        h, k, m = 1 / (grid + 1), 1, 2
        mode = np.sin(np.pi * k * xx) * np.sin(np.pi * m * yy)
        eigenvalue = 4 / h**2 * (np.sin(np.pi * k * h / 2) ** 2 + np.sin(np.pi * m * h / 2) ** 2)
        continuous = np.pi**2 * (k**2 + m**2)
    out = synthetic.heat_equation(
        1, steps, dt, grid_size=grid, diffusivity=kappa, boundary=boundary, initial_fields=mode[None]
    )
    step = out["internal_dt"]
    assert step <= h**2 / (4 * kappa)  # the explicit scheme's stability limit
    substeps = round(dt / step)
    assert substeps * step == pytest.approx(dt)
    fields = out["fields"][0, ..., 0]
    for n in range(steps + 1):
        factor = (1 - kappa * step * eigenvalue) ** (n * substeps)
        np.testing.assert_allclose(fields[n], factor * mode, atol=1e-12)
        if n:  # the decay rate is within O(h^2 + dt) (here 3%) of the PDE's kappa |k|^2
            assert -np.log(factor) / (n * dt) == pytest.approx(kappa * continuous, rel=3e-2)


def test_random_heat_fields_obey_the_maximum_principle():
    out = synthetic.heat_equation(3, 20, 0.5, grid_size=16, boundary="dirichlet", seed=2)
    assert out["fields"].shape == (3, 21, 16, 16, 1)
    peaks = np.abs(out["fields"]).max(axis=(2, 3, 4))
    assert np.all(np.diff(peaks, axis=1) <= 1e-12) and peaks[:, -1].max() < peaks[:, 0].min()
    with pytest.raises(ValueError, match="boundary='neumann'"):
        synthetic.heat_equation(1, 1, 0.1, boundary="neumann")
