"""Semantic segmentation on synthetic shapes: FCN-32s/16s/8s, SegNet, U-Net, dilated front end and
front end + context module, trained alike on a CPU; a table of mIoU, parameters and time per step.

    python -m experiments.segmentation --workdir runs/segmentation
    python -m experiments.segmentation --workdir runs/segmentation --config.num_train_steps=500
    python -m experiments.segmentation --config experiments/configs/segmentation.py:tiny --workdir /tmp/seg

The data are `cnn.data.load("shapes")` (32x32 images of circles, squares and triangles with exact
per-pixel masks: 4 classes with background), the models `cnn.models` ("fcn32s", ..., narrow
widths set in `experiments/configs/segmentation.py`), the task (loss, mIoU)
`cnn.tasks.segmentation`, the trainer `cnn.train.fit`, the metrics `cnn.metrics.segmentation`. The run directory gets
results.md and results.csv (test mIoU, pixel accuracy, mean accuracy, frequency-weighted IoU,
parameters, ms per training step), predictions.png (test image / ground truth / each model's
prediction), learning_curves.png, and one `cnn.train.fit` run directory per model (config.json,
metrics.jsonl, checkpoints/, results.json); rerunning resumes them.

Recorded result (default config; `python -m experiments.segmentation --workdir runs/segmentation`,
2026-12-06, 2-core CPU shared with a test run, jax 0.10.2; test split, 512 images; FCN's final
upsampling fixed bilinear as in the paper; experiments/RESULTS.md §4 has the previous run too):

    model              params   test mIoU   pixel acc.   mean acc.   f.w. IoU
    fcn32s            322,508      0.2148       0.8592      0.2500     0.7383
    fcn16s            323,024      0.3055       0.8445      0.3659     0.7430
    fcn8s             323,412      0.6009       0.9199      0.6995     0.8591
    segnet            219,124      0.9189       0.9871      0.9581     0.9750
    unet              487,316      0.6901       0.9644      0.7221     0.9306
    dilated_frontend  322,508      0.5850       0.9200      0.6805     0.8600
    dilated_context   323,564      0.6757       0.9354      0.7859     0.8853

At 32x32 the stride-32 FCN sees one pool5 cell per image and predicts background almost
everywhere; each skip (16s, 8s) adds resolution, as in the paper's Table 2. The context module
(started from the trained front end, as Yu & Koltun train it) improves the stride-8 front end.
SegNet and U-Net, which bring full-resolution information back (pooling indices, concatenated
maps), do best -- but at 1,000 steps U-Net depends on its seed (seeds 1 and 2 gave 0.898 and
0.968 in the previous run, seed 0 is still improving when the cosine schedule ends). The `slow`
test reruns U-Net for the three seeds.
"""

from __future__ import annotations

import csv
import datetime
import os
import pathlib
import platform
import sys
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

import cnn.train  # noqa: E402
from cnn import data  # noqa: E402
from cnn.tasks import segmentation  # noqa: E402
from cnn.tasks.segmentation.voc import colorize  # noqa: E402
from experiments import grid  # noqa: E402

COLUMNS = (
    "model", "params", "mean_iou", "pixel_accuracy", "mean_accuracy", "frequency_weighted_iou", "ms_per_step",
    "train_seconds",
)


