"""The dynamics task (`cnn.tasks.dynamics`) and its integrator models (`cnn.models.dynamics`) on the
one trainer: hand-computed steps, numpy references for the evaluation, exact resume, 8 devices
against 1, the NaN guard."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cnn.models
from cnn.data import synthetic
from cnn.models import dynamics as dynamics_models
from cnn.ode import get_scheme
from cnn.tasks import dynamics
from cnn.train import NonFiniteLossError, evaluate, fit
from cnn.train.state import create_train_state
from cnn.train.optim import make_optimizer
from tests.train.helpers import flat_leaves, read_metrics

H = 0.1


def pendulum_field(x):
    """x' = (omega, -sin theta): the generator's default pendulum (natural frequency 1, no damping)."""
    xp = jnp if isinstance(x, jax.Array) else np
    return xp.stack([x[..., 1], -xp.sin(x[..., 0])], axis=-1)


def known_integrator(scheme: str, h: float, context: int) -> dynamics_models.Integrator:
    """The integrator the experiment trains, with the true field in place of the MLP."""
    return dynamics_models.Integrator(dynamics_models.KnownField, (("field", pendulum_field),),
                                      get_scheme(scheme, h=h), context=context)


# ----------------------------------------------------------------------------------- the model


def test_ab2_rollout_and_one_step_match_hand_steps():
    """Data start: the true x_0 seeds AB2's history, then the scheme's own formula runs (float64 by hand)."""
    window = synthetic.pendulum(2, 4, H, initial_states=np.array([[0.7, -0.2], [-1.1, 0.4]]))["states"]
    model = known_integrator("ab2", H, context=1)
    output = model.apply({}, jnp.asarray(window, jnp.float32), train=False)
    f = pendulum_field
    x = list(np.moveaxis(window, 1, 0))
    x2 = x[1] + H * (1.5 * f(x[1]) - 0.5 * f(x[0]))
    x3 = x2 + H * (1.5 * f(x2) - 0.5 * f(x[1]))
    x4 = x3 + H * (1.5 * f(x3) - 0.5 * f(x2))
    np.testing.assert_allclose(output.rollout, np.stack([x2, x3, x4], 1), rtol=1e-5, atol=1e-6)
    # teacher-forced: every step from the true states before it
    one = [x[t] + H * (1.5 * f(x[t]) - 0.5 * f(x[t - 1])) for t in (1, 2, 3)]
    np.testing.assert_allclose(output.one_step, np.stack(one, 1), rtol=1e-5, atol=1e-6)
    assert model.apply({}, jnp.asarray(window, jnp.float32), train=True).one_step is None


def _true_field_error(scheme_name, steps, t_final=2.0):
    """Max error at t_final of the integrator with the true pendulum field plugged in."""
    x0 = np.array([[1.0, 0.3], [-0.5, 0.8]])
    h = t_final / steps
    truth = synthetic.pendulum(2, steps, h, initial_states=x0)["states"]
    context = dynamics_models.history_length(scheme_name)  # a two-step scheme starts at x_1 with the true x_0
    model = known_integrator(scheme_name, h, context)
    prediction = model.apply({}, jnp.asarray(truth, jnp.float32)).rollout
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


def test_stencil_integrator_euler_step_is_the_convolution():
    """One Euler step with kernel K is u + K * u; checked against numpy's periodic shifts."""
    model = cnn.models.create("stencil_integrator", scheme="euler", boundary="periodic")
    u = np.random.default_rng(0).normal(size=(2, 2, 5, 6, 1)).astype(np.float32)
    variables = model.init(jax.random.key(0), u)
    kernel = np.asarray(variables["params"]["stage"]["tied_block"]["block"]["stencil"]["kernel"][:, :, 0, 0])
    u0 = u[:, 0, :, :, 0]
    expected = u0 + sum(kernel[a, b] * np.roll(u0, (1 - a, 1 - b), axis=(1, 2)) for a in range(3) for b in range(3))
    np.testing.assert_allclose(model.apply(variables, u).rollout[:, 0, :, :, 0], expected, rtol=1e-5, atol=1e-5)


def test_model_rejects_bad_options():
    with pytest.raises(ValueError, match="start='later'"):
        cnn.models.create("mlp_integrator", start="later").init(jax.random.key(0), jnp.zeros((1, 3, 2)))
    with pytest.raises(ValueError, match="context=0"):
        cnn.models.create("mlp_integrator", scheme="leapfrog").init(jax.random.key(0), jnp.zeros((1, 3, 2)))
    with pytest.raises(ValueError, match="h=0.5"):
        cnn.models.create("mlp_integrator", scheme="euler", scheme_options={"h": 0.5})
    with pytest.raises(ValueError, match="boundary='open'"):
        cnn.models.create("stencil_integrator", boundary="open")


