"""YOLO v1's training augmentation (images and boxes move together, on device)."""

from __future__ import annotations

from cnn.data import augment


def make_augmentation(
    image_size: tuple[int, int],
    *,
    scale: float = 0.2,
    shift: float = 0.2,
    flip: bool = True,
    exposure: float = 1.5,
    saturation: float = 1.5,
) -> augment.Op | None:
    """The paper's augmentation: random scaling and translation of up to 20% of the image size,
    and random exposure and saturation up to a factor of 1.5 in HSV (Redmon et al. 2016, 2.2).

    Built from `cnn.data.augment.random_affine` (one resampling; boxes move exactly, are clipped
    to the image and dropped when nothing of them is left), an optional left-right mirror (not in
    the paper; darknet's v1 training code flips), then `augment.random_exposure_saturation`
    (darknet's `rand_scale`: a factor in `[1/1.5, 1.5]` each for value and saturation).

    Args:
      image_size: `(height, width)` in pixels (the shift is a fraction of it).
      scale: zoom uniform (log) in `[1 - scale, 1 + scale]`.
      shift: translation uniform in `[-shift, shift]` times the image side, per axis.
      flip: mirror left-right with probability 1/2.
      exposure, saturation: the largest factor on HSV value and saturation (1 disables each).

    Returns:
      An `Op` for `augment.apply_batch`, or None when everything is off.
    """
    if not 0.0 <= scale < 1.0 or not 0.0 <= shift < 1.0:
        raise ValueError(f"augmentation scale={scale!r} and shift={shift!r} must lie in [0, 1)")
    if exposure < 1.0 or saturation < 1.0:
        raise ValueError(f"augmentation exposure={exposure!r} and saturation={saturation!r} must be >= 1 (1 disables)")
    ops = []
    if scale or shift or flip:
        ops.append(augment.random_affine(
            max_degrees=0.0, min_scale=1.0 - scale, max_scale=1.0 + scale,
            max_shift=shift * min(image_size), flip_horizontal=flip,
        ))
    if exposure > 1.0 or saturation > 1.0:
        ops.append(augment.random_exposure_saturation(exposure, saturation))
    if not ops:
        return None
    return ops[0] if len(ops) == 1 else augment.compose(ops)


__all__ = ["make_augmentation"]