def model_config(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    """The `cnn.train.fit` config of one model of the experiment."""
    if name not in config.models:
        raise ValueError(f"config.model_names has {name!r} but config.models has no entry for it; "
                         f"entries: {sorted(config.models.keys())}")
    steps = int(config.num_train_steps)
    return ml_collections.ConfigDict({
        "seed": int(config.seed),
        "dataset": config.dataset,
        "train_split": config.train_split,
        "eval_split": config.eval_split,
        "num_classes": int(config.num_classes),
        "batch_size": int(config.batch_size),
        "eval_batch_size": int(config.eval_batch_size),
        "num_train_steps": steps,
        "model": name,
        "model_options": config.models[name].to_dict(),
        "optimizer": config.optimizer.to_dict(),
        "augment": segmentation.AUGMENTATION,
        "augment_options": {**config.augment.to_dict(), "ignore_label": int(config.loss.ignore_label)},
        "parallelism": config.parallelism,
        "log_every_steps": int(config.log_every_steps),
        "eval_every_steps": int(config.eval_every_steps) or steps,  # 0: only at the end
        "checkpoint": {"max_to_keep": 1},
        "progress": bool(config.progress),
        "plot": False,
    })


def segmentation_task(config: ml_collections.ConfigDict, mean, std) -> cnn.train.Task:
    """The experiment's task: its ignore label, normalization and class weighting."""
    weighting = str(config.loss.class_weighting)
    if weighting not in ("none", "median_frequency"):
        raise ValueError(f"config.loss.class_weighting={weighting!r} must be 'none' or 'median_frequency'")
    num_classes, ignore_label = int(config.num_classes), int(config.loss.ignore_label)
    weights = None
    if weighting == "median_frequency":
        masks = data.get_source(config.dataset, config.train_split)["mask"]
        weights = segmentation.median_frequency_weights(masks, num_classes, ignore_label=ignore_label)
    return segmentation.segmentation_task(num_classes=num_classes, ignore_label=ignore_label, class_weights=weights,
                                          mean=mean, std=std)


def machine_description() -> str:
    """E.g. "2-core CPU (x86_64), jax 0.10.2" or the accelerator's kind."""
    import jax

    device = jax.devices()[0]
    if device.platform == "cpu":
        where = f"{os.cpu_count()}-core CPU ({platform.machine()})"
    else:
        where = f"{jax.device_count()} x {device.device_kind}"
    return f"{where}, jax {jax.__version__}"


def plot_predictions(
    images: np.ndarray, masks: np.ndarray, predictions: dict[str, np.ndarray], path: pathlib.Path,
    class_names: tuple[str, ...],
) -> None:
    """One row per test image: the image, its ground truth, then each model's prediction."""
    names = list(predictions)
    rows, cols = len(images), 2 + len(names)
    figure, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.6 * rows + 0.6), squeeze=False)
    for row in range(rows):
        panels = [images[row], colorize(masks[row])] + [colorize(predictions[n][row]) for n in names]
        for col, (axis, panel) in enumerate(zip(axes[row], panels)):
            axis.imshow(panel, interpolation="nearest")
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title((["image", "ground truth"] + names)[col], fontsize=8)
    legend = ", ".join(f"{name}: {tuple(int(c) for c in colorize(np.array([[i]]))[0, 0])}"
                       for i, name in enumerate(class_names))
    figure.suptitle(f"test images; colours (VOC palette) {legend}", fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_learning_curves(histories: dict[str, list[dict[str, Any]]], path: pathlib.Path) -> None:
    """Training loss and test mIoU against the step, one line per model."""
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    for name, history in histories.items():
        train = [r for r in history if "train/loss" in r]
        left.plot([r["step"] for r in train], [r["train/loss"] for r in train], label=name)
        evals = [r for r in history if "eval/mean_iou" in r]
        right.plot([r["step"] for r in evals], [r["eval/mean_iou"] for r in evals], "o-", label=name)
    left.set(xlabel="step", ylabel="training loss (per pixel)", yscale="log")
    right.set(xlabel="step", ylabel="test mean IoU", ylim=(0, 1))
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *, command: str = "") -> list[dict[str, Any]]:
    """Trains and evaluates every model of `config.model_names`; writes the run directory.

    Returns:
      One row per model with the `COLUMNS` of results.csv.
    """
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    info = data.info(config.dataset)
    mean = tuple(config.normalize.mean) or info.mean
    std = tuple(config.normalize.std) or info.std
    eval_source = data.get_source(config.dataset, config.eval_split)
    num_eval = len(eval_source["image"])
    shown = min(int(config.num_figure_images), num_eval)
    figure_images, figure_masks = eval_source["image"][:shown], eval_source["mask"][:shown]

    rows, histories, predictions, trained = [], {}, {}, {}
    raw = config.get("initialize_from")
    initialize_from = raw.to_dict() if hasattr(raw, "to_dict") else dict(raw or {})
    task = segmentation_task(config, mean, std)
    predict = segmentation.make_predict_fn(mean, std)
    for name in config.model_names:
        source = initialize_from.get(name)
        if source is not None and source not in trained:
            raise ValueError(
                f"config.initialize_from[{name!r}]={source!r} must be trained before it: put it earlier in "
                f"config.model_names={tuple(config.model_names)}"
            )
        # Yu & Koltun's staged training: the source's parameters where paths and shapes match
        # (BatchNorm statistics restart and are re-estimated).
        init = None if source is None else {"params": trained[source]}
        result = cnn.train.fit(model_config(config, name), workdir / name, task=task, init_variables=init)
        trained[name] = result.state.params
        predictions[name] = np.asarray(predict(result.state, figure_images))  # the first test images
        histories[name] = result.train_history + result.eval_history
        metrics = result.final_eval
        ms_per_step = 1000 * grid.median_step_seconds(result.train_history, int(config.batch_size))
        rows.append({
            "model": name,
            "params": result.num_params,
            "mean_iou": metrics["mean_iou"],
            "pixel_accuracy": metrics["pixel_accuracy"],
            "mean_accuracy": metrics["mean_accuracy"],
            "frequency_weighted_iou": metrics["frequency_weighted_iou"],
            "ms_per_step": ms_per_step,
            "train_seconds": result.seconds,
        })
        print(f"{name}: test mIoU {metrics['mean_iou']:.4f}, {result.num_params:,} params, "
              f"{ms_per_step:.0f} ms/step", flush=True)

    with (workdir / "results.csv").open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    plot_predictions(figure_images, figure_masks, predictions, workdir / "predictions.png", tuple(config.class_names))
    plot_learning_curves(histories, workdir / "learning_curves.png")

    lines = [
        "# Semantic segmentation on synthetic shapes",
        "",
        f"{config.dataset} ({config.train_split} / {config.eval_split}, {config.image_size}x{config.image_size}, "
        f"{config.num_classes} classes incl. background), {config.num_train_steps} steps of batch "
        f"{config.batch_size}, {config.optimizer.name} lr {config.optimizer.learning_rate:g} "
        f"({config.optimizer.schedule}), seed {config.seed}. Metrics on the test split "
        "(`cnn.metrics.segmentation`); ms/step is the median wall time of a training step over the "
        "logging windows after the first (compiling) one; train s includes compilation and evaluation.",
        "",
        f"Date {datetime.date.today().isoformat()}, machine: {machine_description()}.",
        "",
        "| model | params | test mIoU | pixel acc. | mean acc. | f.w. IoU | ms/step | train s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['model']} | {r['params']:,} | {r['mean_iou']:.4f} | {r['pixel_accuracy']:.4f} | "
        f"{r['mean_accuracy']:.4f} | {r['frequency_weighted_iou']:.4f} | {r['ms_per_step']:.0f} | "
        f"{r['train_seconds']:.0f} |"
        for r in rows
    ]
    lines += [f"\n`{name}` starts from the trained `{source}`'s parameters (staged training)."
              for name, source in initialize_from.items() if name in config.model_names]
    lines += ["", "Model options:", ""]
    lines += [f"- `{name}`: `{dict(config.models[name].to_dict())}`" for name in config.model_names]
    if command:
        lines += ["", f"Command: `{command}`"]
    (workdir / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {workdir / 'results.md'}, results.csv, predictions.png, learning_curves.png")
    return rows


if __name__ == "__main__":
    grid.cli_main(sys.argv, "experiments/configs/segmentation.py", main, "experiments.segmentation",
                  compilation_cache=False, default_workdir="runs/segmentation")
