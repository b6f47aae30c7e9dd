"""Drawing boxes with matplotlib: ground truth dashed, predictions solid with class and score."""

from __future__ import annotations

import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

COLOURS = ("tab:red", "tab:blue", "tab:green", "tab:orange", "tab:purple", "tab:brown", "tab:pink", "tab:olive")


def draw_boxes(
    axis: Any,
    boxes: np.ndarray,
    classes: np.ndarray,
    *,
    scores: np.ndarray | None = None,
    class_names: Sequence[str] | None = None,
    dashed: bool = False,
) -> None:
    """Draws xyxy pixel boxes `[n, 4]` of classes `[n]` (with optional scores `[n]`) on `axis`."""
    from matplotlib.patches import Rectangle

    for k, (box, cls) in enumerate(zip(np.asarray(boxes).reshape(-1, 4), np.asarray(classes).reshape(-1))):
        colour = COLOURS[int(cls) % len(COLOURS)]
        x0, y0, x1, y1 = (float(v) for v in box)
        # Pixel (i, j) covers [j, j+1) x [i, i+1); imshow centres it on (j, i), hence the -0.5.
        axis.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor=colour,
                                 linewidth=1.0 if dashed else 1.5, linestyle="--" if dashed else "-"))
        if not dashed:
            name = class_names[int(cls)] if class_names is not None else str(int(cls))
            text = name if scores is None else f"{name} {float(scores[k]):.2f}"
            axis.text(x0 - 0.5, y0 - 1.0, text, color="white", fontsize=6,
                      bbox={"facecolor": colour, "alpha": 0.8, "pad": 0.5, "linewidth": 0})


def plot_detections(
    images: np.ndarray,
    detections: Sequence[Mapping[str, np.ndarray]],
    ground_truths: Sequence[Mapping[str, np.ndarray]] | None = None,
    *,
    class_names: Sequence[str] | None = None,
    min_score: float = 0.2,
    path: str | pathlib.Path | None = None,
    columns: int = 4,
):
    """A grid of images `[n, h, w, c]` with their detections (and ground truth, dashed).

    Args:
      images: the images (uint8 or float in [0, 1]).
      detections: per image, `boxes`, `scores`, `classes` and optionally `valid`.
      ground_truths: per image, `boxes`, `classes`, optionally `valid`.
      class_names: names to print; class indices otherwise.
      min_score: detections scoring below this are not drawn.
      path: where to save the figure (PNG); the figure is returned either way.
      columns: images per row.
    """
    import matplotlib.pyplot as plt

    count = len(images)
    rows = max(1, -(-count // columns))
    figure, axes = plt.subplots(rows, columns, figsize=(2.4 * columns, 2.4 * rows), squeeze=False)
    for index, axis in enumerate(axes.ravel()):
        axis.axis("off")
        if index >= count:
            continue
        image = np.asarray(images[index])
        axis.imshow(image.squeeze(-1) if image.shape[-1] == 1 else image, cmap="gray" if image.shape[-1] == 1 else None)
        if ground_truths is not None:
            truth = ground_truths[index]
            keep = np.asarray(truth.get("valid", np.ones(len(truth["classes"]), bool)), bool)
            draw_boxes(axis, np.asarray(truth["boxes"])[keep], np.asarray(truth["classes"])[keep], dashed=True)
        found = detections[index]
        keep = np.array(found.get("valid", np.ones(len(found["scores"]), bool)), bool)
        keep = keep & (np.asarray(found["scores"]) >= min_score)
        draw_boxes(axis, np.asarray(found["boxes"])[keep], np.asarray(found["classes"])[keep],
                   scores=np.asarray(found["scores"])[keep], class_names=class_names)
    figure.tight_layout()
    if path is not None:
        path = pathlib.Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=120)
    return figure


__all__ = ["draw_boxes", "plot_detections"]