# ------------------------------------------------------------------------------------- the task


def test_make_windows_matches_loop():
    trajectories = np.arange(2 * 5 * 3).reshape(2, 5, 3)
    windows = dynamics.make_windows(trajectories, 3)
    expected = [trajectories[n, s : s + 3] for n in range(2) for s in range(3)]
    np.testing.assert_array_equal(windows, np.stack(expected))


def test_loss_is_the_mean_squared_error_of_the_predicted_states():
    task = dynamics.dynamics(context=1)
    window = np.random.default_rng(0).normal(size=(3, 4, 2)).astype(np.float32)
    prediction = np.random.default_rng(1).normal(size=(3, 2, 2)).astype(np.float32)
    loss, _ = task.loss(dynamics_models.IntegratorOutput(jnp.asarray(prediction), None), {"window": window})
    assert float(loss) == pytest.approx(np.mean((prediction - window[:, 2:]) ** 2), rel=1e-6)
    assert dict(task.model_options) == {"context": 1} and not task.takes_num_classes
    assert (task.best_metric, task.best_mode, task.augment_keys) == ("rollout_relative_l2", "min", ())


def test_evaluation_of_an_untrained_integrator_is_persistence():
    """The MLP's output layer starts at zero, so at step 0 the integrator is x_{t+1} = x_t: every
    metric has a numpy closed form. Three trajectories in batches of 2 (a padded final batch)."""
    task = dynamics.dynamics(context=1)
    test = synthetic.pendulum(3, 12, H, seed=5)["states"].astype(np.float32).astype(np.float64)
    model = cnn.models.create("mlp_integrator", scheme="ab2", h=H, hidden=(8,), context=1)
    tx, _ = make_optimizer({"name": "sgd", "learning_rate": 0.1}, total_steps=1)
    state = create_train_state(model, tx, rng=0, input_shape=(1,) + test.shape[1:])
    batches = dynamics.window_datasets({"test": test})("test", batch_size=2, shuffle=False, seed=0,
                                                       drop_remainder=False, num_epochs=1)
    result = evaluate(state, batches, task=task)
    truth, start = test[:, 2:], test[:, 1:2]
    previous = test[:, 1:-1]
    per_trajectory_final = np.linalg.norm(truth[:, -1] - start[:, 0], axis=-1)
    assert result["count"] == 3
    persistence = np.linalg.norm(truth - start) / np.linalg.norm(truth)
    assert result["rollout_relative_l2"] == pytest.approx(persistence, rel=1e-5)
    assert result["rollout_relative_change"] == pytest.approx(1.0, rel=1e-6)
    assert result["rollout_final_error"] == pytest.approx(per_trajectory_final.mean(), rel=1e-5)
    assert result["one_step_rmse"] == pytest.approx(np.sqrt(np.mean((truth - previous) ** 2)), rel=1e-5)
    assert result["one_step_relative"] == pytest.approx(1.0, rel=1e-6)


def test_summary_of_a_diverged_rollout_is_inf():
    totals = {"rollout_sq": np.float32(np.inf), "truth_sq": 4.0, "change_sq": 1.0, "final_error": np.nan,
              "one_step_sq": 1.0, "increment_sq": 4.0, "entries": 4.0, "count": 2.0}
    summary = dynamics.summarize_dynamics(totals)
    assert summary["rollout_relative_l2"] == summary["rollout_final_error"] == math.inf
    assert summary["one_step_rmse"] == 0.5 and summary["one_step_relative"] == 0.5
    with pytest.raises(ValueError, match="count=0"):
        dynamics.summarize_dynamics({**totals, "count": 0.0})


def test_window_datasets_names_the_splits():
    factory = dynamics.window_datasets({"train": np.zeros((4, 3, 2))})
    with pytest.raises(ValueError, match=r"split='test'.*\['train'\]"):
        factory("test", batch_size=2, shuffle=False, seed=0, drop_remainder=False, num_epochs=1)


# ---------------------------------------------------------------------------- on the one trainer


@functools.lru_cache(maxsize=None)
def _pendulum_datasets():
    train = synthetic.pendulum(8, 12, H, seed=0, max_step=1e-2)["states"]
    test = synthetic.pendulum(8, 11, H, seed=1, max_step=1e-2)["states"]
    return dynamics.window_datasets({"train": dynamics.make_windows(train, 3), "test": test})


