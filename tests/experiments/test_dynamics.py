"""Tests of experiments/dynamics.py: learned integrators (pendulum) and the learned heat stencil.

The two end-to-end runs use the `tiny` configs (seconds on a CPU) and are shared by the tests
through module-scoped fixtures.
"""

import csv
import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn.data import synthetic
from cnn.ode import get_scheme
from experiments import dynamics
from experiments.configs import dynamics_ode, dynamics_pde

# Tolerance of the stencil recovery, relative to the largest stencil entry (4r = 0.8). The data
# are exactly one explicit step per snapshot, the fit is a convex least-squares problem that
# white-noise fields make well conditioned, so the optimum IS the stencil; what remains is float32
# rounding (~1e-6 relative to the increments) and the optimizer's last steps. 1e-3 leaves two
# orders of margin yet fails for any genuinely different kernel (e.g. the 9-point Laplacian, or a
# coefficient off by 0.1%).
STENCIL_TOLERANCE = 1e-3
# Rollout bound of the tiny pendulum run (50 steps = 5 time units, about one period): relative L2
# over all test trajectories and times. Measured 0.020 (Euler) and 0.020 (midpoint) with the tiny
# config, 0.025-0.039 with other seeds; doing nothing (x_t = x_0) scores 1.6 (checked below).
ROLLOUT_BOUND = 0.08


@pytest.fixture(scope="module")
def ode_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("dynamics_ode")
    config = dynamics_ode.get_tiny_config()
    report = dynamics.run(config, workdir, command="pytest tiny ode")
    return config, workdir, report


@pytest.fixture(scope="module")
def pde_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("dynamics_pde")
    config = dynamics_pde.get_tiny_config()
    report = dynamics.run(config, workdir, command="pytest tiny pde")
    return config, workdir, report


# ------------------------------------------------------------------------------------------ PDE


def test_stencil_formula_hand_worked():
    # periodic 16x16: dx = 1/16; kappa = 0.01, dt = 0.078125 -> r = 0.01 * 0.078125 * 256 = 0.2
    np.testing.assert_allclose(
        dynamics.laplacian_stencil(16, "periodic", 0.01, 0.078125),
        [[0, 0.2, 0], [0.2, -0.8, 0.2], [0, 0.2, 0]], rtol=1e-12, atol=1e-15)
    # Dirichlet 15x15 interior points: dx = 1/16 as well
    np.testing.assert_allclose(dynamics.laplacian_stencil(15, "dirichlet", 0.01, 0.078125)[1, 1], -0.8, rtol=1e-12)


@pytest.mark.parametrize("boundary", ["periodic", "dirichlet"])
def test_heat_snapshots_are_one_explicit_step(boundary):
    """The premise: each snapshot is u + r * (5-point Laplacian of u), checked by a pixel loop."""
    pde = dynamics_pde.get_tiny_config().pde
    pde.grid_size, pde.num_steps, pde.boundary = 6, 1, boundary
    fields, dt = dynamics.heat_data(pde, "white_noise", 2, seed=3)
    spacing = 1 / 6 if boundary == "periodic" else 1 / 7
    r = pde.diffusivity * dt / spacing**2
    assert r == pytest.approx(pde.courant, rel=1e-12)
    u0, u1 = fields[:, 0, :, :, 0], fields[:, 1, :, :, 0]
    expected = np.empty_like(u0)
    g = 6
    for n in range(2):
        for i in range(g):
            for j in range(g):
                def at(a, b):
                    if boundary == "periodic":
                        return u0[n, a % g, b % g]
                    return u0[n, a, b] if 0 <= a < g and 0 <= b < g else 0.0
                lap = at(i - 1, j) + at(i + 1, j) + at(i, j - 1) + at(i, j + 1) - 4 * at(i, j)
                expected[n, i, j] = u0[n, i, j] + r * lap
    np.testing.assert_allclose(u1, expected, rtol=1e-12, atol=1e-12)


def _design_matrix(fields):
    """Columns: the 9 shifted copies of u_t (periodic), rows: pixels. [pixels, 9]."""
    u = fields[:, :-1, :, :, 0].reshape(-1, *fields.shape[2:4])
    columns = [np.roll(u, (-a, -b), axis=(1, 2)).ravel() for a in (-1, 0, 1) for b in (-1, 0, 1)]
    return np.stack(columns, axis=1)


def test_white_noise_identifies_the_kernel_and_smooth_fields_do_not():
    """Condition number of the loss's Hessian A^T A (A: the kernel's least-squares design matrix),
    which sets how fast gradient methods resolve all nine entries: the reason for white-noise data."""
    pde = dynamics_pde.get_tiny_config().pde
    noise, _ = dynamics.heat_data(pde, "white_noise", 4, seed=0)
    smooth, _ = dynamics.heat_data(pde, "smooth", 4, seed=0)
    cond_noise = np.linalg.cond(_design_matrix(noise)) ** 2
    cond_smooth = np.linalg.cond(_design_matrix(smooth)) ** 2
    assert cond_noise < 10
    assert cond_smooth > 1e3 * cond_noise


