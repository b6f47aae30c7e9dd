"""Semantic segmentation as a `cnn.train.Task`: per-pixel cross-entropy, confusion matrix, mIoU.

    task = segmentation_task(num_classes=4, mean=info.mean, std=info.std)
    result = cnn.train.fit(config, "runs/unet", task=task)       # config.dataset = "shapes"
    result.final_eval["mean_iou"]

A segmentation batch: `{"image": [batch, height, width, channels]` uint8 (0..255) or float
(0..1), `"mask": [batch, height, width]` int class index or the ignore label (255)}`.
Augmentation (`segmentation_augmentation`, named in `config.augment`) moves image and mask
together; the per-channel normalization comes after it, on device.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cnn.data import augment
from cnn.metrics.segmentation import confusion_matrix_jax, per_class_iou, segmentation_metrics
from cnn.tasks.segmentation.loss import IGNORE_LABEL, per_pixel_cross_entropy, pixel_cross_entropy
from cnn.train.task import Task, options_tuple, prepare_images

AUGMENTATION = "cnn.tasks.segmentation.task:segmentation_augmentation"


def normalize_images(images: jax.Array, mean: Sequence[float] | None, std: Sequence[float] | None) -> jax.Array:
    """`(images - mean) / std` per channel (float32), each step skipped when not given."""
    images = prepare_images(jnp.asarray(images)).astype(jnp.float32)
    if mean:
        images = images - jnp.asarray(mean, jnp.float32)
    if std:
        images = images / jnp.asarray(std, jnp.float32)
    return images


def segmentation_augmentation(
    *, flip_horizontal: bool = True, flip_vertical: bool = False, max_shift: int = 0,
    ignore_label: int = IGNORE_LABEL, shift_fill_label: int | None = None,
) -> augment.Op | None:
    """Mirrors and shifts that move image and mask together (`cnn.data.augment`, nearest-neighbour
    for the mask). Pixels uncovered by a shift get label `shift_fill_label` (default: the ignore
    label, so they do not count). Returns None when everything is off."""
    ops = []
    if flip_horizontal or flip_vertical:
        ops.append(augment.random_flip(horizontal=flip_horizontal, vertical=flip_vertical))
    if max_shift:
        fill = ignore_label if shift_fill_label is None else shift_fill_label
        ops.append(augment.random_shift(int(max_shift), mask_fill=fill))
    if not ops:
        return None
    return ops[0] if len(ops) == 1 else augment.compose(ops)


def segmentation_task(
    *,
    num_classes: int,
    ignore_label: int = IGNORE_LABEL,
    class_weights: Sequence[float] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Task:
    """The segmentation `Task` for models mapping `[b, h, w, c]` to `[b, h, w, num_classes]` scores.

    Args:
      num_classes: classes of the masks (the ignore label excluded).
      ignore_label: mask value that neither counts in the loss nor in the metrics.
      class_weights: optional `[num_classes]` loss weights (e.g. `median_frequency_weights`).
      mean, std: per-channel normalization of the [0, 1] images (none when empty).

    Training metrics: `loss`, `pixel_accuracy` (of non-ignored pixels). Summary: `confusion`
    (nested lists), `pixel_accuracy`, `mean_accuracy`, `mean_iou`, `frequency_weighted_iou`, `loss`,
    and `iou/<class>`; the best checkpoint has the highest `mean_iou`.
    """
    if int(num_classes) < 1:
        raise ValueError(f"num_classes={num_classes!r} must be >= 1")
    weights = None if class_weights is None or len(class_weights) == 0 else tuple(float(w) for w in class_weights)
    if weights is not None and len(weights) != int(num_classes):
        raise ValueError(f"class_weights has {len(weights)} entries; num_classes={num_classes}")
    mean_t = tuple(float(m) for m in mean) if mean else ()
    std_t = tuple(float(s) for s in std) if std else ()
    num_classes, ignore_label = int(num_classes), int(ignore_label)

    def loss(outputs: jax.Array, batch: Mapping[str, jax.Array]):
        masks = batch["mask"]
        weight_array = None if weights is None else jnp.asarray(weights, jnp.float32)
        value = pixel_cross_entropy(outputs, masks, ignore_label=ignore_label, class_weights=weight_array)
        valid = masks != ignore_label
        correct = (jnp.argmax(outputs, -1) == masks) & valid
        return value, {"pixel_accuracy": jnp.sum(correct) / jnp.maximum(jnp.sum(valid), 1)}

    def eval_sums(outputs: jax.Array, batch: Mapping[str, jax.Array], weight: jax.Array):
        masks = jnp.where(weight[:, None, None] > 0, batch["mask"], ignore_label)  # padding rows ignored
        pixel_loss, valid = per_pixel_cross_entropy(outputs, masks, ignore_label=ignore_label)
        predictions = jnp.argmax(outputs, -1).astype(jnp.int32)
        return {
            "confusion": confusion_matrix_jax(masks, predictions, num_classes, ignore_label=ignore_label),
            "loss_sum": jnp.sum(pixel_loss),
            "count": jnp.sum(valid.astype(jnp.float32)),
        }

    return Task(
        name="segmentation",
        options=options_tuple(num_classes=num_classes, ignore_label=ignore_label, class_weights=weights or (),
                              mean=mean_t, std=std_t),
        batch_keys=("image", "mask"),
        loss=loss,
        eval_sums=eval_sums,
        summarize=summarize_segmentation,
        best_metric="mean_iou",
        best_mode="max",
        augment_keys=(("image", "image"), ("mask", "mask")),
        inputs=lambda batch: normalize_images(batch["image"], mean_t, std_t),
        progress_metric="pixel_accuracy",
    )


def summarize_segmentation(totals: Mapping[str, Any]) -> dict[str, Any]:
    """Metrics of a summed confusion matrix (rows = truth) and pixel loss.

    Raises:
      ValueError: every pixel was ignored.
    """
    confusion = np.asarray(totals["confusion"], np.int64)
    count = float(totals["count"])
    if count <= 0:
        raise ValueError("the evaluation held no labelled pixel")
    summary: dict[str, Any] = {**segmentation_metrics(confusion), "loss": float(totals["loss_sum"]) / count}
    for index, value in enumerate(per_class_iou(confusion)):
        if not np.isnan(value):
            summary[f"iou/{index}"] = float(value)
    summary["confusion"] = confusion.tolist()
    return summary




def make_predict_fn(mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
    """A jitted `predict(state, images) -> int32 [batch, h, w]` class map (inference mode)."""

    @jax.jit
    def predict(state, images: jax.Array) -> jax.Array:
        logits = state.apply_fn(state.variables(), normalize_images(images, mean, std), train=False)
        return jnp.argmax(logits, -1).astype(jnp.int32)

    return predict


__all__ = [
    "AUGMENTATION",
    "make_predict_fn",
    "normalize_images",
    "segmentation_augmentation",
    "segmentation_task",
    "summarize_segmentation",
]
