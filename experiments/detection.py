"""YOLO v1 detection on synthetic shapes: train the small YOLO on a CPU and report VOC mAP@0.5.

    python -m experiments.detection --workdir runs/detection
    python -m experiments.detection --workdir runs/detection --config.num_train_steps=1000

The data are `cnn.data.synthetic.shapes` (circles, squares, triangles on noisy backgrounds, exact
boxes), the model `yolo_v1_tiny` (`cnn/models/yolo.py`), the loss, decoding and NMS
`cnn.tasks.detection`, the mAP `cnn.metrics.detection`. The run directory gets results.md (mAP@0.5
with all-point and 11-point interpolation, AP per class), detections.png (test images with
predicted boxes; ground truth dashed), learning_curve.png and the `cnn.train.fit` run directory
(config.json, metrics.jsonl, checkpoints/, results.json); rerunning resumes it.

Recorded result of the default config (`python -m experiments.detection --workdir runs/detection`,
5000 steps of batch 32 on the one trainer, jax 0.10.2 on a shared 2-core CPU, 465 s of training):
test mAP@0.5 = 0.9380 with the VOC2010+ all-point interpolation, 0.8868 with the VOC07 11-point
one (AP circle 0.958, square 0.933, triangle 0.923); mAP@0.5 was 0.18 / 0.59 / 0.86 / 0.92 after
1000 / 2000 / 3000 / 4000 steps (experiments/RESULTS.md section 5 has the earlier forked-loop run).
The `slow` test `tests/tasks/detection/test_detection_training.py` checks that the run reaches 0.85.
Settings that did worse (test mAP@0.5, forked loop, before the colour jitter): 4096 training images without augmentation 0.55 (the fully
connected head memorizes them: train loss 0.45); dropout 0.5 after fc1, 3000 steps, 0.28.
"""

from __future__ import annotations

import pathlib
import sys
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

import cnn.train  # noqa: E402
from cnn.data import BatchIterator, synthetic  # noqa: E402
from cnn.metrics.detection import evaluate_detections  # noqa: E402
from cnn.tasks.detection.encode import YoloSpec  # noqa: E402
from cnn.tasks.detection.task import AUGMENTATION, detection_task, make_detect_fn  # noqa: E402
from cnn.tasks.detection.viz import plot_detections  # noqa: E402


def shapes_detection_data(config: ml_collections.ConfigDict, split: str) -> dict[str, np.ndarray]:
    """The synthetic shapes of `split` ("train" / "test") as detection arrays.

    Returns `{"image": uint8 [n, s, s, 3], "boxes": [n, m, 4] xyxy, "classes": [n, m] in [0, 3),
    "valid": [n, m]}`; the generator's classes 1..3 (0 = background) become 0..2.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split={split!r} must be 'train' or 'test'")
    data = config.data
    arrays = synthetic.shapes(
        int(data.num_train if split == "train" else data.num_test),
        image_size=int(config.image_size), min_objects=int(data.min_objects), max_objects=int(data.max_objects),
        min_size=int(data.min_size), max_size=int(data.max_size), noise=float(data.noise),
        seed=int(data.train_seed if split == "train" else data.test_seed),
    )
    return {
        "image": arrays["image"],
        "boxes": arrays["boxes"],
        "classes": np.maximum(arrays["box_classes"] - 1, 0).astype(np.int32),
        "valid": arrays["box_valid"],
    }


def _plot_learning_curve(history: list[dict[str, Any]], path: pathlib.Path) -> None:
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    train = [r for r in history if "train/loss" in r]
    steps = [r["step"] for r in train]
    for key in ("loss", "coord_xy", "coord_wh", "object", "no_object", "classes"):
        left.plot(steps, [r[f"train/{key}"] for r in train], label=key, linewidth=2 if key == "loss" else 1)
    left.set(xlabel="step", ylabel="YOLO loss (per image)", yscale="log")
    left.legend(fontsize=7)
    evals = [r for r in history if "eval/map" in r]
    right.plot([r["step"] for r in evals], [r["eval/map"] for r in evals], "o-")
    right.set(xlabel="step", ylabel="test mAP@0.5", ylim=(0, 1))
    right.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def spec_from_config(config: ml_collections.ConfigDict) -> YoloSpec:
    """`YoloSpec(config.grid_size, config.boxes_per_cell, config.num_classes)`."""
    return YoloSpec(int(config.grid_size), int(config.boxes_per_cell), int(config.num_classes))


def task_from_config(config: ml_collections.ConfigDict) -> cnn.train.Task:
    """The detection task of the experiment: its grid, loss weights, decoding and VOC evaluation."""
    size = int(config.image_size)
    return detection_task(
        spec_from_config(config), image_size=(size, size), **config.loss.to_dict(),
        score_threshold=float(config.detect.score_threshold), nms_iou_threshold=float(config.detect.iou_threshold),
        max_per_class=int(config.detect.max_per_class), max_detections=int(config.detect.max_detections),
        eval_iou_threshold=float(config.eval.iou_threshold), ap_method=str(config.eval.method),
    )


def trainer_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The `cnn.train.fit` config of the experiment (the data come from `datasets_factory`)."""
    steps = int(config.num_train_steps)
    size = int(config.image_size)
    return ml_collections.ConfigDict({
        "seed": int(config.seed),
        "dataset": "shapes_detection",
        "num_classes": int(config.num_classes),
        "batch_size": int(config.batch_size),
        "eval_batch_size": min(int(config.eval_batch_size), int(config.data.num_test)),
        "num_train_steps": steps,
        "model": config.model,
        "model_options": config.model_options.to_dict(),
        "optimizer": config.optimizer.to_dict(),
        "augment": AUGMENTATION,
        "augment_options": {"image_size": (size, size), **config.augment.to_dict()},
        "parallelism": config.parallelism,
        "log_every_steps": int(config.log_every_steps),
        "eval_every_steps": int(config.eval_every_steps) or steps,  # 0: only at the end
        "checkpoint": {"max_to_keep": 1},
        "progress": bool(config.progress),
        "plot": False,
    })


