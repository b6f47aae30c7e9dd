"""`fit` end to end on the digits: learning, run directory, determinism, NaN stop, device changes."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cnn.models
from cnn.train import loop
from cnn.train.checkpoint import restore_state, tree_is_finite
from tests.train.helpers import digits_datasets, flat_leaves, have_data_load, read_metrics, tiny_config


def _fit(config, workdir, **kwargs):
    return loop.fit(config, workdir, datasets=digits_datasets, **kwargs)


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("learn")
    config = tiny_config(num_train_steps=150, log_every_steps=10, eval_every_steps=75, plot=True)
    config.checkpoint.every_steps = 25
    return _fit(config, workdir)


def test_loss_decreases_and_accuracy_rises_on_digits(learned):
    train = learned.train_history
    assert [r["step"] for r in train] == list(range(10, 151, 10))
    first, last = train[0], train[-1]
    # Untrained: about chance (loss ~ ln 10 = 2.30, accuracy ~ 0.1); 150 steps of batch 32 learn.
    assert first["train/loss"] > 1.9 and first["train/accuracy"] < 0.4
    assert last["train/loss"] < 0.5 * first["train/loss"]
    assert last["train/accuracy"] > 0.85
    assert learned.final_eval["count"] == (359 if have_data_load() else 360)
    assert learned.final_eval["accuracy"] > 0.85
    assert learned.eval_history[0]["eval/accuracy"] < learned.eval_history[-1]["eval/accuracy"] + 1e-9
    assert int(learned.state.step) == 150


def test_run_directory_contents(learned):
    workdir = learned.workdir
    config = json.loads((workdir / "config.json").read_text())
    assert config["model"] == "simple_cnn" and config["num_train_steps"] == 150
    records = read_metrics(workdir)
    assert [r["step"] for r in records if "eval/accuracy" in r] == [75, 150]
    expected = [
        {k: v for k, v in r.items() if k != "train/examples_per_sec"} for r in learned.train_history + learned.eval_history
    ]
    assert sorted(map(json.dumps, records)) == sorted(map(json.dumps, expected))
    assert any(path.name.startswith("events.out.tfevents") for path in (workdir / "events").iterdir())
    png = (workdir / "plots" / "learning_curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    results = json.loads((workdir / "results.json").read_text())
    assert results["final_eval"]["accuracy"] == pytest.approx(learned.final_eval["accuracy"])
    # Checkpoints every 25 steps; kept: the last 3 (100, 125, 150) and the best by eval accuracy
    # among those saved with an evaluation (75, 150).
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    best = 75 if learned.eval_history[0]["eval/accuracy"] > learned.eval_history[1]["eval/accuracy"] else 150
    assert steps == sorted({100, 125, 150, best})
    assert learned.best_step == best


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """20 steps, seed 0, one device: the reference of the determinism and device-change tests."""
    workdir = tmp_path_factory.mktemp("base")
    return _fit(tiny_config(num_train_steps=20), workdir)


def test_same_seed_identical_different_seed_differs(tmp_path, base):
    same = _fit(tiny_config(seed=0, num_train_steps=20), tmp_path / "same")
    other = _fit(tiny_config(seed=1, num_train_steps=20), tmp_path / "other")
    assert read_metrics(tmp_path / "same") == read_metrics(base.workdir)
    assert all(np.array_equal(x, y) for x, y in zip(flat_leaves(same.state), flat_leaves(base.state)))
    assert same.final_eval == base.final_eval
    assert read_metrics(tmp_path / "other") != read_metrics(base.workdir)
    assert not any(np.array_equal(x, y) for x, y in zip(flat_leaves(other.state.params), flat_leaves(base.state.params)))


def test_nan_stops_with_step_and_last_good_checkpoint(tmp_path):
    # The learning rate jumps from 0.1 to 1e6 after 10 updates (injected through the config).
    config = tiny_config(num_train_steps=60, eval_every_steps=5)
    config.optimizer.schedule = "piecewise"
    config.optimizer.decay_steps = (10,)
    config.optimizer.decay_factor = 1e7
    config.checkpoint.every_steps = 5
    with pytest.raises(loop.NonFiniteLossError) as info:
        _fit(config, tmp_path)
    error = info.value
    assert error.step > 10
    assert error.last_checkpoint is not None
    message = str(error)
    assert f"training stopped at step {error.step}" in message
    assert f"last good checkpoint: {error.last_checkpoint}" in message
    assert "learning_rate" in message
    good_step = int(error.last_checkpoint.name)
    assert 10 <= good_step < error.step
    # The last good checkpoint restores, with finite parameters.
    restored = restore_state(tmp_path / "checkpoints", _template_state(config), good_step)
    assert int(restored.step) == good_step
    assert tree_is_finite(restored.params) and tree_is_finite(restored.batch_stats)
    # metrics.jsonl holds no record at or after the failing step.
    assert all(r["step"] < error.step for r in read_metrics(tmp_path))


def _template_state(config):
    from cnn.train import optim
    from cnn.train.state import create_train_state, to_host

    model = cnn.models.create("simple_cnn", num_classes=10, **config.model_options)
    tx, _ = optim.make_optimizer(config.optimizer, steps_per_epoch=44, total_steps=config.num_train_steps)
    return to_host(create_train_state(model, tx, rng=config.seed, input_shape=(1, 8, 8, 1)))


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices")
@pytest.mark.parametrize("first, second", [("pmap", "single"), ("single", "sharded")])
def test_resume_onto_a_different_number_of_devices(tmp_path, base, first, second):
    config = tiny_config(num_train_steps=10, parallelism=first)
    partial = _fit(config, tmp_path)
    # The checkpoint holds exactly the state the first run ended with.
    restored = restore_state(tmp_path / "checkpoints", _template_state(config))
    assert int(restored.step) == 10
    for a, b in zip(flat_leaves(restored), flat_leaves(partial.state)):
        np.testing.assert_array_equal(a, b)
    resumed = _fit(tiny_config(num_train_steps=20, parallelism=second, on_mismatch="extend"), tmp_path)
    assert int(resumed.state.step) == 20
    # Equal to the uninterrupted one-device run up to float32 rounding (8 devices reduce in
    # another order).
    for a, b in zip(flat_leaves((resumed.state.params, resumed.state.batch_stats)), flat_leaves((base.state.params, base.state.batch_stats))):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)
    got = [r["train/loss"] for r in read_metrics(tmp_path) if "train/loss" in r]
    want = [r["train/loss"] for r in read_metrics(base.workdir) if "train/loss" in r]
    np.testing.assert_allclose(got, want, rtol=1e-4)


def test_mixed_precision_bfloat16(tmp_path):
    # Shapes and dtypes only (jax.eval_shape: nothing compiled).
    model = cnn.models.create("simple_cnn", num_classes=10, widths=(8, 16), dtype=jnp.bfloat16)
    images = jax.ShapeDtypeStruct((2, 8, 8, 1), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(variables)} == {jnp.dtype(jnp.float32)}
    logits, updates = jax.eval_shape(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]), variables, images)
    assert logits.dtype == jnp.bfloat16
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(updates)} == {jnp.dtype(jnp.float32)}
    result = _fit(tiny_config(dtype="bfloat16", num_train_steps=60), tmp_path)
    dtypes = {leaf.dtype for leaf in jax.tree_util.tree_leaves((result.state.params, result.state.batch_stats))}
    assert dtypes == {np.dtype(np.float32)}
    train = result.train_history
    assert train[-1]["train/loss"] < 0.5 * train[0]["train/loss"]
    assert train[-1]["train/accuracy"] > 0.6
    assert result.final_eval["accuracy"] > 0.3  # chance is 0.1; eval lags (BN running averages)


class _CompileCounter:
    """Counts XLA backend compilations while active (jax.monitoring events)."""

    def __init__(self):
        self.active, self.count = False, 0
        jax.monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, event, duration, **kwargs):
        if self.active and event == "/jax/core/compile/backend_compile_duration":
            self.count += 1


_COUNTER = _CompileCounter()


@pytest.mark.parametrize(
    "overrides, error, pattern",
    [
        ({"parallelism": "sharded", "batch_size": 12}, ValueError, r"config\.batch_size=12 is not divisible by the 8 devices"),
        ({"model": "resnet9000"}, ValueError, r"config\.model='resnet9000' is not a registered model"),
        ({"model_options.pooling": "median"}, ValueError, r"config\.model_options"),
        ({"dtype": "float16"}, ValueError, r"config\.dtype='float16'"),
        ({"data_dir": "/nonexistent/cnn-data"}, FileNotFoundError, r"config\.data_dir='/nonexistent/cnn-data' does not exist"),
        ({"optimizer.name": "lion"}, ValueError, r"optimizer\.name='lion'"),
        ({"log_every_steps": 0}, ValueError, r"config\.log_every_steps"),
    ],
)
def test_bad_config_fails_before_any_compilation(tmp_path, overrides, error, pattern):
    config = tiny_config(**overrides)
    _COUNTER.active, _COUNTER.count = True, 0
    try:
        with pytest.raises(error, match=pattern):
            _fit(config, tmp_path)
    finally:
        _COUNTER.active = False
    assert _COUNTER.count == 0
    assert not (tmp_path / "checkpoints").exists()


def test_unknown_config_field_is_reported():
    config = tiny_config().to_dict()
    config["learning_rate"] = 0.1  # belongs in config.optimizer
    with pytest.raises(ValueError, match=r"unknown config fields \['learning_rate'\]"):
        loop.resolve_config(config)
