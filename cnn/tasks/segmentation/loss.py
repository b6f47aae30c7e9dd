"""Per-pixel softmax cross-entropy with an ignore label and optional class weights.

    loss = pixel_cross_entropy(logits, labels)                       # mean over non-ignored pixels
    loss = pixel_cross_entropy(logits, labels, class_weights=w)      # sum_p w[y_p] l_p / sum_p w[y_p]

Pixels labelled `ignore_label` (255: VOC's object boundaries and "void") contribute nothing and
are not counted in the normalization (Caffe's `normalization: VALID`). With class weights the
loss is the weighted mean `sum_p w[y_p] l_p / sum_p w[y_p]` (PyTorch's `CrossEntropyLoss(weight=)`
convention); SegNet balances classes with `median_frequency_weights`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

IGNORE_LABEL = 255


def _check(logits: jax.Array, labels: jax.Array) -> None:
    if logits.ndim < 2 or tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"labels.shape={tuple(labels.shape)} must equal logits.shape[:-1]={tuple(logits.shape[:-1])} "
            "(logits [..., num_classes], e.g. [batch, height, width, num_classes])"
        )


def per_pixel_cross_entropy(
    logits: jax.Array, labels: jax.Array, *, ignore_label: int = IGNORE_LABEL
) -> tuple[jax.Array, jax.Array]:
    """`-log softmax(logits)[label]` per pixel, and which pixels count.

    Args:
      logits: `[batch, height, width, num_classes]` (any leading shape), any float dtype.
      labels: int `[batch, height, width]`, values in `[0, num_classes)` or `ignore_label`.

    Returns:
      `(loss, valid)`: float32 `[batch, height, width]` (0 where ignored) and bool
      `[batch, height, width]`.
    """
    _check(logits, labels)
    valid = labels != ignore_label
    safe = jnp.where(valid, labels, 0).astype(jnp.int32)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    loss = -jnp.take_along_axis(log_probs, safe[..., None], axis=-1)[..., 0]
    return jnp.where(valid, loss, 0.0), valid


def pixel_cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    *,
    ignore_label: int = IGNORE_LABEL,
    class_weights: jax.Array | np.ndarray | None = None,
) -> jax.Array:
    """The mean (or class-weighted mean) cross-entropy over the non-ignored pixels.

    Args:
      logits: `[batch, height, width, num_classes]`.
      labels: int `[batch, height, width]`.
      ignore_label: the label that marks pixels to leave out.
      class_weights: optional `[num_classes]` weights; pixel `p` counts `w[y_p]` times.

    Returns:
      A float32 scalar; 0 when every pixel is ignored.
    """
    loss, valid = per_pixel_cross_entropy(logits, labels, ignore_label=ignore_label)
    if class_weights is None:
        weights = valid.astype(jnp.float32)
    else:
        class_weights = jnp.asarray(class_weights, jnp.float32)
        if class_weights.shape != (logits.shape[-1],):
            raise ValueError(
                f"class_weights must have shape [num_classes={logits.shape[-1]}], got {tuple(class_weights.shape)}"
            )
        weights = jnp.where(valid, class_weights[jnp.where(valid, labels, 0).astype(jnp.int32)], 0.0)
    total = jnp.sum(weights)
    return jnp.where(total > 0, jnp.sum(loss * weights) / jnp.where(total > 0, total, 1.0), 0.0)


def median_frequency_weights(
    masks: Any, num_classes: int, *, ignore_label: int = IGNORE_LABEL
) -> np.ndarray:
    """SegNet's median frequency balancing (Eigen & Fergus 2015): `w_c = median(f) / f_c`.

    `f_c` is the number of pixels of class `c` divided by the number of pixels of the images in
    which `c` appears. Classes that never appear get weight 0.

    Args:
      masks: int `[num_images, height, width]` label maps (ignored pixels excluded), or an
        iterable of `[height, width]` maps of any sizes.

    Returns:
      float64 `[num_classes]`.
    """
    class_pixels = np.zeros(num_classes, np.float64)
    image_pixels = np.zeros(num_classes, np.float64)
    for mask in masks:
        mask = np.asarray(mask)
        counted = mask[mask != ignore_label].astype(np.int64)
        if counted.size and (counted.min() < 0 or counted.max() >= num_classes):
            raise ValueError(
                f"masks must hold labels in [0, num_classes={num_classes}) or ignore_label={ignore_label}; "
                f"found [{counted.min()}, {counted.max()}]"
            )
        counts = np.bincount(counted, minlength=num_classes)
        class_pixels += counts
        image_pixels += (counts > 0) * counted.size
    present = image_pixels > 0
    if not present.any():
        raise ValueError("masks contain no labelled pixel")
    frequency = np.where(present, class_pixels / np.where(present, image_pixels, 1), 0.0)
    median = np.median(frequency[present])
    return np.where(present, median / np.where(present, frequency, 1), 0.0)


__all__ = ["IGNORE_LABEL", "median_frequency_weights", "per_pixel_cross_entropy", "pixel_cross_entropy"]
