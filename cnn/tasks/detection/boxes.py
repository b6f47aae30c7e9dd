"""Bounding boxes: the three formats, conversions between them, areas and IoU.

Formats (the last axis of a box array, `[..., 4]`):

    "xyxy"    (x_min, y_min, x_max, y_max)          corners; VOC's bounding boxes
    "xywh"    (x_min, y_min, width, height)         top-left corner and size; COCO's boxes
    "cxcywh"  (x_centre, y_centre, width, height)   centre and size; YOLO's parametrization

Coordinates are continuous (a box from 0 to 10 has width 10, not 11 as in the VOC devkit's
inclusive pixel convention), `x` runs along the image width and `y` down its height. A box with
`x_max < x_min` (or a negative size) is degenerate: its area is taken as 0.

IoU comes in two shapes:
  * `iou(a, b)`: element-wise with NumPy broadcasting, `[..., 4] x [..., 4] -> [...]`
    (matched pairs, e.g. a prediction and its target in every grid cell);
  * `pairwise_iou(a, b)`: every box against every box, `[..., n, 4] x [..., m, 4] -> [..., n, m]`.
Both are safe on empty and degenerate boxes: where the union is 0 the IoU is 0 (not NaN), and
their gradients stay finite there.
"""

from __future__ import annotations

import jax.numpy as jnp

BOX_FORMATS = ("xyxy", "xywh", "cxcywh")


def _check_format(name: str, value: str) -> str:
    if value not in BOX_FORMATS:
        raise ValueError(f"{name}={value!r} is not a box format; expected one of {BOX_FORMATS}")
    return value


def _check_boxes(name: str, boxes: jnp.ndarray) -> jnp.ndarray:
    boxes = jnp.asarray(boxes)
    if boxes.ndim < 1 or boxes.shape[-1] != 4:
        raise ValueError(f"{name} has shape {tuple(boxes.shape)}; expected [..., 4] (one box per row)")
    if not jnp.issubdtype(boxes.dtype, jnp.floating):
        boxes = boxes.astype(jnp.float32)
    return boxes


def _xywh_to_xyxy(x, y, w, h):
    return x, y, x + w, y + h


def _cxcywh_to_xyxy(cx, cy, w, h):
    return cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2


def _xyxy_to_xywh(x0, y0, x1, y1):
    return x0, y0, x1 - x0, y1 - y0


def _xyxy_to_cxcywh(x0, y0, x1, y1):
    return (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0


def _xywh_to_cxcywh(x, y, w, h):
    return x + w / 2, y + h / 2, w, h  # width and height pass through unchanged


def _cxcywh_to_xywh(cx, cy, w, h):
    return cx - w / 2, cy - h / 2, w, h


_CONVERSIONS = {
    ("xywh", "xyxy"): _xywh_to_xyxy,
    ("cxcywh", "xyxy"): _cxcywh_to_xyxy,
    ("xyxy", "xywh"): _xyxy_to_xywh,
    ("xyxy", "cxcywh"): _xyxy_to_cxcywh,
    ("xywh", "cxcywh"): _xywh_to_cxcywh,
    ("cxcywh", "xywh"): _cxcywh_to_xywh,
}


def convert(boxes: jnp.ndarray, source: str, target: str) -> jnp.ndarray:
    """Converts boxes `[..., 4]` from format `source` to format `target` (see the module docstring).

    Raises:
      ValueError: an unknown format, or `boxes` whose last axis is not 4.
    """
    _check_format("source", source)
    _check_format("target", target)
    boxes = _check_boxes("boxes", boxes)
    if source == target:
        return boxes
    return jnp.stack(_CONVERSIONS[source, target](*jnp.moveaxis(boxes, -1, 0)), axis=-1)


def area(boxes: jnp.ndarray, box_format: str = "xyxy") -> jnp.ndarray:
    """Areas `[...]` of boxes `[..., 4]`; degenerate boxes (negative width or height) have area 0."""
    corners = convert(boxes, _check_format("box_format", box_format), "xyxy")
    width = jnp.maximum(corners[..., 2] - corners[..., 0], 0.0)
    height = jnp.maximum(corners[..., 3] - corners[..., 1], 0.0)
    return width * height


def _safe_divide(intersection: jnp.ndarray, union: jnp.ndarray) -> jnp.ndarray:
    # The double `where` keeps the gradient finite where the union is 0.
    positive = union > 0
    return jnp.where(positive, intersection / jnp.where(positive, union, 1.0), 0.0)


def _iou_of_corners(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
    """IoU of corner boxes that already broadcast against each other: `[..., 4] x [..., 4] -> [...]`."""
    width = jnp.maximum(jnp.minimum(a[..., 2], b[..., 2]) - jnp.maximum(a[..., 0], b[..., 0]), 0.0)
    height = jnp.maximum(jnp.minimum(a[..., 3], b[..., 3]) - jnp.maximum(a[..., 1], b[..., 1]), 0.0)
    intersection = width * height
    area_a = jnp.maximum(a[..., 2] - a[..., 0], 0.0) * jnp.maximum(a[..., 3] - a[..., 1], 0.0)
    area_b = jnp.maximum(b[..., 2] - b[..., 0], 0.0) * jnp.maximum(b[..., 3] - b[..., 1], 0.0)
    return _safe_divide(intersection, area_a + area_b - intersection)


def iou(a: jnp.ndarray, b: jnp.ndarray, box_format: str = "xyxy") -> jnp.ndarray:
    """Element-wise intersection over union of boxes `a [..., 4]` and `b [..., 4]` (broadcast).

    Args:
      a, b: boxes in `box_format`; their leading axes broadcast like NumPy arrays.
      box_format: "xyxy", "xywh" or "cxcywh".

    Returns:
      `[...]` IoU in [0, 1]; 0 where the union is empty (two zero-area boxes).
    """
    _check_format("box_format", box_format)
    a = convert(_check_boxes("a", a), box_format, "xyxy")
    b = convert(_check_boxes("b", b), box_format, "xyxy")
    return _iou_of_corners(a, b)


def pairwise_iou(a: jnp.ndarray, b: jnp.ndarray, box_format: str = "xyxy") -> jnp.ndarray:
    """IoU of every box of `a [..., n, 4]` with every box of `b [..., m, 4]`: `[..., n, m]`.

    Leading (batch) axes broadcast; a single set of boxes is `[n, 4]`.
    """
    _check_format("box_format", box_format)
    a = convert(_check_boxes("a", a), box_format, "xyxy")
    b = convert(_check_boxes("b", b), box_format, "xyxy")
    if a.ndim < 2 or b.ndim < 2:
        raise ValueError(
            f"pairwise_iou needs box sets [..., n, 4]; got a of shape {tuple(a.shape)}, b of shape {tuple(b.shape)}"
        )
    return _iou_of_corners(a[..., :, None, :], b[..., None, :, :])


def clip(boxes: jnp.ndarray, width: float, height: float) -> jnp.ndarray:
    """Clips corner boxes `[..., 4]` (xyxy) to the image `[0, width] x [0, height]`."""
    boxes = _check_boxes("boxes", boxes)
    limits = jnp.asarray([width, height, width, height], boxes.dtype)
    return jnp.clip(boxes, 0.0, limits)


__all__ = ["BOX_FORMATS", "area", "clip", "convert", "iou", "pairwise_iou"]
