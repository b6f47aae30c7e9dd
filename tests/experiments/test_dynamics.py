"""Tests of the dynamics experiments (experiments/dynamics_ode.py, dynamics_pde.py, and the
dispatcher experiments/dynamics.py): learned integrators (pendulum) and the learned heat stencil,
trained by `cnn.train.fit` with the dynamics task.

The two end-to-end runs use the `tiny` configs (seconds on a CPU) and are shared by the tests
through module-scoped fixtures. The model and task themselves: tests/tasks/test_dynamics_task.py.
"""

import csv
import json

import numpy as np
import pytest

from cnn.data import synthetic
from cnn.ode import get_scheme
from experiments import dynamics, dynamics_ode, dynamics_pde
from experiments.configs import dynamics_ode as ode_configs
from experiments.configs import dynamics_pde as pde_configs

# Tolerance of the stencil recovery, relative to the largest stencil entry (4r = 0.8). The data
# are exactly one explicit step per snapshot, the fit is a convex least-squares problem that
# white-noise fields make well conditioned, so the optimum IS the stencil; what remains is float32
# rounding (~1e-6 relative to the increments) and the optimizer's last steps. 1e-3 leaves two
# orders of margin yet fails for any genuinely different kernel (e.g. the 9-point Laplacian, or a
# coefficient off by 0.1%).
STENCIL_TOLERANCE = 1e-3
# Rollout bound of the tiny pendulum run (50 steps = 5 time units, about one period): relative L2
# over all test trajectories and times. Measured on cnn.train.fit with train.seed 0-3: 0.0186-0.0203
# (Euler), 0.0184-0.0206 (midpoint); doing nothing (x_t = x_0) scores 1.6 (checked below).
ROLLOUT_BOUND = 0.08


@pytest.fixture(scope="module")
def ode_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("dynamics_ode")
    config = ode_configs.get_tiny_config()
    report = dynamics.run(config, workdir, command="pytest tiny ode")  # through the dispatcher
    return config, workdir, report


@pytest.fixture(scope="module")
def pde_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("dynamics_pde")
    config = pde_configs.get_tiny_config()
    report = dynamics_pde.run(config, workdir, command="pytest tiny pde")
    return config, workdir, report


# ------------------------------------------------------------------------------------------ PDE


def test_stencil_formula_hand_worked():
    # periodic 16x16: dx = 1/16; kappa = 0.01, dt = 0.078125 -> r = 0.01 * 0.078125 * 256 = 0.2
    np.testing.assert_allclose(
        dynamics_pde.laplacian_stencil(16, "periodic", 0.01, 0.078125),
        [[0, 0.2, 0], [0.2, -0.8, 0.2], [0, 0.2, 0]], rtol=1e-12, atol=1e-15)
    # Dirichlet 15x15 interior points: dx = 1/16 as well
    np.testing.assert_allclose(dynamics_pde.laplacian_stencil(15, "dirichlet", 0.01, 0.078125)[1, 1], -0.8, rtol=1e-12)


@pytest.mark.parametrize("boundary", ["periodic", "dirichlet"])
def test_heat_snapshots_are_one_explicit_step(boundary):
    """The premise: each snapshot is u + r * (5-point Laplacian of u), checked by a pixel loop."""
    pde = pde_configs.get_tiny_config().pde
    pde.grid_size, pde.num_steps, pde.boundary = 6, 1, boundary
    fields, dt = dynamics_pde.heat_data(pde, "white_noise", 2, seed=3)
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
    pde = pde_configs.get_tiny_config().pde
    noise, _ = dynamics_pde.heat_data(pde, "white_noise", 4, seed=0)
    smooth, _ = dynamics_pde.heat_data(pde, "smooth", 4, seed=0)
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
    train, _ = dynamics_pde.heat_data(config.pde, "white_noise", config.pde.num_train, config.data_seed)
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
    # each scheme is a cnn.train.fit run directory, with the dynamics task's record and its checkpoint
    run = json.loads((workdir / "euler" / "results.json").read_text())
    assert run["task"] == {"name": "dynamics", "context": 0} and run["steps"] == config.train.num_train_steps
    assert (workdir / "euler" / "checkpoints" / str(config.train.num_train_steps)).is_dir()


