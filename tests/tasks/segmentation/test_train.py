"""The segmentation Task through the one trainer's steps: fitting a fixed batch, evaluation against numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cnn.models
from cnn.data import synthetic
from cnn.metrics.segmentation import confusion_matrix, segmentation_metrics
import cnn.train
from cnn.tasks import segmentation
from cnn.train.optim import make_optimizer
from cnn.train.state import create_train_state
from cnn.train.steps import make_train_step

TASK = segmentation.segmentation_task(num_classes=4)


@pytest.fixture(scope="module")
def batch():
    arrays = synthetic.shapes(8, image_size=16, max_objects=2, min_size=5, max_size=9, seed=4)
    masks = arrays["mask"].copy()
    masks[:, :2, :] = 255  # an ignored band: it must not count anywhere
    return {"image": arrays["image"], "mask": masks}


@pytest.fixture(scope="module")
def trained(batch):
    model = cnn.models.create("unet", num_classes=4, depth=1, width=8, batch_norm=True)
    tx, _ = make_optimizer({"name": "adam", "learning_rate": 1e-2, "schedule": "constant"})
    state = create_train_state(model, tx, rng=0, input_shape=(1, 16, 16, 3))
    step = jax.jit(make_train_step(TASK))
    losses = []
    for _ in range(40):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return state, losses, metrics, step


def test_train_step_fits_a_fixed_batch(trained, batch):
    state, losses, metrics, step = trained
    assert set(metrics) == {"loss", "pixel_accuracy", "grad_norm"}
    assert int(state.step) == 40
    assert losses[-1] < 0.3 * losses[0], losses
    assert float(metrics["pixel_accuracy"]) > 0.9
    with pytest.raises(ValueError, match=r"lacks \['mask'\]"):
        TASK.select({"image": batch["image"]})
    with pytest.raises(ValueError, match=r"labels.shape=\(8, 8, 16\) must equal logits.shape"):
        step(state, {"image": batch["image"], "mask": batch["mask"][:, :8]})


def test_evaluate_agrees_with_numpy(trained, batch):
    state = trained[0]
    halves = [{k: v[:5] for k, v in batch.items()}, {k: v[5:] for k, v in batch.items()}]  # uneven batches
    result = cnn.train.evaluate(state, halves, task=TASK)  # the second, short batch is padded
    logits = np.asarray(state.apply_fn(state.variables(), segmentation.normalize_images(batch["image"], None, None),
                                       train=False), np.float64)
    predictions = logits.argmax(-1)
    np.testing.assert_array_equal(
        np.asarray(segmentation.make_predict_fn()(state, batch["image"])), predictions)
    expected_cm = confusion_matrix(batch["mask"], predictions, 4)
    np.testing.assert_array_equal(result["confusion"], expected_cm)
    for name, value in segmentation_metrics(expected_cm).items():
        assert result[name] == pytest.approx(value)
    keep = batch["mask"] != 255
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    labels = np.where(keep, batch["mask"], 0)
    nll = -np.take_along_axis(log_probs, labels[..., None], -1)[..., 0]
    assert result["loss"] == pytest.approx(nll[keep].mean(), rel=1e-4)
    assert np.sum(result["confusion"]) == keep.sum()


def shift(array, dx, dy, fill):
    """`array` moved right by dx and down by dy, uncovered pixels set to `fill`."""
    out = np.full_like(array, fill)
    height, width = array.shape[:2]
    out[max(dy, 0):height + min(dy, 0), max(dx, 0):width + min(dx, 0)] = \
        array[max(-dy, 0):height - max(dy, 0), max(-dx, 0):width - max(dx, 0)]
    return out


def test_augmentation_moves_masks_and_fills_shifts_with_the_ignore_label(batch):
    from cnn.data import augment

    assert segmentation.segmentation_augmentation(flip_horizontal=False) is None
    op = segmentation.segmentation_augmentation(flip_horizontal=False, max_shift=3)
    moved = jax.jit(lambda key: augment.apply_batch(op, key, batch))(jax.random.key(3))
    moved_shifts = 0
    for image, mask, new_image, new_mask in zip(batch["image"], batch["mask"], np.asarray(moved["image"]),
                                                np.asarray(moved["mask"])):
        matches = [(dx, dy) for dx in range(-3, 4) for dy in range(-3, 4)
                   if np.array_equal(shift(image, dx, dy, 0), new_image)]
        assert len(matches) == 1, matches  # the image moved by one integer shift...
        dx, dy = matches[0]
        np.testing.assert_array_equal(new_mask, shift(mask, dx, dy, 255))  # ...and its mask with it
        moved_shifts += (dx, dy) != (0, 0)
    assert moved_shifts >= 4


def test_overlay_variables_copies_matching_leaves_only():
    params = {"features": {"conv1_1": {"kernel": jnp.zeros((3, 3, 3, 4)), "bias": jnp.zeros(4)}},
              "context": {"ctx_final": {"kernel": jnp.zeros((1, 1, 4, 4))}}}
    source = {"features": {"conv1_1": {"kernel": jnp.ones((3, 3, 3, 4)), "bias": jnp.ones(5)}},
              "final": {"kernel": jnp.ones((1, 1, 8, 4))}}
    merged, copied, total = cnn.train.overlay_variables({"params": params}, {"params": source})
    assert (copied, total) == (1, 3)
    np.testing.assert_array_equal(merged["params"]["features"]["conv1_1"]["kernel"], 1.0)
    np.testing.assert_array_equal(merged["params"]["features"]["conv1_1"]["bias"], 0.0)  # shape differs: kept
    np.testing.assert_array_equal(merged["params"]["context"]["ctx_final"]["kernel"], 0.0)


def _unet_config(**overrides):
    config = cnn.train.default_config()
    config.update({"model": "unet", "dataset": "shapes", "train_split": "train[:64]", "eval_split": "test[:16]",
                   "num_classes": 4, "batch_size": 8, "eval_batch_size": 16, "num_train_steps": 2, "progress": False,
                   "plot": False, "log_every_steps": 1, "parallelism": "single", **overrides})
    config.model_options = {"depth": 1, "width": 8, "batch_norm": True}
    config.optimizer.update({"name": "adam", "learning_rate": 0.0, "schedule": "constant"})
    return config


def test_fit_starts_from_init_variables_without_a_step_zero_checkpoint(trained, tmp_path):
    """With learning rate 0, a run started from trained parameters ends with exactly them."""
    state = trained[0]
    result = cnn.train.fit(_unet_config(), tmp_path, task=TASK, init_variables={"params": state.params})
    for got, expected in zip(jax.tree_util.tree_leaves(result.state.params), jax.tree_util.tree_leaves(state.params)):
        np.testing.assert_array_equal(got, expected)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]
    assert 0.0 <= result.final_eval["mean_iou"] <= 1.0
    with pytest.raises(ValueError, match="init_variables shares no variable"):
        cnn.train.fit(_unet_config(), tmp_path / "other", task=TASK,
                      init_variables={"params": {"nothing": {"kernel": jnp.zeros(3)}}})