def _pendulum_config(**overrides):
    """LM-ResNet (a learnable knob, a two-step history: context 1) on pendulum windows, 30 steps."""
    config = {
        "model": "mlp_integrator",
        "model_options": {"scheme": "lm", "h": H, "hidden": (16, 16)},
        "batch_size": 16,
        "eval_batch_size": 8,
        "num_train_steps": 30,
        "optimizer": {"name": "adam", "learning_rate": 1e-2, "schedule": "cosine"},
        "parallelism": "single",
        "log_every_steps": 3,
        "eval_every_steps": 10,
        "checkpoint": {"every_steps": 10},
        "progress": False,
        "plot": False,
    }
    config.update(overrides)
    return config


class Interrupted(Exception):
    pass


def _interrupt_at(stop_step):
    def callback(step, state):
        if step == stop_step:
            raise Interrupted(step)

    return callback


def test_interrupted_then_resumed_equals_uninterrupted_bit_for_bit(tmp_path):
    task = dynamics.dynamics(context=1)
    # Stopped at step 17: past the checkpoint of step 10, with steps 12 and 15 already logged.
    with pytest.raises(Interrupted):
        fit(_pendulum_config(), tmp_path / "a", task=task, datasets=_pendulum_datasets(),
            callbacks=[_interrupt_at(17)])
    assert sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir() if p.name.isdigit()) == ["10"]
    assert max(r["step"] for r in read_metrics(tmp_path / "a")) == 15
    resumed = fit(_pendulum_config(), tmp_path / "a", task=task, datasets=_pendulum_datasets())
    straight = fit(_pendulum_config(), tmp_path / "b", task=task, datasets=_pendulum_datasets())
    assert int(resumed.state.step) == int(straight.state.step) == 30
    for a, b in zip(flat_leaves(resumed.state), flat_leaves(straight.state)):  # params, knob, opt state, rng
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    assert read_metrics(tmp_path / "a") == read_metrics(tmp_path / "b")
    assert resumed.final_eval == straight.final_eval
    assert straight.final_eval["rollout_relative_l2"] < 0.5  # it learned something in 30 steps


# 8 devices partition the batch sums differently from one device: float32 rounding, carried
# through 30 Adam steps. Measured (CPU): params agree to 2.8e-7 (largest |param| 1.5), the eval
# metrics to 2.2e-7 relative. The bounds leave 35-45x margin and fail for any real difference:
# the same run with another batch order (data_seed=1) moves the params by 0.16 and the metrics by 4-5%.
SHARDED_PARAM_ATOL, SHARDED_METRIC_RTOL = 1e-5, 1e-5


def test_eight_devices_equal_one_device(tmp_path):
    if jax.device_count() < 8:
        pytest.skip(f"needs 8 devices (tests/conftest.py forces 8 CPU devices); have {jax.device_count()}")
    task = dynamics.dynamics(context=1)
    single = fit(_pendulum_config(), tmp_path / "single", task=task, datasets=_pendulum_datasets())
    sharded = fit(_pendulum_config(parallelism="sharded"), tmp_path / "sharded", task=task,
                  datasets=_pendulum_datasets())
    for a, b in zip(flat_leaves(single.state.params), flat_leaves(sharded.state.params)):
        np.testing.assert_allclose(a, b, atol=SHARDED_PARAM_ATOL, rtol=0)
    for key, value in single.final_eval.items():
        assert sharded.final_eval[key] == pytest.approx(value, rel=SHARDED_METRIC_RTOL), key


def test_nan_guard_stops_a_diverging_run(tmp_path):
    """SGD with a step 1e4 times too large on the stencil's quadratic loss: the kernel grows by a
    factor ~1e4 per step and the loss overflows float32 within a few steps."""
    fields = np.random.default_rng(0).normal(size=(8, 3, 6, 6, 1))
    datasets = dynamics.window_datasets({"train": dynamics.make_windows(fields, 2), "test": fields})
    config = {"model": "stencil_integrator", "batch_size": 8, "num_train_steps": 40, "parallelism": "single",
              "optimizer": {"name": "sgd", "learning_rate": 1e4, "momentum": 0.0}, "checkpoint": {"every_steps": 0},
              "eval_every_steps": 40, "progress": False, "plot": False}
    with pytest.raises(NonFiniteLossError, match="training stopped at step") as error:
        fit(config, tmp_path / "nan", task=dynamics.dynamics(), datasets=datasets)
    assert 1 < error.value.step < 40 and error.value.last_checkpoint is None