# ------------------------------------------------------------------------------ the systems


@pytest.mark.parametrize("name", ["pendulum", "lotka_volterra"])
def test_system_field_and_invariant_match_generator(name):
    """Central differences of the generator's trajectories give the field; the invariant is flat."""
    system = dynamics_ode.make_system(name)
    dt = 1e-3
    states = system.generate(3, 20, dt, seed=1)
    central = (states[:, 2:] - states[:, :-2]) / (2 * dt)
    np.testing.assert_allclose(central, system.vector_field(states[:, 1:-1]), atol=1e-5)
    invariant = system.invariant(states)
    np.testing.assert_allclose(invariant, np.broadcast_to(invariant[:, :1], invariant.shape), atol=1e-9)


def test_field_scale_hand_worked():
    assert dynamics_ode.field_scale(get_scheme("rk4")) == pytest.approx(1.0)
    assert dynamics_ode.field_scale(get_scheme("ab2")) == pytest.approx(1.0)
    assert dynamics_ode.field_scale(get_scheme("leapfrog")) == pytest.approx(1.0)
    # LM: rho(z) = z^2 - (1-k) z - k, rho'(1) = 1 + k, sigma(1) = 1
    assert dynamics_ode.field_scale(get_scheme("lm"), {"k": -0.2}) == pytest.approx(1 / 0.8)
    assert dynamics_ode.field_scale(get_scheme("lm_fixed", k=0.5)) == pytest.approx(1 / 1.5)
    # the general two-step scheme is consistent for every (a1, b1)
    assert dynamics_ode.field_scale(get_scheme("two_step"), {"a1": 0.3, "b1": -0.7}) == pytest.approx(1.0)


# ----------------------------------------------------------------------------------- bad input


def test_bad_inputs_name_the_argument(tmp_path):
    with pytest.raises(ValueError, match="system='spring'"):
        dynamics_ode.make_system("spring")
    with pytest.raises(ValueError, match=r"\['gravity'\]"):
        dynamics_ode.make_system("pendulum", {"gravity": 9.8})
    pde = pde_configs.get_tiny_config().pde
    pde.courant = 0.3
    with pytest.raises(ValueError, match="pde.courant=0.3"):
        dynamics_pde.heat_data(pde, "white_noise", 1, 0)
    with pytest.raises(ValueError, match="variant 'huge'"):
        ode_configs.get_config("huge")
    config = ode_configs.get_tiny_config()
    config.experiment = "sde"
    with pytest.raises(ValueError, match="config.experiment='sde'"):
        dynamics.run(config, "/nonexistent/never-created")
    config = ode_configs.get_tiny_config()
    config.schemes = ("euler", "rk5")
    with pytest.raises(ValueError, match="rk5"):
        dynamics_ode.run_ode(config, tmp_path)
    config = ode_configs.get_tiny_config()
    config.scheme_options = {"euler": {"h": 0.5}}  # the old second address of a scheme's options
    with pytest.raises(ValueError, match="config.scheme_options is gone"):
        dynamics_ode.run_ode(config, tmp_path)
    config = ode_configs.get_tiny_config()
    config.start = "later"
    with pytest.raises(ValueError, match="config.start='later'"):
        dynamics_ode.run_ode(config, tmp_path)
    config = pde_configs.get_tiny_config()
    config.schemes = ("ab2",)
    with pytest.raises(ValueError, match="'ab2', which keeps a past"):
        dynamics_pde.run_pde(config, tmp_path)
    assert not any(tmp_path.iterdir())  # every check ran before anything was trained


def test_configs_do_not_import_experiment_scripts_or_matplotlib():
    """Loading a config must stay cheap: a fresh interpreter imports the two config files only."""
    import subprocess
    import sys

    code = ("import sys; from experiments.configs import dynamics_ode, dynamics_pde; "
            "dynamics_ode.get_config(); dynamics_pde.get_config(); "
            "print(sorted(m for m in sys.modules if m.startswith(('matplotlib', 'experiments.dynamics', 'jax'))))")
    from tests.conftest import REPO_ROOT

    output = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert output.stdout.strip() == "[]"