def test_pde_recovers_laplacian_stencil(pde_run):
    config, workdir, _ = pde_run
    result = json.loads((workdir / "results.json").read_text())
    (row,) = result["rows"]
    assert (row["scheme"], row["initial_fields"]) == ("euler", "white_noise")
    kernel = np.asarray(row["kernel"])
    # hand-written target: r = courant = 0.2 (snapshots every 0.2 dx^2 / kappa)
    target = np.array([[0, 0.2, 0], [0.2, -0.8, 0.2], [0, 0.2, 0]])
    distance = np.max(np.abs(kernel - target))
    assert distance / 0.8 < STENCIL_TOLERANCE, kernel
    assert row["max_abs_distance"] == pytest.approx(distance, rel=1e-6)
    # the independent numpy least-squares solution of the same problem is the stencil too
    train, _ = dynamics.heat_data(config.pde, "white_noise", config.pde.num_train, config.data_seed)
    increments = (train[:, 1:] - train[:, :-1])[..., 0].ravel()
    solution, *_ = np.linalg.lstsq(_design_matrix(train), increments, rcond=None)
    np.testing.assert_allclose(solution.reshape(3, 3), target, atol=1e-10)
    assert row["one_step_error"] < 1e-3  # relative to the true increment


def test_pde_writes_table_and_plots(pde_run):
    _, workdir, report = pde_run
    text = report.read_text()
    assert "| euler | white_noise |" in text and "max abs(K - stencil)" in text
    with open(workdir / "results.csv") as handle:
        rows = list(csv.reader(handle))
    assert len(rows) == 2 and rows[1][:2] == ["euler", "white_noise"]
    for name in ("kernels.png", "heat_rollout.png", "training_loss.png"):
        path = workdir / "plots" / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


# ------------------------------------------------------------------------------------------ ODE


def test_pendulum_rollout_error_below_bound(ode_run):
    config, workdir, _ = ode_run
    rows = {r["scheme"]: r for r in json.loads((workdir / "results.json").read_text())["rows"]}
    assert set(rows) == {"euler", "midpoint"}
    # what "doing nothing" scores on the same test trajectories: the bound is far below it
    test = synthetic.pendulum(config.num_test, config.rollout_steps, config.dt, seed=config.data_seed + 1,
                              **config.system_options.pendulum.to_dict())["states"]
    persistence = np.linalg.norm(test[:, 1:] - test[:, :1]) / np.linalg.norm(test[:, 1:])
    assert persistence > 15 * ROLLOUT_BOUND
    for scheme in ("euler", "midpoint"):
        assert rows[scheme]["rollout_relative_l2"] < ROLLOUT_BOUND, rows[scheme]
        assert rows[scheme]["one_step_rmse"] < 5e-3
        assert rows[scheme]["invariant_error"] < 0.05
    # Euler's F absorbs the O(h) discretization error (F = f + h/2 f'f + ...); midpoint's is O(h^2)
    # from f, so it is closer to the true field and survives a 4x smaller step far better.
    assert rows["midpoint"]["field_relative_error"] < rows["euler"]["field_relative_error"]
    assert rows["midpoint"]["refined_rollout_relative_l2"] < 0.7 * rows["euler"]["refined_rollout_relative_l2"]


def test_ode_writes_table_and_plots(ode_run):
    config, workdir, report = ode_run
    text = report.read_text()
    assert "| euler | 1 | 1 |" in text and "| midpoint | 2 | 2 |" in text
    with open(workdir / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["scheme"] for r in rows] == ["euler", "midpoint"]
    assert float(rows[0][f"rollout rel. L2 ({config.rollout_steps} steps)"]) > 0
    for name in ("trajectories.png", "phase_portraits.png", "rollout_error.png", "training_loss.png"):
        path = workdir / "plots" / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    assert json.loads((workdir / "config.json").read_text())["schemes"] == ["euler", "midpoint"]


# ---------------------------------------------------------------------- the integrator itself


def _true_field_error(scheme_name, steps, t_final=2.0):
    """Max error at t_final of the experiment's integrator with the true pendulum field plugged in."""
    system = dynamics.make_system("pendulum")
    x0 = np.array([[1.0, 0.3], [-0.5, 0.8]])
    h = t_final / steps
    truth = synthetic.pendulum(2, steps, h, initial_states=x0)["states"]
    true_field = functools.partial(dynamics.KnownField, field=system.vector_field)
    model = dynamics.make_integrator(scheme_name, true_field, h=h)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 2)), train=False)
    context = dynamics.history_length(model.scheme)  # a two-step scheme starts at x_1 with the true x_0
    prediction = dynamics.predict(model, variables, jnp.asarray(truth, jnp.float32), context=context,
                                  horizon=steps - context, start="data")
    return float(np.max(np.abs(np.asarray(prediction[:, -1], np.float64) - truth[:, -1])))


