"""Data parallelism on 8 forced CPU devices: pmap and sharded jit equal one single-device step.

The single-device step on the global batch is the reference. BatchNorm makes this a real test:
with per-device batch statistics the normalization (hence the gradients and the running
variance) differs from the global-batch step; the pmap path matches only because BatchNorm
averages its statistics across devices (`bn_axis_name`) and gradients are `pmean`ed. The
controls below remove each synchronization and check that the comparison then fails.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cnn.models
from cnn.data import augment
from cnn.train import optim, parallel, steps
from cnn.train.loop import evaluate
from cnn.train.state import create_train_state, to_host
from tests.train.helpers import _sklearn_digits, flat_leaves

NUM_DEVICES = 8
GLOBAL_BATCH = 64
TOL = 1e-5

pytestmark = pytest.mark.skipif(
    jax.device_count() < NUM_DEVICES, reason=f"needs {NUM_DEVICES} devices (tests/conftest.py forces them)"
)


def _batches(count):
    data = _sklearn_digits()["train"]
    return [
        {"image": data["image"][i * GLOBAL_BATCH : (i + 1) * GLOBAL_BATCH], "label": data["label"][i * GLOBAL_BATCH : (i + 1) * GLOBAL_BATCH]}
        for i in range(count)
    ]


def _run(mode, *, bn_sync=True, step_axis="default", use_shard_map=False, num_steps=2):
    """`num_steps` SGD(momentum, weight decay) steps from the same init; returns (state, metrics)."""
    data_parallel = parallel.DataParallel.create(mode, use_shard_map=use_shard_map)
    options = {"bn_axis_name": parallel.PMAP_AXIS} if (mode == "pmap" and bn_sync) else {}
    model = cnn.models.create("simple_cnn", num_classes=10, widths=(8, 16), **options)
    tx, schedule = optim.make_optimizer({"name": "sgd", "learning_rate": 0.1, "momentum": 0.9, "weight_decay": 1e-3})
    host_state = to_host(create_train_state(model, tx, rng=0, input_shape=(1, 8, 8, 1)))
    axis = data_parallel.axis_name if step_axis == "default" else step_axis
    # With on-device augmentation: per-example keys from the global example index, so every
    # layout draws the same shifts.
    augment_fn = steps.make_augment_fn(augment.random_shift(1))
    train_step = data_parallel.compile_train(
        steps.make_train_step(axis_name=axis, learning_rate_fn=schedule, augment_fn=augment_fn)
    )
    state = data_parallel.put_state(host_state)
    for batch in _batches(num_steps):
        state, metrics = train_step(state, data_parallel.put_batch(batch))
    return data_parallel.get_state(state), data_parallel.get_metrics(metrics)


def _max_difference(a, b):
    leaves_a = flat_leaves((a.params, a.batch_stats))
    leaves_b = flat_leaves((b.params, b.batch_stats))
    assert len(leaves_a) == len(leaves_b)
    return max(float(np.max(np.abs(x - y))) for x, y in zip(leaves_a, leaves_b))


@pytest.fixture(scope="module")
def reference():
    return _run("single")


@pytest.mark.parametrize(
    "mode, use_shard_map", [("sharded", False), ("pmap", False), ("pmap", True)], ids=["sharded", "pmap", "pmap-on-shard_map"]
)
def test_multi_device_step_equals_single_device_step(reference, mode, use_shard_map):
    ref_state, ref_metrics = reference
    state, metrics = _run(mode, use_shard_map=use_shard_map)
    assert int(state.step) == int(ref_state.step) == 2
    assert _max_difference(state, ref_state) <= TOL
    # The BatchNorm running statistics in particular (mean and variance of every layer).
    for got, want in zip(flat_leaves(state.batch_stats), flat_leaves(ref_state.batch_stats)):
        np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
    for key in ("loss", "accuracy", "grad_norm"):
        assert metrics[key] == pytest.approx(ref_metrics[key], abs=TOL)


def test_controls_without_synchronization_differ(reference):
    """The equality above is not vacuous: removing either synchronization breaks it."""
    ref_state, _ = reference
    # BatchNorm without the cross-device axis: per-device statistics (gradients still averaged).
    unsynced_bn, _ = _run("pmap", bn_sync=False)
    assert _max_difference(unsynced_bn, ref_state) > 10 * TOL
    variance_difference = max(
        float(np.max(np.abs(a - b)))
        for a, b in zip(flat_leaves(unsynced_bn.batch_stats), flat_leaves(ref_state.batch_stats))
    )
    assert variance_difference > 10 * TOL
    # Gradients not averaged (replica 0 follows its own 8 examples).
    unsynced_grads, _ = _run("pmap", step_axis=None)
    assert _max_difference(unsynced_grads, ref_state) > 10 * TOL


def test_evaluate_pads_and_agrees_across_layouts(reference):
    ref_state, _ = reference
    data = _sklearn_digits()["test"]
    images, labels = data["image"][:60], data["label"][:60]
    batches = [{"image": images[i : i + 24], "label": labels[i : i + 24]} for i in range(0, 60, 24)]  # 24, 24, 12
    # Independent reference: numpy cross-entropy of the model's inference logits.
    model = cnn.models.create("simple_cnn", num_classes=10, widths=(8, 16))
    logits = np.asarray(model.apply({"params": ref_state.params, "batch_stats": ref_state.batch_stats}, images, train=False))
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    want_loss = float(-np.mean(log_probs[np.arange(60), labels]))
    want_accuracy = float(np.mean(logits.argmax(axis=1) == labels))
    for mode in ("single", "pmap", "sharded"):
        data_parallel = parallel.DataParallel.create(mode)
        # pmap models need the axis name in BatchNorm only in training; inference uses running stats.
        state = data_parallel.put_state(ref_state)
        result = evaluate(state, batches, data_parallel=data_parallel)
        assert result["count"] == 60
        assert result["loss"] == pytest.approx(want_loss, rel=1e-5), mode
        assert result["accuracy"] == pytest.approx(want_accuracy, abs=1e-9), mode


def test_augment_hook_is_applied_inside_the_step():
    model = cnn.models.create("simple_cnn", num_classes=10, widths=(4,))
    tx, _ = optim.make_optimizer({"name": "sgd", "learning_rate": 0.1})
    state = create_train_state(model, tx, rng=0, input_shape=(1, 8, 8, 1))
    batch = {key: jnp.asarray(value) for key, value in _batches(1)[0].items()}
    flipped = dict(batch, image=batch["image"][:, :, ::-1, :])
    mirror = lambda key, fields, offset=0: {**fields, "image": fields["image"][:, :, ::-1, :]}  # noqa: E731
    with_hook = jax.jit(steps.make_train_step(augment_fn=mirror))
    without_hook = jax.jit(steps.make_train_step())
    got, _ = with_hook(state, batch)
    want, _ = without_hook(state, flipped)
    for a, b in zip(flat_leaves(got.params), flat_leaves(want.params)):
        np.testing.assert_array_equal(a, b)
    unflipped, _ = without_hook(state, batch)
    assert max(float(np.max(np.abs(a - b))) for a, b in zip(flat_leaves(got.params), flat_leaves(unflipped.params))) > 1e-4


def test_batch_size_must_split_over_devices():
    data_parallel = parallel.DataParallel.create("sharded")
    with pytest.raises(ValueError, match=r"config\.batch_size=12 is not divisible by the 8 devices"):
        data_parallel.check_batch_size(12, "config.batch_size")
    data_parallel.check_batch_size(16, "config.batch_size")
    with pytest.raises(ValueError, match="parallelism='mirror'"):
        parallel.DataParallel.create("mirror")


def test_distributed_settings_from_environment():
    assert parallel.distributed_settings({}) is None
    env = {"CNN_COORDINATOR": "127.0.0.1:1234", "CNN_NUM_PROCESSES": "2", "CNN_PROCESS_ID": "1"}
    assert parallel.distributed_settings(env) == {"coordinator_address": "127.0.0.1:1234", "num_processes": 2, "process_id": 1}
    jax_env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:99", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert parallel.distributed_settings(jax_env)["num_processes"] == 4
    with pytest.raises(ValueError, match="CNN_PROCESS_ID"):
        parallel.distributed_settings({"CNN_COORDINATOR": "127.0.0.1:1", "CNN_NUM_PROCESSES": "2"})
    with pytest.raises(ValueError, match="CNN_PROCESS_ID=2"):
        parallel.distributed_settings({**env, "CNN_PROCESS_ID": "2"})
