"""Greedy non-maximum suppression with a fixed-size output, so that it runs under `jax.jit`.

Greedy NMS: repeatedly keep the highest-scoring remaining box and discard every remaining box that
overlaps it with IoU > `iou_threshold`. Because jit needs static shapes, the result is always
`max_outputs` slots long; a boolean `valid` mask says which slots hold a kept box.

    keep, valid = nms(boxes, scores, iou_threshold=0.5, max_outputs=100)
    kept_boxes = boxes[keep[valid]]                       # outside jit

    dets = multiclass_nms(boxes, class_scores, iou_threshold=0.5, max_per_class=20, max_detections=50)
    # dets.boxes [50, 4], dets.scores [50], dets.classes [50], dets.valid [50]; sorted by score

Equal scores are taken in index order (`argmax` returns the first maximum), which is what a
stable sort by decreasing score gives.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from cnn.tasks.detection import boxes as box_ops


class Detections(NamedTuple):
    """A fixed-size set of detections (a pytree; leading batch axes allowed).

    Attributes:
      boxes: `[..., K, 4]` xyxy boxes (zeros in invalid slots).
      scores: `[..., K]` scores (0 in invalid slots).
      classes: `[..., K]` int32 class indices (-1 in invalid slots).
      valid: `[..., K]` bool, which slots hold a detection; valid slots come first, by score.
    """

    boxes: jnp.ndarray
    scores: jnp.ndarray
    classes: jnp.ndarray
    valid: jnp.ndarray


def _check_max(name: str, value: int) -> int:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer (a static output size)")
    return value


def nms(
    boxes: jnp.ndarray,
    scores: jnp.ndarray,
    *,
    iou_threshold: float = 0.5,
    max_outputs: int,
    score_threshold: float | None = None,
    box_format: str = "xyxy",
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Greedy NMS of one set of boxes, jit-able.

    Args:
      boxes: `[n, 4]` boxes.
      scores: `[n]` scores; boxes with score <= `score_threshold` (when given) or NaN are never kept.
      iou_threshold: a box is suppressed when its IoU with a kept box is > this.
      max_outputs: static number of output slots.
      score_threshold: optional minimum score (exclusive).
      box_format: format of `boxes`.

    Returns:
      `(indices [max_outputs] int32, valid [max_outputs] bool)`: indices into `boxes` of the kept
      boxes in decreasing score order; invalid slots hold -1.
    """
    _check_max("max_outputs", max_outputs)
    if isinstance(iou_threshold, (int, float)) and not 0.0 <= iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold={iou_threshold!r} must lie in [0, 1]")
    boxes = jnp.asarray(boxes)
    scores = jnp.asarray(scores)
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes has shape {tuple(boxes.shape)}; expected [num_boxes, 4]")
    if scores.shape != boxes.shape[:1]:
        raise ValueError(f"scores has shape {tuple(scores.shape)}; expected [{boxes.shape[0]}] (one per box)")
    n = boxes.shape[0]
    if n == 0:
        return jnp.full((max_outputs,), -1, jnp.int32), jnp.zeros((max_outputs,), bool)
    overlaps = box_ops.pairwise_iou(boxes, boxes, box_format=box_format)  # [n, n]
    alive = ~jnp.isnan(scores)
    if score_threshold is not None:
        alive &= scores > score_threshold
    positions = jnp.arange(n)

    def select(k, carry):
        alive, indices, valid = carry
        masked = jnp.where(alive, scores, -jnp.inf)
        # The first alive box with the top score (also right when alive boxes score -inf).
        best = jnp.argmax(alive & (masked == jnp.max(masked)))
        found = alive.any()
        indices = indices.at[k].set(jnp.where(found, best, -1))
        valid = valid.at[k].set(found)
        suppressed = (overlaps[best] > iou_threshold) | (positions == best)
        alive = jnp.where(found, alive & ~suppressed, alive)
        return alive, indices, valid

    init = (alive, jnp.full((max_outputs,), -1, jnp.int32), jnp.zeros((max_outputs,), bool))
    _, indices, valid = jax.lax.fori_loop(0, max_outputs, select, init)
    return indices, valid


def multiclass_nms(
    boxes: jnp.ndarray,
    class_scores: jnp.ndarray,
    *,
    iou_threshold: float = 0.5,
    score_threshold: float = 0.0,
    max_per_class: int = 20,
    max_detections: int = 50,
    box_format: str = "xyxy",
) -> Detections:
    """Per-class greedy NMS of class-specific scores (YOLO's way), then the best overall.

    Every box is a candidate for every class with its class-specific score; NMS runs separately
    for each class (boxes of different classes never suppress each other), keeping at most
    `max_per_class` per class; the `max_detections` highest-scoring survivors are returned.

    Args:
      boxes: `[n, 4]` boxes (shared by all classes).
      class_scores: `[n, C]` score of every box for every class.
      iou_threshold: suppression threshold (IoU > it suppresses).
      score_threshold: candidates need a score > this (0 drops zero scores).
      max_per_class, max_detections: static output sizes.
      box_format: format of `boxes`; the output boxes are xyxy.

    Returns:
      `Detections` with `K = max_detections` slots sorted by decreasing score, valid ones first.
    """
    _check_max("max_per_class", max_per_class)
    _check_max("max_detections", max_detections)
    boxes = box_ops.convert(jnp.asarray(boxes), box_format, "xyxy")
    class_scores = jnp.asarray(class_scores)
    if class_scores.ndim != 2 or class_scores.shape[0] != boxes.shape[0]:
        raise ValueError(
            f"class_scores has shape {tuple(class_scores.shape)}; expected [{boxes.shape[0]}, num_classes]"
        )
    num_classes = class_scores.shape[1]
    per_class = jax.vmap(
        lambda scores: nms(boxes, scores, iou_threshold=iou_threshold, max_outputs=max_per_class,
                           score_threshold=score_threshold),
    )
    indices, valid = per_class(class_scores.T)  # [C, max_per_class]
    safe = jnp.maximum(indices, 0)
    candidate_scores = jnp.take_along_axis(class_scores.T, safe, axis=1)
    candidate_classes = jnp.broadcast_to(jnp.arange(num_classes, dtype=jnp.int32)[:, None], indices.shape)
    flat_scores = jnp.where(valid, candidate_scores, -jnp.inf).reshape(-1)
    k = min(max_detections, flat_scores.shape[0])
    # top_k returns equal values in index order: class order, then score order within a class.
    top_scores, order = jax.lax.top_k(flat_scores, k)
    chosen_valid = valid.reshape(-1)[order]
    chosen_boxes = boxes[safe.reshape(-1)[order]]
    result = Detections(
        boxes=jnp.where(chosen_valid[:, None], chosen_boxes, 0.0),
        scores=jnp.where(chosen_valid, top_scores, 0.0),
        classes=jnp.where(chosen_valid, candidate_classes.reshape(-1)[order], -1),
        valid=chosen_valid,
    )
    if k < max_detections:  # fewer candidate slots than requested: pad with invalid slots
        pad = max_detections - k
        result = Detections(
            boxes=jnp.pad(result.boxes, ((0, pad), (0, 0))),
            scores=jnp.pad(result.scores, (0, pad)),
            classes=jnp.pad(result.classes, (0, pad), constant_values=-1),
            valid=jnp.pad(result.valid, (0, pad)),
        )
    return result


__all__ = ["Detections", "multiclass_nms", "nms"]
