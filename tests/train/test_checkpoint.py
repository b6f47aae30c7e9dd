"""Checkpointer: exact round trip, retention (last N + best), interrupted writes."""

import jax
import numpy as np
import pytest

import cnn.models
from cnn.train import optim
from cnn.train.checkpoint import Checkpointer, tree_is_finite
from cnn.train.state import create_train_state, to_host
from tests.train.helpers import flat_leaves


@pytest.fixture(scope="module")
def host_state():
    model = cnn.models.create("simple_cnn", num_classes=10, widths=(4,))
    config = {"name": "sgd", "momentum": 0.9, "weight_decay": 1e-4, "grad_clip_norm": 1.0,
              "param_groups": {"head": {"pattern": "Dense", "lr_scale": 0.1}}}
    tx, _ = optim.make_optimizer(config)
    return to_host(create_train_state(model, tx, rng=3, input_shape=(1, 8, 8, 1)))


def _perturbed(state, rng, step):
    """A state whose every array differs from the template (so a round trip is not vacuous)."""
    leaves, treedef = jax.tree_util.tree_flatten(state)
    new = [
        (leaf + rng.normal(size=leaf.shape).astype(leaf.dtype)) if np.issubdtype(leaf.dtype, np.floating)
        else (leaf + 1 + np.zeros_like(leaf))
        for leaf in leaves
    ]
    return jax.tree_util.tree_unflatten(treedef, new).replace(step=np.int32(step))


def test_round_trip_is_exact(tmp_path, host_state, rng):
    saved = _perturbed(host_state, rng, 7)
    data_state = {"epoch": 3, "step": 11, "seed": 5}
    loop_state = {"window": {"sums": {"loss": 0.1 + 0.2}, "count": 3}}
    checkpointer = Checkpointer(tmp_path, async_save=True)
    checkpointer.save(7, saved, data_state=data_state, loop_state=loop_state)
    checkpointer.wait()
    restored, got_data, got_loop = checkpointer.restore(host_state)
    checkpointer.close()
    assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(host_state)
    for a, b in zip(flat_leaves(restored), flat_leaves(saved)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    assert int(restored.step) == 7
    assert restored.tx is host_state.tx and restored.apply_fn is host_state.apply_fn
    assert got_data == data_state
    assert got_loop["window"]["sums"]["loss"] == 0.1 + 0.2  # floats survive JSON exactly


def test_keeps_last_n_and_best(tmp_path, host_state):
    checkpointer = Checkpointer(tmp_path, max_to_keep=2, best_metric="eval/accuracy", best_mode="max", async_save=False)
    accuracy = {2: 0.9, 4: 0.5, 6: 0.7}
    for step in range(1, 8):
        metrics = {"eval/accuracy": accuracy[step]} if step in accuracy else None
        checkpointer.save(step, host_state.replace(step=np.int32(step)), metrics=metrics)
    assert checkpointer.all_steps() == [2, 6, 7]
    assert checkpointer.best_step() == 2
    assert checkpointer.latest_step() == 7
    checkpointer.close()
    assert sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit()) == [2, 6, 7]

    by_loss = Checkpointer(tmp_path / "min", max_to_keep=1, best_metric="eval/loss", best_mode="min", async_save=False)
    for step, loss in ((1, 0.3), (2, 0.1), (3, 0.2), (4, 0.5)):
        by_loss.save(step, host_state, metrics={"eval/loss": loss})
    assert by_loss.all_steps() == [2, 4]
    assert by_loss.best_step() == 2
    by_loss.close()


def test_interrupted_write_is_ignored_and_cleaned(tmp_path, host_state):
    checkpointer = Checkpointer(tmp_path, async_save=False)
    checkpointer.save(5, host_state.replace(step=np.int32(5)))
    checkpointer.close()
    # What a process killed during a save leaves behind: a temporary directory, never renamed.
    partial = tmp_path / "9.orbax-checkpoint-tmp-1234567"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "half_written").write_bytes(b"\0" * 100)
    reopened = Checkpointer(tmp_path, async_save=False)
    assert reopened.latest_step() == 5
    restored, _, _ = reopened.restore(host_state)
    assert int(restored.step) == 5
    assert not partial.exists()
    with pytest.raises(FileNotFoundError, match="no checkpoint step=9"):
        reopened.restore(host_state, 9)
    reopened.close()


def test_tree_is_finite():
    assert tree_is_finite({"a": np.ones(3), "b": np.arange(3)})
    assert not tree_is_finite({"a": np.array([1.0, np.nan])})
    assert not tree_is_finite([np.array([np.inf], np.float32)])


@pytest.mark.parametrize("kwargs, field", [({"max_to_keep": 0}, "max_to_keep"), ({"best_mode": "best"}, "best_mode")])
def test_bad_arguments(tmp_path, kwargs, field):
    with pytest.raises(ValueError, match=field):
        Checkpointer(tmp_path, **kwargs)


def test_checkpoint_without_per_evaluation_statistics_names_the_option(tmp_path):
    """A multi-evaluation model saved with shared BatchNorm statistics (as before cnn.ode.norm)
    restores into the same model, and into the per-evaluation model only with a hint."""
    tx, _ = optim.make_optimizer({"name": "sgd", "momentum": 0.9})

    def state(per_evaluation_stats):
        model = cnn.models.create("cifar_resnet", depth=8, width=4, scheme="midpoint",
                                  per_evaluation_stats=per_evaluation_stats)
        return to_host(create_train_state(model, tx, rng=0, input_shape=(1, 8, 8, 3)))

    shared = state(False)
    checkpointer = Checkpointer(tmp_path, async_save=False)
    checkpointer.save(1, shared)
    restored, _, _ = checkpointer.restore(shared)
    assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(shared)
    with pytest.raises(ValueError, match=r"per_evaluation_stats=False"):
        checkpointer.restore(state(True))
    checkpointer.close()
