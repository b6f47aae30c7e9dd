"""PASCAL VOC detection metrics: per-class average precision and mAP (NumPy, on the host).

The evaluation follows the VOC devkit (`VOCevaldet.m`):

1. All detections of a class, over all images, are sorted by decreasing score (a stable sort:
   equal scores keep the order they were given in, image by image, as MATLAB's `sort` does).
2. Each detection, in that order, is compared with the ground-truth boxes of its class in its
   image; the one with the highest IoU is its match if that IoU is >= `iou_threshold` (0.5).
   - matched to a `difficult` object: ignored (neither true nor false positive);
   - matched to an object not yet detected: a true positive, and the object is now detected;
   - matched to an already detected object (a duplicate), or no match: a false positive.
3. `recall = TP / P` with P the number of non-difficult objects of the class, and
   `precision = TP / (TP + FP)`, both cumulative along the sorted detections.
4. AP summarizes the precision/recall curve:
   - "voc07" (VOC 2007 and earlier, 11-point interpolation):
     `AP = 1/11 sum_{t in 0, 0.1, ..., 1} max_{recall >= t} precision` (0 where no point reaches t);
   - "voc2010" (VOC 2010 onwards, all points): the area under the precision envelope
     `p_interp(r) = max_{r' >= r} precision(r')`, summed over the recall values where recall changes.
5. mAP is the mean of AP over the classes that have at least one non-difficult object; a class
   without any has no defined AP (NaN) and is left out.

Boxes are xyxy in continuous coordinates (a box from 0 to 10 is 10 wide; the devkit's inclusive
pixel convention would add 1 to widths and heights).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

AP_METHODS = ("voc07", "voc2010")


def average_precision(recall: np.ndarray, precision: np.ndarray, method: str = "voc2010") -> float:
    """AP of a precision/recall curve (points in detection order, recall non-decreasing).

    Args:
      recall, precision: `[k]` cumulative recall and precision after each detection.
      method: "voc07" (11-point interpolation) or "voc2010" (all-point).

    Returns:
      AP in [0, 1]; 0 for an empty curve.
    """
    if method not in AP_METHODS:
        raise ValueError(f"method={method!r} is not one of {AP_METHODS}")
    recall = np.asarray(recall, np.float64).reshape(-1)
    precision = np.asarray(precision, np.float64).reshape(-1)
    if recall.shape != precision.shape:
        raise ValueError(f"recall has shape {recall.shape} but precision has shape {precision.shape}")
    if method == "voc07":
        total = 0.0
        for threshold in np.linspace(0.0, 1.0, 11):
            reached = recall >= threshold
            total += precision[reached].max() if reached.any() else 0.0
        return float(total / 11.0)
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # the envelope: max precision to the right
    changes = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[changes + 1] - mrec[changes]) * mpre[changes + 1]))


def _iou_one_to_many(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    width = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0.0, None)
    height = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0.0, None)
    intersection = width * height
    area = lambda b: np.clip(b[..., 2] - b[..., 0], 0.0, None) * np.clip(b[..., 3] - b[..., 1], 0.0, None)  # noqa: E731
    union = area(box) + area(boxes) - intersection
    return np.divide(intersection, union, out=np.zeros_like(intersection), where=union > 0)


def _field(item: Any, name: str, default: Any = None) -> Any:
    if isinstance(item, Mapping):
        return item.get(name, default)
    return getattr(item, name, default)


def _image_arrays(item: Any, index: int, what: str, fields: Sequence[str]) -> dict[str, np.ndarray]:
    boxes = _field(item, "boxes")
    if boxes is None:
        raise ValueError(f"{what}[{index}] has no 'boxes'")
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4) if np.size(boxes) else np.zeros((0, 4))
    count = boxes.shape[0]
    arrays = {"boxes": boxes}
    for name in fields:
        value = _field(item, name)
        if value is None:
            if name in ("scores", "classes"):
                raise ValueError(f"{what}[{index}] has no {name!r}")
            value = np.zeros(count, bool) if name == "difficult" else np.ones(count, bool)
        value = np.asarray(value).reshape(-1)
        if value.shape[0] != count:
            raise ValueError(f"{what}[{index}][{name!r}] has {value.shape[0]} entries for {count} boxes")
        arrays[name] = value
    keep = arrays.pop("valid").astype(bool)
    return {name: value[keep] for name, value in arrays.items()}


@dataclasses.dataclass(frozen=True)
class DetectionEvaluation:
    """The result of `evaluate_detections`.

    Attributes:
      average_precision: `[C]` AP per class, NaN for classes without non-difficult objects.
      mean_ap: mean of the defined APs (NaN when none is defined).
      recall, precision: per class, the cumulative curves `[k_c]` along the sorted detections
        (ignored detections of difficult objects are left out).
      num_positives: `[C]` non-difficult ground-truth objects per class.
      num_detections: `[C]` detections per class.
      iou_threshold, method: the settings used.
    """

    average_precision: np.ndarray
    mean_ap: float
    recall: tuple[np.ndarray, ...]
    precision: tuple[np.ndarray, ...]
    num_positives: np.ndarray
    num_detections: np.ndarray
    iou_threshold: float
    method: str


def evaluate_detections(
    detections: Sequence[Any],
    ground_truths: Sequence[Any],
    *,
    num_classes: int,
    iou_threshold: float = 0.5,
    method: str = "voc2010",
) -> DetectionEvaluation:
    """VOC average precision per class and mAP (the procedure in the module docstring).

    Args:
      detections: per image, a mapping (or object with attributes) `boxes [k, 4]` xyxy,
        `scores [k]`, `classes [k]` int, optional `valid [k]` bool (e.g. NMS's fixed-size
        output; invalid rows are dropped).
      ground_truths: per image (same order and length), `boxes [m, 4]` xyxy, `classes [m]`,
        optional `difficult [m]` bool and `valid [m]` bool (padding rows).
      num_classes: C; classes must lie in [0, C).
      iou_threshold: the minimum IoU of a match (0.5 in VOC).
      method: "voc07" (11-point) or "voc2010" (all-point) interpolation.

    Raises:
      ValueError: mismatched lengths, missing fields, classes out of range or a bad setting.
    """
    if method not in AP_METHODS:
        raise ValueError(f"method={method!r} is not one of {AP_METHODS}")
    if not 0.0 <= iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold={iou_threshold!r} must lie in [0, 1]")
    if not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"num_classes={num_classes!r} must be a positive integer")
    if len(detections) != len(ground_truths):
        raise ValueError(
            f"detections has {len(detections)} images but ground_truths has {len(ground_truths)}; "
            "give one entry per image to both"
        )
    dets = [_image_arrays(d, i, "detections", ("scores", "classes", "valid")) for i, d in enumerate(detections)]
    gts = [_image_arrays(g, i, "ground_truths", ("classes", "difficult", "valid")) for i, g in enumerate(ground_truths)]
    for what, items in (("detections", dets), ("ground_truths", gts)):
        for i, item in enumerate(items):
            classes = item["classes"]
            out_of_range = classes.size and (classes.min() < 0 or classes.max() >= num_classes)
            if out_of_range or np.any(classes != np.round(classes)):
                raise ValueError(
                    f"{what}[{i}]['classes'] = {classes.tolist()} must hold integers in [0, num_classes={num_classes})"
                )

    aps, recalls, precisions = np.full(num_classes, np.nan), [], []
    positives, counts = np.zeros(num_classes, np.int64), np.zeros(num_classes, np.int64)
    for c in range(num_classes):
        class_gts = []
        for g in gts:
            mine = g["classes"] == c
            class_gts.append((g["boxes"][mine], g["difficult"][mine].astype(bool), np.zeros(int(mine.sum()), bool)))
        positives[c] = sum(int((~difficult).sum()) for _, difficult, _ in class_gts)
        images, scores, boxes = [], [], []
        for i, d in enumerate(dets):
            mine = d["classes"] == c
            images += [i] * int(mine.sum())
            scores.append(d["scores"][mine].astype(np.float64))
            boxes.append(d["boxes"][mine])
        scores = np.concatenate(scores) if scores else np.zeros(0)
        boxes = np.concatenate(boxes) if boxes else np.zeros((0, 4))
        counts[c] = scores.size
        order = np.argsort(-scores, kind="stable")
        true_positive, false_positive = [], []
        for k in order:
            gt_boxes, difficult, detected = class_gts[images[k]]
            if gt_boxes.shape[0]:
                overlaps = _iou_one_to_many(boxes[k], gt_boxes)
                best = int(np.argmax(overlaps))
                matched = overlaps[best] >= iou_threshold
            else:
                matched = False
            if matched and difficult[best]:
                continue  # neither a true nor a false positive
            if matched and not detected[best]:
                detected[best] = True
                true_positive.append(1.0), false_positive.append(0.0)
            else:
                true_positive.append(0.0), false_positive.append(1.0)
        tp, fp = np.cumsum(true_positive), np.cumsum(false_positive)
        recall = tp / positives[c] if positives[c] else np.full(tp.shape, np.nan)
        precision = tp / np.maximum(tp + fp, np.finfo(np.float64).tiny)
        recalls.append(recall)
        precisions.append(precision)
        if positives[c]:
            aps[c] = average_precision(recall, precision, method)
    defined = aps[~np.isnan(aps)]
    return DetectionEvaluation(
        average_precision=aps,
        mean_ap=float(defined.mean()) if defined.size else float("nan"),
        recall=tuple(recalls),
        precision=tuple(precisions),
        num_positives=positives,
        num_detections=counts,
        iou_threshold=float(iou_threshold),
        method=method,
    )


def mean_average_precision(
    detections: Sequence[Any],
    ground_truths: Sequence[Any],
    *,
    num_classes: int,
    iou_threshold: float = 0.5,
    method: str = "voc2010",
) -> float:
    """`evaluate_detections(...).mean_ap`: VOC mAP at `iou_threshold` (mAP@0.5 by default)."""
    return evaluate_detections(
        detections, ground_truths, num_classes=num_classes, iou_threshold=iou_threshold, method=method
    ).mean_ap


__all__ = ["AP_METHODS", "DetectionEvaluation", "average_precision", "evaluate_detections", "mean_average_precision"]
