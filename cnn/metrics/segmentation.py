"""Semantic segmentation metrics from the confusion matrix (Long, Shelhamer & Darrell 2015, Sec. 5).

With `n[i, j]` the number of pixels of true class `i` predicted as class `j`, `t_i = sum_j n[i, j]`
the pixels of class `i`, and `n_cl` the number of classes:

    pixel accuracy           sum_i n_ii / sum_i t_i
    mean accuracy            (1 / n_cl) sum_i n_ii / t_i
    mean IoU (mean IU)       (1 / n_cl) sum_i n_ii / (t_i + sum_j n_ji - n_ii)
    frequency-weighted IoU   (sum_k t_k)^-1 sum_i t_i n_ii / (t_i + sum_j n_ji - n_ii)

Pixels labelled `ignore_label` (255 in VOC: object boundaries and "void") count nowhere. A class
that is absent from both the labels and the predictions has no IoU (0 / 0) and is left out of the
means (`nan` per class); a class absent from the labels has no accuracy and is left out of the
mean accuracy (as in the FCN reference code's `nanmean`).

    cm = confusion_matrix(labels, predictions, num_classes=21)         # numpy, int64 [21, 21]
    cm = cm + np.asarray(confusion_matrix_jax(labels, logits.argmax(-1), num_classes=21))  # on device
    segmentation_metrics(cm)   # {"pixel_accuracy", "mean_accuracy", "mean_iou", "frequency_weighted_iou"}
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

IGNORE_LABEL = 255


def _check_inputs(labels: Any, predictions: Any, num_classes: int) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1, got num_classes={num_classes!r}")
    if tuple(labels.shape) != tuple(predictions.shape):
        raise ValueError(
            f"labels.shape={tuple(labels.shape)} must equal predictions.shape={tuple(predictions.shape)}"
        )


def confusion_matrix(
    labels: np.ndarray, predictions: np.ndarray, num_classes: int, *, ignore_label: int | None = IGNORE_LABEL
) -> np.ndarray:
    """Counts `cm[true, predicted]` over all pixels whose label is not `ignore_label`.

    Args:
      labels: int array of any shape (e.g. `[batch, height, width]`), values in
        `[0, num_classes)` or `ignore_label`.
      predictions: int array of the same shape, values in `[0, num_classes)`.
      num_classes: the number of classes.
      ignore_label: label value excluded from the counts (None: none excluded).

    Returns:
      int64 `[num_classes, num_classes]`.

    Raises:
      ValueError: shapes differ, or a label / prediction lies outside `[0, num_classes)` (and is
        not the ignore label).
    """
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    _check_inputs(labels, predictions, num_classes)
    keep = np.ones(labels.shape, bool) if ignore_label is None else labels != ignore_label
    labels, predictions = labels[keep].astype(np.int64), predictions[keep].astype(np.int64)
    for name, values in (("labels", labels), ("predictions", predictions)):
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(
                f"{name} must lie in [0, num_classes={num_classes})"
                + (f" or equal ignore_label={ignore_label}" if name == "labels" and ignore_label is not None else "")
                + f"; found values in [{values.min()}, {values.max()}]"
            )
    counts = np.bincount(labels * num_classes + predictions, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def confusion_matrix_jax(
    labels: jax.Array, predictions: jax.Array, num_classes: int, *, ignore_label: int | None = IGNORE_LABEL
) -> jax.Array:
    """`confusion_matrix` for use inside jit: int32 `[num_classes, num_classes]`.

    Pixels with the ignore label, or with a label or prediction outside `[0, num_classes)`, are
    not counted (no error can be raised inside a traced function). int32 counts hold up to
    2**31 pixels per call; accumulate across batches on the host in int64.
    """
    _check_inputs(labels, predictions, num_classes)
    labels = labels.astype(jnp.int32).reshape(-1)
    predictions = predictions.astype(jnp.int32).reshape(-1)
    valid = (labels >= 0) & (labels < num_classes) & (predictions >= 0) & (predictions < num_classes)
    if ignore_label is not None:
        valid &= labels != ignore_label
    index = jnp.where(valid, labels * num_classes + predictions, num_classes * num_classes)
    counts = jnp.bincount(index, length=num_classes * num_classes + 1)[:-1]
    return counts.reshape(num_classes, num_classes).astype(jnp.int32)


def _check_matrix(cm: np.ndarray) -> np.ndarray:
    cm = np.asarray(cm)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] < 1:
        raise ValueError(f"cm must be a square [num_classes, num_classes] matrix, got cm.shape={cm.shape}")
    if (cm < 0).any():
        raise ValueError("cm must hold non-negative counts")
    return cm.astype(np.float64)


def per_class_iou(cm: np.ndarray) -> np.ndarray:
    """`n_ii / (t_i + sum_j n_ji - n_ii)` per class; `nan` for classes absent from labels and predictions."""
    cm = _check_matrix(cm)
    union = cm.sum(1) + cm.sum(0) - np.diag(cm)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, np.diag(cm) / np.where(union > 0, union, 1), np.nan)


def per_class_accuracy(cm: np.ndarray) -> np.ndarray:
    """`n_ii / t_i` per class (recall); `nan` for classes absent from the labels."""
    cm = _check_matrix(cm)
    totals = cm.sum(1)
    return np.where(totals > 0, np.diag(cm) / np.where(totals > 0, totals, 1), np.nan)


def pixel_accuracy(cm: np.ndarray) -> float:
    """`sum_i n_ii / sum_i t_i`: the fraction of (non-ignored) pixels labelled correctly."""
    cm = _check_matrix(cm)
    total = cm.sum()
    if total == 0:
        raise ValueError("cm counts no pixels; pixel accuracy is undefined")
    return float(np.trace(cm) / total)


def _nanmean(values: np.ndarray, what: str) -> float:
    if np.all(np.isnan(values)):
        raise ValueError(f"cm counts no pixels; {what} is undefined")
    return float(np.nanmean(values))


def mean_accuracy(cm: np.ndarray) -> float:
    """The mean over classes present in the labels of `n_ii / t_i`."""
    return _nanmean(per_class_accuracy(cm), "mean accuracy")


def mean_iou(cm: np.ndarray) -> float:
    """The mean over classes present in labels or predictions of their intersection over union."""
    return _nanmean(per_class_iou(cm), "mean IoU")


def frequency_weighted_iou(cm: np.ndarray) -> float:
    """`sum_i t_i IoU_i / sum_i t_i`: per-class IoU weighted by each class's share of the pixels."""
    cm = _check_matrix(cm)
    totals = cm.sum(1)
    if totals.sum() == 0:
        raise ValueError("cm counts no pixels; frequency-weighted IoU is undefined")
    iou = np.nan_to_num(per_class_iou(cm))  # nan only where t_i = 0, whose weight is 0
    return float((totals * iou).sum() / totals.sum())


def segmentation_metrics(cm: np.ndarray) -> dict[str, float]:
    """All four summary metrics of a confusion matrix, as floats."""
    return {
        "pixel_accuracy": pixel_accuracy(cm),
        "mean_accuracy": mean_accuracy(cm),
        "mean_iou": mean_iou(cm),
        "frequency_weighted_iou": frequency_weighted_iou(cm),
    }


__all__ = [
    "IGNORE_LABEL",
    "confusion_matrix",
    "confusion_matrix_jax",
    "frequency_weighted_iou",
    "mean_accuracy",
    "mean_iou",
    "per_class_accuracy",
    "per_class_iou",
    "pixel_accuracy",
    "segmentation_metrics",
]
