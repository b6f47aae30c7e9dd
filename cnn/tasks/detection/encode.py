"""YOLO v1 grid geometry and target encoding.

The image is divided into an S x S grid. The cell containing an object's box centre is
responsible for it: that cell's target holds the centre relative to the cell, `x = cx*S - col`,
`y = cy*S - row` (both in [0, 1]), and the size relative to the image, `w = bw / width`,
`h = bh / height`, plus the object's class (YOLO v1 predicts a single class per cell).

    spec = YoloSpec(grid_size=7, boxes_per_cell=2, num_classes=20)
    targets = encode_targets(boxes, classes, valid, spec=spec, image_size=(448, 448))
    # targets: [S, S, 5 + C] = (x, y, w, h, objectness, one-hot class) per cell

A cell can hold one object only. When several box centres fall into the same cell the largest box
(ties: the first one) is kept and the others get no target, a limitation the paper discusses
(small objects in groups, such as flocks of birds).

The network's prediction for a cell, `[B*5 + C]`, is laid out as `cnn.models.yolo` documents:
B times `(x, y, sqrt(w), sqrt(h), confidence)`, then C class probabilities; `split_predictions`
cuts it into those parts.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from cnn.tasks.detection import boxes as box_ops

TARGET_BOX, TARGET_OBJECT, TARGET_CLASSES = slice(0, 4), 4, slice(5, None)


@dataclasses.dataclass(frozen=True)
class YoloSpec:
    """The output geometry: S x S cells, B boxes per cell, C classes (7, 2, 20 in the paper)."""

    grid_size: int = 7
    boxes_per_cell: int = 2
    num_classes: int = 20

    def __post_init__(self):
        for name in ("grid_size", "boxes_per_cell", "num_classes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"YoloSpec.{name}={value!r} must be a positive integer")

    @property
    def cell_channels(self) -> int:
        """B*5 + C, the last axis of a prediction."""
        return self.boxes_per_cell * 5 + self.num_classes

    @property
    def target_channels(self) -> int:
        """5 + C, the last axis of a target."""
        return 5 + self.num_classes


class SplitPredictions(NamedTuple):
    """A prediction `[..., S, S, B*5 + C]` cut into its parts.

    Attributes:
      boxes: `[..., S, S, B, 4]` as predicted: `(x, y, sqrt(w), sqrt(h))`.
      confidence: `[..., S, S, B]`, the predicted `Pr(object) * IoU`.
      class_probs: `[..., S, S, C]`, the predicted `Pr(class | object)`.
    """

    boxes: jnp.ndarray
    confidence: jnp.ndarray
    class_probs: jnp.ndarray


def check_predictions(predictions: jnp.ndarray, spec: YoloSpec, name: str = "predictions") -> jnp.ndarray:
    """Raises ValueError unless `predictions` is `[..., S, S, B*5 + C]` for `spec`."""
    predictions = jnp.asarray(predictions)
    s = spec.grid_size
    if predictions.ndim < 3 or predictions.shape[-3:] != (s, s, spec.cell_channels):
        raise ValueError(
            f"{name} has shape {tuple(predictions.shape)}; expected [..., {s}, {s}, {spec.cell_channels}] "
            f"for {spec} (B*5 + C channels)"
        )
    return predictions


def split_predictions(predictions: jnp.ndarray, spec: YoloSpec) -> SplitPredictions:
    """Cuts `[..., S, S, B*5 + C]` into boxes, confidences and class probabilities."""
    predictions = check_predictions(predictions, spec)
    b = spec.boxes_per_cell
    per_box = predictions[..., : b * 5].reshape(*predictions.shape[:-1], b, 5)
    return SplitPredictions(per_box[..., :4], per_box[..., 4], predictions[..., b * 5 :])


def cell_offsets(grid_size: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """`(cols, rows)`, each `[S, S]`: the column and row index of every cell."""
    rows, cols = jnp.meshgrid(jnp.arange(grid_size), jnp.arange(grid_size), indexing="ij")
    return cols.astype(jnp.float32), rows.astype(jnp.float32)


def cell_boxes_to_image(cell_boxes: jnp.ndarray, grid_size: int, *, per_cell_boxes: bool) -> jnp.ndarray:
    """Cell-relative `(x, y, w, h)` -> image-relative `cxcywh` (0..1): `cx = (col + x) / S`,
    `cy = (row + y) / S`; `w, h` are already relative to the image.

    Args:
      cell_boxes: `[..., S, S, B, 4]` when `per_cell_boxes`, else `[..., S, S, 4]`.
      grid_size: S.
      per_cell_boxes: whether a box axis B follows the grid axes.
    """
    cols, rows = cell_offsets(grid_size)
    if per_cell_boxes:
        cols, rows = cols[..., None], rows[..., None]
    cx = (cols + cell_boxes[..., 0]) / grid_size
    cy = (rows + cell_boxes[..., 1]) / grid_size
    return jnp.stack([cx, cy, cell_boxes[..., 2], cell_boxes[..., 3]], axis=-1)


def check_image_size(image_size) -> tuple[float, float]:
    """`(height, width)` as floats; ValueError unless two positive sides."""
    if len(image_size) != 2 or min(image_size) <= 0:
        raise ValueError(f"image_size={image_size!r} must be (height, width) with positive sides")
    return float(image_size[0]), float(image_size[1])


def encode_targets(
    boxes: jnp.ndarray,
    classes: jnp.ndarray,
    valid: jnp.ndarray | None = None,
    *,
    spec: YoloSpec,
    image_size: tuple[int, int],
    box_format: str = "xyxy",
) -> jnp.ndarray:
    """The YOLO v1 target of one image: `[S, S, 5 + C]`, jit-able.

    Args:
      boxes: `[n, 4]` ground-truth boxes in pixels, in `box_format`.
      classes: `[n]` int class indices in [0, C).
      valid: `[n]` bool, False for padding rows (default: all valid).
      spec: the grid geometry.
      image_size: `(height, width)` of the image in pixels.
      box_format: "xyxy", "xywh" or "cxcywh".

    Returns:
      Per cell `(x, y, w, h, objectness, one-hot class)`: zeros for cells without an object;
      for the responsible cell, `x, y` relative to the cell, `w, h` relative to the image.
    """
    boxes = jnp.asarray(boxes, jnp.float32)
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes has shape {tuple(boxes.shape)}; expected [num_boxes, 4]")
    classes = jnp.asarray(classes, jnp.int32)
    if classes.shape != boxes.shape[:1]:
        raise ValueError(f"classes has shape {tuple(classes.shape)}; expected [{boxes.shape[0]}] (one per box)")
    valid = jnp.ones(boxes.shape[:1], bool) if valid is None else jnp.asarray(valid, bool)
    if valid.shape != boxes.shape[:1]:
        raise ValueError(f"valid has shape {tuple(valid.shape)}; expected [{boxes.shape[0]}] (one per box)")
    height, width = check_image_size(image_size)
    s = spec.grid_size
    if boxes.shape[0] == 0:
        return jnp.zeros((s, s, spec.target_channels), jnp.float32)
    cx, cy, w, h = jnp.moveaxis(box_ops.convert(boxes, box_format, "cxcywh"), -1, 0)
    # Centres in grid units (multiplying before dividing rounds once), sizes relative to the image.
    grid_x, grid_y = cx * s / width, cy * s / height
    w, h = w / width, h / height
    # A centre on the far edge (grid_x = S) belongs to the last cell.
    col = jnp.clip(jnp.floor(grid_x), 0, s - 1)
    row = jnp.clip(jnp.floor(grid_y), 0, s - 1)
    per_box = jnp.concatenate(
        [
            jnp.stack([grid_x - col, grid_y - row, w, h, jnp.ones_like(w)], axis=-1),
            jax.nn.one_hot(classes, spec.num_classes, dtype=jnp.float32),
        ],
        axis=-1,
    )  # [n, 5 + C]
    cell = (row * s + col).astype(jnp.int32)
    members = (cell[None, :] == jnp.arange(s * s)[:, None]) & valid[None, :]  # [S*S, n]
    # The largest box of a cell wins (argmax takes the first of equal areas).
    size = jnp.maximum(w, 0.0) * jnp.maximum(h, 0.0)
    chosen = jnp.argmax(jnp.where(members, size[None, :], -1.0), axis=1)  # [S*S]
    occupied = members.any(axis=1)
    targets = jnp.where(occupied[:, None], per_box[chosen], 0.0)
    return targets.reshape(s, s, spec.target_channels)


def encode_batch(
    boxes: jnp.ndarray,
    classes: jnp.ndarray,
    valid: jnp.ndarray | None = None,
    *,
    spec: YoloSpec,
    image_size: tuple[int, int],
    box_format: str = "xyxy",
) -> jnp.ndarray:
    """`encode_targets` over a batch: `[batch, n, 4], [batch, n], [batch, n] -> [batch, S, S, 5 + C]`."""
    boxes = jnp.asarray(boxes, jnp.float32)
    if boxes.ndim != 3:
        raise ValueError(f"boxes has shape {tuple(boxes.shape)}; expected [batch, num_boxes, 4]")
    valid = jnp.ones(boxes.shape[:2], bool) if valid is None else valid

    def encode(b, c, v):
        return encode_targets(b, c, v, spec=spec, image_size=image_size, box_format=box_format)

    return jax.vmap(encode)(boxes, jnp.asarray(classes), jnp.asarray(valid))


def targets_to_predictions(targets: jnp.ndarray, spec: YoloSpec) -> jnp.ndarray:
    """The perfect prediction for `targets [..., S, S, 5 + C]`: `[..., S, S, B*5 + C]`.

    In every object cell predictor 0 outputs the true box `(x, y, sqrt(w), sqrt(h))` with
    confidence 1 (= Pr(object) * IoU) and the other predictors the same box with confidence 0 (the
    loss's targets for non-responsible predictors); class probabilities are the one-hot class.
    Cells without an object predict zeros. Its loss is 0 and its decoded boxes are the targets.
    """
    targets = jnp.asarray(targets, jnp.float32)
    if targets.ndim < 3 or targets.shape[-1] != spec.target_channels:
        raise ValueError(f"targets has shape {tuple(targets.shape)}; expected [..., S, S, {spec.target_channels}]")
    objectness = targets[..., TARGET_OBJECT]
    box = targets[..., TARGET_BOX]
    box = jnp.concatenate([box[..., :2], jnp.sqrt(jnp.maximum(box[..., 2:], 0.0))], axis=-1)
    per_box = []
    for index in range(spec.boxes_per_cell):
        confidence = objectness if index == 0 else jnp.zeros_like(objectness)
        per_box.append(jnp.concatenate([box * objectness[..., None], confidence[..., None]], axis=-1))
    return jnp.concatenate(per_box + [targets[..., TARGET_CLASSES]], axis=-1)


__all__ = [
    "SplitPredictions",
    "YoloSpec",
    "cell_boxes_to_image",
    "cell_offsets",
    "check_image_size",
    "check_predictions",
    "encode_batch",
    "encode_targets",
    "split_predictions",
    "targets_to_predictions",
]
