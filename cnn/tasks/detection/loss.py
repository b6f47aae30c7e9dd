"""The YOLO v1 loss (Redmon et al. 2016, equation 3): a weighted sum-squared error.

For image cell i and its predictor j, with 1obj_ij = 1 when an object's centre lies in cell i and
predictor j is responsible for it, 1noobj_ij = 1 - 1obj_ij and 1obj_i = 1 when cell i holds an
object:

    coord_xy  = lambda_coord sum_ij 1obj_ij [(x_i - x^_ij)^2 + (y_i - y^_ij)^2]
    coord_wh  = lambda_coord sum_ij 1obj_ij [(sqrt w_i - sqrt w^_ij)^2 + (sqrt h_i - sqrt h^_ij)^2]
    object    =              sum_ij 1obj_ij (IoU_ij - C^_ij)^2
    no_object = lambda_noobj sum_ij 1noobj_ij (0 - C^_ij)^2
    classes   =              sum_i 1obj_i sum_c (p_i(c) - p^_i(c))^2

with lambda_coord = 5 (localization error counts more than classification error) and
lambda_noobj = 0.5 (most cells hold no object; their confidences would otherwise swamp the
gradient). Square roots of w and h make the same absolute error cost more in a small box; the
network predicts `sqrt w^, sqrt h^` directly (see `cnn.models.yolo`).

The responsible predictor of an object cell is the one whose current box has the highest IoU with
the ground truth ("predictor specialization"). When every predictor misses the box entirely (IoU 0,
common early in training) the one whose box is nearest in squared error is taken, as Darknet does.
The confidence target of the responsible predictor is its IoU with the ground truth (held constant
for the gradient), so the confidence learns `Pr(object) * IoU`; `rescore=False` uses 1 instead.

Each term is summed over the cells of an image and averaged over the batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cnn.tasks.detection import boxes as box_ops
from cnn.tasks.detection.encode import (
    TARGET_BOX,
    TARGET_CLASSES,
    TARGET_OBJECT,
    YoloSpec,
    cell_boxes_to_image,
    split_predictions,
)

LOSS_TERMS = ("coord_xy", "coord_wh", "object", "no_object", "classes")


def responsible_predictor(
    predictions: jnp.ndarray, targets: jnp.ndarray, spec: YoloSpec
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Which predictor answers for each cell's object, and its IoU with the ground truth.

    Args:
      predictions: `[..., S, S, B*5 + C]`.
      targets: `[..., S, S, 5 + C]` (`cnn.tasks.detection.encode_targets`).
      spec: the grid geometry.

    Returns:
      `(index [..., S, S] int32, iou [..., S, S, B])`: the predictor with the highest IoU (the
      nearest box in squared error where all IoUs are 0), and every predictor's IoU.
    """
    parts = split_predictions(predictions, spec)
    predicted = parts.boxes.astype(jnp.float32)
    predicted = jnp.concatenate([predicted[..., :2], jnp.square(predicted[..., 2:])], axis=-1)
    predicted = cell_boxes_to_image(predicted, spec.grid_size, per_cell_boxes=True)  # [..., S, S, B, 4]
    truth = cell_boxes_to_image(targets[..., TARGET_BOX], spec.grid_size, per_cell_boxes=False)
    ious = box_ops.iou(predicted, truth[..., None, :], box_format="cxcywh")
    squared_error = jnp.sum(jnp.square(predicted - truth[..., None, :]), axis=-1)
    by_iou = jnp.argmax(ious, axis=-1)
    by_distance = jnp.argmin(squared_error, axis=-1)
    index = jnp.where(jnp.max(ious, axis=-1) > 0, by_iou, by_distance).astype(jnp.int32)
    return jax.lax.stop_gradient(index), jax.lax.stop_gradient(ious)


def yolo_loss(
    predictions: jnp.ndarray,
    targets: jnp.ndarray,
    *,
    spec: YoloSpec,
    lambda_coord: float = 5.0,
    lambda_noobj: float = 0.5,
    rescore: bool = True,
) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    """The YOLO v1 loss of a batch (module docstring), computed in float32.

    Args:
      predictions: `[batch, S, S, B*5 + C]`, the network's raw (linear) outputs.
      targets: `[batch, S, S, 5 + C]`, from `encode_batch`.
      spec: the grid geometry.
      lambda_coord, lambda_noobj: the paper's weights (5 and 0.5).
      rescore: confidence target IoU (True, the paper) or 1.

    Returns:
      `(loss, terms)`: the scalar total and a dict of its five terms `LOSS_TERMS` (each already
      weighted), all averaged over the batch.
    """
    predictions = jnp.asarray(predictions).astype(jnp.float32)
    targets = jnp.asarray(targets, jnp.float32)
    expected = tuple(predictions.shape[:-1]) + (spec.target_channels,)
    if targets.shape != expected:
        raise ValueError(
            f"targets has shape {tuple(targets.shape)}; expected {expected} to match predictions of shape "
            f"{tuple(predictions.shape)}"
        )
    if predictions.ndim != 4:
        raise ValueError(f"predictions has shape {tuple(predictions.shape)}; expected [batch, S, S, B*5 + C]")
    parts = split_predictions(predictions, spec)
    objectness = targets[..., TARGET_OBJECT]  # [batch, S, S]
    index, ious = responsible_predictor(predictions, targets, spec)
    responsible = jax.nn.one_hot(index, spec.boxes_per_cell) * objectness[..., None]  # 1obj_ij
    truth = targets[..., TARGET_BOX][..., None, :]  # [batch, S, S, 1, 4]
    xy_error = jnp.sum(jnp.square(parts.boxes[..., :2] - truth[..., :2]), axis=-1)
    wh_error = jnp.sum(jnp.square(parts.boxes[..., 2:] - jnp.sqrt(jnp.maximum(truth[..., 2:], 0.0))), axis=-1)
    confidence_target = ious if rescore else jnp.ones_like(ious)
    object_error = jnp.square(parts.confidence - confidence_target)
    no_object_error = jnp.square(parts.confidence)
    class_error = jnp.sum(jnp.square(parts.class_probs - targets[..., TARGET_CLASSES]), axis=-1)

    batch = predictions.shape[0]
    per_batch = lambda x: jnp.sum(x) / batch  # noqa: E731
    terms = {
        "coord_xy": lambda_coord * per_batch(responsible * xy_error),
        "coord_wh": lambda_coord * per_batch(responsible * wh_error),
        "object": per_batch(responsible * object_error),
        "no_object": lambda_noobj * per_batch((1.0 - responsible) * no_object_error),
        "classes": per_batch(objectness * class_error),
    }
    return sum(terms.values()), terms


__all__ = ["LOSS_TERMS", "responsible_predictor", "yolo_loss"]