@pytest.mark.parametrize("scheme_name, steps", [
    ("euler", (8, 32)),
    ("midpoint", (8, 32)),
    pytest.param("heun", (8, 32), marks=pytest.mark.slow),
    pytest.param("leapfrog", (8, 32), marks=pytest.mark.slow),
    pytest.param("ab2", (8, 32), marks=pytest.mark.slow),
    ("rk4", (4, 16)),
])
def test_true_field_reproduces_scheme_order(scheme_name, steps):
    errors = [_true_field_error(scheme_name, n) for n in steps]
    observed = math.log(errors[0] / errors[1]) / math.log(steps[1] / steps[0])
    assert observed == pytest.approx(get_scheme(scheme_name).order, abs=0.2), errors


def test_predict_matches_manual_scheme_steps():
    """Data start: the history is built from the true past, then the scheme's own formula runs."""
    system = dynamics.make_system("pendulum")
    h = 0.1
    window = synthetic.pendulum(1, 3, h, initial_states=np.array([[0.7, -0.2]]))["states"]
    model = dynamics.make_integrator("ab2", functools.partial(dynamics.KnownField, field=system.vector_field), h=h)
    prediction = np.asarray(dynamics.predict(model, {}, jnp.asarray(window, jnp.float32), context=1, horizon=2,
                                             start="data"))
    f = system.vector_field
    x0, x1 = window[:, 0], window[:, 1]
    x2 = x1 + h * (1.5 * f(x1) - 0.5 * f(x0))  # AB2 by hand, float64
    x3 = x2 + h * (1.5 * f(x2) - 0.5 * f(x1))
    np.testing.assert_allclose(prediction[:, 0], x2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(prediction[:, 1], x3, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["pendulum", "lotka_volterra"])
def test_system_field_and_invariant_match_generator(name):
    """Central differences of the generator's trajectories give the field; the invariant is flat."""
    system = dynamics.make_system(name)
    dt = 1e-3
    states = system.generate(3, 20, dt, seed=1)
    central = (states[:, 2:] - states[:, :-2]) / (2 * dt)
    np.testing.assert_allclose(central, system.vector_field(states[:, 1:-1]), atol=1e-5)
    invariant = system.invariant(states)
    np.testing.assert_allclose(invariant, np.broadcast_to(invariant[:, :1], invariant.shape), atol=1e-9)


def test_field_scale_hand_worked():
    assert dynamics.field_scale(get_scheme("rk4")) == pytest.approx(1.0)
    assert dynamics.field_scale(get_scheme("ab2")) == pytest.approx(1.0)
    assert dynamics.field_scale(get_scheme("leapfrog")) == pytest.approx(1.0)
    # LM: rho(z) = z^2 - (1-k) z - k, rho'(1) = 1 + k, sigma(1) = 1
    assert dynamics.field_scale(get_scheme("lm"), {"k": -0.2}) == pytest.approx(1 / 0.8)
    assert dynamics.field_scale(get_scheme("lm_fixed", k=0.5)) == pytest.approx(1 / 1.5)
    # the general two-step scheme is consistent for every (a1, b1)
    assert dynamics.field_scale(get_scheme("two_step"), {"a1": 0.3, "b1": -0.7}) == pytest.approx(1.0)


def test_make_windows_matches_loop():
    trajectories = np.arange(2 * 5 * 3).reshape(2, 5, 3)
    windows = dynamics.make_windows(trajectories, 3)
    expected = [trajectories[n, s : s + 3] for n in range(2) for s in range(3)]
    np.testing.assert_array_equal(windows, np.stack(expected))


# ----------------------------------------------------------------------------------- bad input


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="system='spring'"):
        dynamics.make_system("spring")
    with pytest.raises(ValueError, match=r"\['gravity'\]"):
        dynamics.make_system("pendulum", {"gravity": 9.8})
    pde = dynamics_pde.get_tiny_config().pde
    pde.courant = 0.3
    with pytest.raises(ValueError, match="pde.courant=0.3"):
        dynamics.heat_data(pde, "white_noise", 1, 0)
    with pytest.raises(ValueError, match="start='later'"):
        dynamics.make_integrator("euler", dynamics.MLPField, h=0.1, start="later")
    with pytest.raises(ValueError, match="variant 'huge'"):
        dynamics_ode.get_config("huge")
    config = dynamics_ode.get_tiny_config()
    config.experiment = "sde"
    with pytest.raises(ValueError, match="config.experiment='sde'"):
        dynamics.run(config, "/nonexistent/never-created")
    config = dynamics_ode.get_tiny_config()
    config.schemes = ("euler", "rk5")
    with pytest.raises(ValueError, match="rk5"):
        dynamics.run_ode(config)
    model = dynamics.make_integrator("leapfrog", dynamics.MLPField, h=0.1)
    with pytest.raises(ValueError, match="context=0"):
        dynamics.predict(model, {}, jnp.zeros((1, 3, 2)), context=0, horizon=1, start="data")
