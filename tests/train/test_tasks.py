"""One trainer for every task: classification, segmentation and detection through `cnn.train.fit`.

For each task: an interrupted run resumed from its checkpoint equals an uninterrupted run bit for
bit (CPU), 8 devices (sharded jit over the suite's 8 host devices) equal 1 device within float32
reduction-order tolerance, and the NaN guard stops the run naming the step. GoogLeNet's auxiliary
heads train with loss = main + 0.3 x each auxiliary loss (checked by hand on one batch).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cnn.models
import cnn.train
from cnn.data import BatchIterator, synthetic
from cnn.tasks.detection import YoloSpec
from cnn.tasks.detection.task import AUGMENTATION as DETECTION_AUGMENTATION
from cnn.tasks.detection.task import detection_task
from cnn.tasks.segmentation import AUGMENTATION as SEGMENTATION_AUGMENTATION
from cnn.tasks.segmentation import segmentation_task
from tests.train.helpers import flat_leaves, read_metrics

STEPS, INTERRUPT_AT, CHECKPOINT_EVERY = 8, 6, 4


def _shapes(split: str) -> dict[str, np.ndarray]:
    arrays = synthetic.shapes(32 if split == "train" else 16, image_size=16, max_objects=2, min_size=5, max_size=8,
                              seed={"train": 0, "test": 1}[split])
    return {"image": arrays["image"], "label": arrays["label"], "mask": arrays["mask"], "boxes": arrays["boxes"],
            "classes": np.maximum(arrays["box_classes"] - 1, 0).astype(np.int32), "valid": arrays["box_valid"]}


SHAPES = {split: _shapes(split) for split in ("train", "test")}


def shapes_datasets(split: str, *, batch_size: int, **kwargs) -> BatchIterator:
    return BatchIterator(SHAPES[split], batch_size, **kwargs)


def _config(**overrides):
    config = cnn.train.default_config()
    config.update({"dataset": "shapes16", "batch_size": 8, "eval_batch_size": 16, "num_train_steps": STEPS,
                   "log_every_steps": 3, "eval_every_steps": CHECKPOINT_EVERY, "parallelism": "single",
                   "progress": False, "plot": False})
    config.checkpoint.every_steps = CHECKPOINT_EVERY
    config.optimizer.update({"name": "adam", "learning_rate": 3e-3})
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return config


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    task: cnn.train.Task
    overrides: dict


CASES = [
    Case("classification", cnn.train.classification(), {
        "model": "simple_cnn", "num_classes": 4, "model_options": {"widths": (4, 8)}, "augment": "random_flip",
    }),
    Case("segmentation", segmentation_task(num_classes=4), {
        "model": "unet", "num_classes": 4, "model_options": {"depth": 1, "width": 4, "batch_norm": True},
        "augment": SEGMENTATION_AUGMENTATION, "augment_options": {"max_shift": 1},
    }),
    Case("detection", detection_task(YoloSpec(grid_size=2, boxes_per_cell=2, num_classes=3), image_size=(16, 16)), {
        "model": "yolo_v1_tiny", "num_classes": 3, "model_options": {"hidden_units": 16, "dropout_rate": 0.0},
        "augment": DETECTION_AUGMENTATION, "augment_options": {"image_size": (16, 16), "scale": 0.1, "shift": 0.1},
    }),
]


class Interrupt(Exception):
    pass


def _interrupt_after(step_to_stop: int):
    def callback(step, state):
        if step == step_to_stop:
            raise Interrupt
    return callback


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_interrupted_and_resumed_equals_uninterrupted(case, tmp_path):
    config = _config(**case.overrides)
    with pytest.raises(Interrupt):
        cnn.train.fit(config, tmp_path / "resumed", task=case.task, datasets=shapes_datasets,
                      callbacks=[_interrupt_after(INTERRUPT_AT)])
    resumed = cnn.train.fit(config, tmp_path / "resumed", task=case.task, datasets=shapes_datasets)
    straight = cnn.train.fit(config, tmp_path / "straight", task=case.task, datasets=shapes_datasets)
    assert int(resumed.state.step) == int(straight.state.step) == STEPS
    for a, b in zip(flat_leaves(resumed.state), flat_leaves(straight.state)):
        np.testing.assert_array_equal(a, b)
    assert read_metrics(tmp_path / "resumed") == read_metrics(tmp_path / "straight")
    assert resumed.final_eval == straight.final_eval
    best = {"classification": "accuracy", "segmentation": "mean_iou", "detection": "map"}[case.name]
    assert best in straight.final_eval and f"eval/{best}" in straight.eval_history[-1]


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_eight_devices_equal_one(case, tmp_path):
    """Sharded jit over 8 devices vs one device: the same global batches and updates, reduced in
    another order. SGD, because Adam divides by the gradient's own scale: a parameter whose true
    gradient is 0 (a bias before BatchNorm) gets a step of the full learning rate in the direction
    of its rounding noise, which differs between layouts. With SGD the float32 reduction-order
    differences (~1e-7 relative per sum) stay ~1e-6 after 4 steps (YOLO's loss, a sum of squares
    over cells, was seen 2e-5 apart once on a loaded machine); the bounds leave 5-50x room."""
    assert jax.device_count() == 8
    sgd = {"optimizer.name": "sgd", "optimizer.learning_rate": 0.05, "num_train_steps": 4}
    one = cnn.train.fit(_config(**case.overrides, **sgd), tmp_path / "one", task=case.task, datasets=shapes_datasets)
    eight = cnn.train.fit(_config(**case.overrides, **sgd, parallelism="sharded"), tmp_path / "eight",
                          task=case.task, datasets=shapes_datasets)
    for a, b in zip(flat_leaves(one.state.params), flat_leaves(eight.state.params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    train_one = [r["train/loss"] for r in one.train_history]
    train_eight = [r["train/loss"] for r in eight.train_history]
    np.testing.assert_allclose(train_one, train_eight, rtol=1e-4)


def _nan_datasets(split: str, *, batch_size: int, **kwargs):
    """The shapes, with every training image NaN (float): the first loss is NaN."""
    arrays = dict(SHAPES[split])
    if split == "train":
        arrays["image"] = np.full(arrays["image"].shape, np.nan, np.float32)
    return BatchIterator(arrays, batch_size, **kwargs)


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_nan_guard_stops_every_task(case, tmp_path):
    config = _config(**{**case.overrides, "augment": "", "augment_options": {}})
    message = "training stopped at step 1: the (training loss|gradient norm) is nan"
    with pytest.raises(cnn.train.NonFiniteLossError, match=message) as info:
        cnn.train.fit(config, tmp_path, task=case.task, datasets=_nan_datasets)
    assert info.value.step == 1 and info.value.last_checkpoint is None


def _numpy_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    return float(-log_probs[np.arange(len(labels)), labels].mean())


def test_classification_loss_weighs_each_auxiliary_head():
    rng = np.random.default_rng(0)
    logits, aux1, aux2 = (rng.normal(size=(4, 5)).astype(np.float32) for _ in range(3))
    labels = np.array([0, 4, 2, 2], np.int32)
    outputs = cnn.models.googlenet.GoogLeNetOutput(jnp.asarray(logits), jnp.asarray(aux1), jnp.asarray(aux2))
    loss, metrics = cnn.train.classification(aux_weight=0.3).loss(outputs, {"label": labels})
    main = _numpy_cross_entropy(logits, labels)
    want = main + 0.3 * _numpy_cross_entropy(aux1, labels) + 0.3 * _numpy_cross_entropy(aux2, labels)
    assert float(loss) == pytest.approx(want, rel=1e-6)
    assert float(metrics["main_loss"]) == pytest.approx(main, rel=1e-6)
    assert float(metrics["accuracy"]) == np.mean(logits.argmax(-1) == labels)
    plain, plain_metrics = cnn.train.classification().loss(jnp.asarray(logits), {"label": labels})
    assert float(plain) == pytest.approx(main, rel=1e-6) and "main_loss" not in plain_metrics


@pytest.mark.slow  # GoogLeNet's compilation: about 1.5 minutes on 2 cores
def test_googlenet_trains_with_its_auxiliary_losses():
    model = cnn.models.create("googlenet", num_classes=3, aux_logits=True, dropout_rate=0.0)
    tx, _ = cnn.train.make_optimizer({"name": "sgd", "learning_rate": 0.0})
    state = cnn.train.create_train_state(model, tx, rng=0, input_shape=(1, 32, 32, 3))
    batch = {"image": np.random.default_rng(0).uniform(size=(2, 32, 32, 3)).astype(np.float32),
             "label": np.array([0, 2], np.int32)}
    step = jax.jit(cnn.train.make_train_step(cnn.train.classification(aux_weight=0.3)))
    _, metrics = step(state, batch)
    # The same forward pass by hand: the model's three heads in train mode, with the step's key.
    _, dropout_key = jax.random.split(state.step_key())
    outputs, _ = model.apply(state.variables(), jnp.asarray(batch["image"]), train=True, mutable=["batch_stats"],
                             rngs={"dropout": dropout_key})
    main, aux1, aux2 = (_numpy_cross_entropy(np.asarray(o), batch["label"]) for o in outputs)
    assert float(metrics["main_loss"]) == pytest.approx(main, rel=1e-5)
    assert float(metrics["loss"]) == pytest.approx(main + 0.3 * aux1 + 0.3 * aux2, rel=1e-5)
    assert aux1 > 0 and aux2 > 0 and abs(float(metrics["loss"]) - main) > 1e-3  # the auxiliaries count
    # Evaluation scores the main head only (inference mode returns just its logits).
    sums = jax.jit(cnn.train.make_eval_step(cnn.train.classification()))(state, batch)
    logits = model.apply(state.variables(), jnp.asarray(batch["image"]), train=False)
    assert float(sums["loss_sum"]) / 2 == pytest.approx(_numpy_cross_entropy(np.asarray(logits), batch["label"]),
                                                         rel=1e-5)