def datasets_factory(config: ml_collections.ConfigDict):
    """`fit(..., datasets=)`: `BatchIterator`s over the generated train and test arrays."""
    arrays = {split: shapes_detection_data(config, split) for split in ("train", "test")}

    def factory(split: str, **kwargs: Any) -> BatchIterator:
        batch_size = kwargs.pop("batch_size")
        return BatchIterator(arrays[split], batch_size, **kwargs)

    return factory


def detections_and_truths(state, arrays: dict[str, np.ndarray], config: ml_collections.ConfigDict):
    """Per test image, the final model's detections and the ground truth (for plots and VOC07)."""
    size = int(config.image_size)
    detect_fn = make_detect_fn(
        spec_from_config(config), image_size=(size, size), score_threshold=float(config.detect.score_threshold),
        nms_iou_threshold=float(config.detect.iou_threshold), max_per_class=int(config.detect.max_per_class),
        max_detections=int(config.detect.max_detections),
    )
    detections, truths = [], []
    batch = int(config.eval_batch_size)
    for start in range(0, len(arrays["image"]), batch):
        found = detect_fn(state, arrays["image"][start:start + batch])
        for i in range(len(found.valid)):
            detections.append({key: np.asarray(getattr(found, key)[i]) for key in ("boxes", "scores", "classes", "valid")})
            truths.append({"boxes": arrays["boxes"][start + i], "classes": arrays["classes"][start + i],
                           "valid": np.asarray(arrays["valid"][start + i], bool)})
    return detections, truths


def main(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *, command: str = "") -> dict[str, Any]:
    """Trains, evaluates, and writes the run directory; returns the numbers of results.md.

    Args:
      config: `experiments/configs/detection.py`'s `get_config()` (or `get_tiny_config()`).
      workdir: the run directory.
      command: the command line, recorded in results.md when given.
    """
    workdir = pathlib.Path(workdir)
    result = cnn.train.fit(trainer_config(config), workdir, task=task_from_config(config),
                           datasets=datasets_factory(config))
    test_arrays = shapes_detection_data(config, "test")
    detections, truths = detections_and_truths(result.state, test_arrays, config)
    evaluations = {method: evaluate_detections(detections, truths, num_classes=int(config.num_classes),
                                               iou_threshold=float(config.eval.iou_threshold), method=method)
                   for method in ("voc2010", "voc07")}
    names = list(config.class_names)
    shown = int(config.num_figure_images)
    plot_detections(test_arrays["image"][:shown], detections[:shown], truths[:shown],
                    class_names=names, path=workdir / "detections.png")
    plt.close("all")
    _plot_learning_curve(result.train_history + result.eval_history, workdir / "learning_curve.png")

    numbers = {
        "map_voc2010": evaluations["voc2010"].mean_ap,
        "map_voc07": evaluations["voc07"].mean_ap,
        "average_precision": dict(zip(names, evaluations["voc2010"].average_precision.tolist())),
        "steps": int(config.num_train_steps),
        "seconds": result.seconds,
    }
    lines = [
        "# YOLO v1 (tiny) on synthetic shapes",
        "",
        f"`{config.model}`, S={config.grid_size}, B={config.boxes_per_cell}, C={config.num_classes}, "
        f"{config.image_size}x{config.image_size} images, {config.data.num_train} training / "
        f"{config.data.num_test} test images, {config.num_train_steps} steps of batch {config.batch_size} "
        f"({result.seconds:.0f} s on {_device()}).",
        "",
        "| metric | value |",
        "|---|---|",
        f"| test mAP@{config.eval.iou_threshold:g} (VOC2010+ all-point) | {numbers['map_voc2010']:.4f} |",
        f"| test mAP@{config.eval.iou_threshold:g} (VOC07 11-point) | {numbers['map_voc07']:.4f} |",
    ]
    lines += [f"| AP {name} (all-point) | {ap:.4f} |" for name, ap in numbers["average_precision"].items()]
    if command:
        lines += ["", f"Command: `{command}`"]
    (workdir / "results.md").write_text("\n".join(lines).rstrip() + "\n")
    print("\n".join(lines))
    print(f"wrote {workdir / 'results.md'}, {workdir / 'detections.png'}, {workdir / 'learning_curve.png'}")
    return numbers


def _device() -> str:
    import jax

    device = jax.devices()[0]
    return f"{device.platform.upper()} ({jax.device_count()} device{'s' if jax.device_count() > 1 else ''})"


if __name__ == "__main__":
    from experiments import grid

    grid.cli_main(sys.argv, "experiments/configs/detection.py", main, "experiments.detection",
                  compilation_cache=False, default_workdir="runs/detection")
