"""Decoding YOLO v1 outputs into scored boxes, and detection (decoding + per-class NMS).

At test time the paper multiplies the conditional class probabilities by the box confidences,

    Pr(class_c | object) * Pr(object) * IoU(pred, truth) = Pr(class_c) * IoU(pred, truth),

where the confidence output itself was trained to predict `Pr(object) * IoU` (the loss's
confidence target is the IoU of the responsible predictor), so the product needs no IoU at test
time: it is learnt. Every one of the S*S*B boxes gets one such class-specific score per class.
Both factors are clipped to [0, 1] first, since the network's outputs are linear.

    boxes, scores = decode_predictions(prediction, spec=spec, image_size=(448, 448))
    # boxes [S*S*B, 4] xyxy pixels, scores [S*S*B, C]
    dets = detect(predictions, spec=spec, image_size=(448, 448))   # batched, jit-able
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cnn.tasks.detection import boxes as box_ops
from cnn.tasks.detection.encode import (
    YoloSpec,
    cell_boxes_to_image,
    check_image_size,
    check_predictions,
    split_predictions,
)
from cnn.tasks.detection.nms import Detections, multiclass_nms


def decode_predictions(
    predictions: jnp.ndarray,
    *,
    spec: YoloSpec,
    image_size: tuple[int, int],
    clip_boxes: bool = True,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """All S*S*B predicted boxes of an image (or a batch) with their class-specific scores.

    Args:
      predictions: `[..., S, S, B*5 + C]`.
      spec: the grid geometry.
      image_size: `(height, width)` in pixels.
      clip_boxes: clip the boxes to the image.

    Returns:
      `(boxes [..., S*S*B, 4] xyxy in pixels, scores [..., S*S*B, C])`, boxes in cell order
      (row, col, predictor); `scores = clip(Pr(class | object)) * clip(confidence)`.
    """
    predictions = check_predictions(predictions, spec).astype(jnp.float32)
    height, width = check_image_size(image_size)
    parts = split_predictions(predictions, spec)
    cell_boxes = jnp.concatenate([parts.boxes[..., :2], jnp.square(parts.boxes[..., 2:])], axis=-1)
    relative = cell_boxes_to_image(cell_boxes, spec.grid_size, per_cell_boxes=True)  # [..., S, S, B, 4]
    pixels = relative * jnp.asarray([width, height, width, height], jnp.float32)
    corners = box_ops.convert(pixels, "cxcywh", "xyxy")
    if clip_boxes:
        corners = box_ops.clip(corners, width, height)
    confidence = jnp.clip(parts.confidence, 0.0, 1.0)[..., None]  # [..., S, S, B, 1]
    class_probs = jnp.clip(parts.class_probs, 0.0, 1.0)[..., None, :]  # [..., S, S, 1, C]
    scores = confidence * class_probs  # [..., S, S, B, C]
    lead = predictions.shape[:-3]
    count = spec.grid_size * spec.grid_size * spec.boxes_per_cell
    return corners.reshape(*lead, count, 4), scores.reshape(*lead, count, spec.num_classes)


def detect(
    predictions: jnp.ndarray,
    *,
    spec: YoloSpec,
    image_size: tuple[int, int],
    score_threshold: float = 0.0,
    iou_threshold: float = 0.5,
    max_per_class: int = 20,
    max_detections: int = 50,
) -> Detections:
    """Decodes and suppresses: `[..., S, S, B*5 + C]` -> `Detections` with `[..., max_detections]` slots.

    Args:
      predictions: one image `[S, S, B*5 + C]` or a batch `[batch, S, S, B*5 + C]`.
      spec: the grid geometry.
      image_size: `(height, width)` in pixels.
      score_threshold: keep class-specific scores > this (for mAP keep it low).
      iou_threshold: per-class NMS threshold.
      max_per_class, max_detections: static output sizes (see `multiclass_nms`).

    Returns:
      Detections (boxes xyxy in pixels), sorted by score within an image, with a validity mask.
    """
    predictions = check_predictions(predictions, spec)
    boxes, scores = decode_predictions(predictions, spec=spec, image_size=image_size)

    def one(boxes, scores):
        return multiclass_nms(boxes, scores, iou_threshold=iou_threshold, score_threshold=score_threshold,
                              max_per_class=max_per_class, max_detections=max_detections)

    if predictions.ndim == 3:
        return one(boxes, scores)
    flat_boxes = boxes.reshape(-1, *boxes.shape[-2:])
    flat_scores = scores.reshape(-1, *scores.shape[-2:])
    result = jax.vmap(one)(flat_boxes, flat_scores)
    lead = predictions.shape[:-3]
    return jax.tree_util.tree_map(lambda x: x.reshape(*lead, *x.shape[1:]), result)


__all__ = ["decode_predictions", "detect"]
