"""YOLO v1's training augmentation (images and boxes move together, on device)."""

from __future__ import annotations

from cnn.data import augment


def make_augmentation(
    image_size: tuple[int, int], *, scale: float = 0.2, shift: float = 0.2, flip: bool = True
) -> augment.Op | None:
    """The paper's augmentation: random scaling and translation of up to 20% of the image size.

    Built from `cnn.data.augment.random_affine` (one resampling; boxes move exactly, are clipped
    to the image and dropped when nothing of them is left), plus an optional left-right mirror.

    Args:
      image_size: `(height, width)` in pixels (the shift is a fraction of it).
      scale: zoom uniform (log) in `[1 - scale, 1 + scale]`.
      shift: translation uniform in `[-shift, shift]` times the image side, per axis.
      flip: mirror left-right with probability 1/2.

    Returns:
      An `Op` for `augment.apply_batch`, or None when all three are off.
    """
    if not 0.0 <= scale < 1.0 or not 0.0 <= shift < 1.0:
        raise ValueError(f"augmentation scale={scale!r} and shift={shift!r} must lie in [0, 1)")
    if scale == 0 and shift == 0 and not flip:
        return None
    return augment.random_affine(
        max_degrees=0.0, min_scale=1.0 - scale, max_scale=1.0 + scale,
        max_shift=shift * min(image_size), flip_horizontal=flip,
    )


__all__ = ["make_augmentation"]
