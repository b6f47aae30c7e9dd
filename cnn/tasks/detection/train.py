"""Training and evaluating YOLO v1 with the training engine's state and optimizers.

The engine's generic step (`cnn.train.steps.make_train_step`) is written for classification
(cross-entropy on `batch["label"]`); detection needs the targets encoded from boxes and the YOLO
loss, so the step here is its detection counterpart. Everything else comes from `cnn.train`:
`TrainState` / `create_train_state`, `make_optimizer` (Optax), `compile_single` (jit),
`RunLogger` (metrics.jsonl + TensorBoard) in the run directory.

A detection batch (numpy or jax arrays):

    {"image":   [batch, height, width, channels]  uint8 (0..255) or float,
     "boxes":   [batch, max_objects, 4]           xyxy in pixels,
     "classes": [batch, max_objects]              int in [0, C),
     "valid":   [batch, max_objects]              bool, False for padding rows}

    step = compile_single(make_train_step(spec, image_size=(64, 64)))
    state, metrics = step(state, batch)        # metrics: loss, its five terms, grad_norm
    evaluation = evaluate(state, batches, spec=spec, image_size=(64, 64))   # VOC mAP@0.5
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import flax.serialization
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from tqdm.auto import tqdm

import cnn.models
from cnn.data import augment
from cnn.metrics.detection import DetectionEvaluation, evaluate_detections
from cnn.tasks.detection.augmentation import make_augmentation
from cnn.tasks.detection.decode import detect
from cnn.tasks.detection.encode import YoloSpec, encode_batch
from cnn.tasks.detection.loss import LOSS_TERMS, yolo_loss
from cnn.tasks.detection.nms import Detections
from cnn.train.loop import RunLogger
from cnn.train.optim import make_optimizer
from cnn.train.state import TrainState, create_train_state, to_host
from cnn.train.steps import compile_single

Batch = Mapping[str, Any]
BATCH_KEYS = ("image", "boxes", "classes", "valid")


def preprocess_images(images: jnp.ndarray) -> jnp.ndarray:
    """uint8 images (0..255) -> float32 in [-1, 1]; float images pass through as float32."""
    images = jnp.asarray(images)
    if jnp.issubdtype(images.dtype, jnp.integer):
        return images.astype(jnp.float32) / 127.5 - 1.0
    return images.astype(jnp.float32)


def _check_batch(batch: Batch) -> None:
    missing = [key for key in BATCH_KEYS if key not in batch]
    if missing:
        raise ValueError(f"batch is missing {missing}; a detection batch has keys {BATCH_KEYS}, got {sorted(batch)}")


def _global_norm(tree: Any) -> jax.Array:
    # optax >= 0.2.6 moved global_norm to optax.tree.norm (and deprecated the old name)
    tree_module = getattr(optax, "tree", None)
    if tree_module is not None and hasattr(tree_module, "norm"):
        return tree_module.norm(tree)
    return optax.global_norm(tree)


def make_train_step(
    spec: YoloSpec,
    *,
    image_size: tuple[int, int],
    lambda_coord: float = 5.0,
    lambda_noobj: float = 0.5,
    rescore: bool = True,
    augmentation: augment.Op | None = None,
    learning_rate_fn: optax.Schedule | None = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """The pure `train_step(state, batch) -> (state, metrics)` of YOLO v1.

    Targets are encoded inside the step (`encode_batch`), so it takes the raw boxes, after the
    optional on-device `augmentation` (`make_augmentation`) has moved images and boxes together.
    Augmentation and dropout keys derive from `state.step_key()`.

    Returns:
      `train_step`; metrics are float32 scalars `loss`, the five `LOSS_TERMS`, `grad_norm` (and
      `learning_rate` with `learning_rate_fn`).
    """

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        _check_batch(batch)
        augment_key, dropout_key = jax.random.split(state.step_key())
        images, boxes, valid = batch["image"], batch["boxes"], batch["valid"]
        if augmentation is not None:
            moved = augment.apply_batch(
                augmentation, augment_key, {"image": images, "boxes": boxes, "box_valid": valid}
            )
            images, boxes, valid = moved["image"], moved["boxes"], moved["box_valid"]
        images = preprocess_images(images)
        targets = encode_batch(boxes, batch["classes"], valid, spec=spec, image_size=image_size)

        def loss_fn(params):
            predictions, updates = state.apply_fn(
                state.variables(params), images, train=True, mutable=["batch_stats"],
                rngs={"dropout": dropout_key},
            )
            loss, terms = yolo_loss(predictions, targets, spec=spec, lambda_coord=lambda_coord,
                                    lambda_noobj=lambda_noobj, rescore=rescore)
            return loss, (terms, updates)

        (loss, (terms, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        metrics = {"loss": loss, **terms, "grad_norm": _global_norm(grads)}
        if learning_rate_fn is not None:
            metrics["learning_rate"] = jnp.asarray(learning_rate_fn(state.step), jnp.float32)
        new_state = state.apply_gradients(grads=grads, batch_stats=updates.get("batch_stats", state.batch_stats))
        return new_state, metrics

    return train_step


def make_detect_fn(
    spec: YoloSpec,
    *,
    image_size: tuple[int, int],
    score_threshold: float = 0.0,
    iou_threshold: float = 0.5,
    max_per_class: int = 20,
    max_detections: int = 50,
) -> Callable[[TrainState, jax.Array], Detections]:
    """A jitted `detect_fn(state, images) -> Detections` (inference mode, per-class NMS)."""

    @jax.jit
    def detect_fn(state: TrainState, images: jax.Array) -> Detections:
        predictions = state.apply_fn(state.variables(), preprocess_images(images), train=False)
        return detect(predictions, spec=spec, image_size=image_size, score_threshold=score_threshold,
                      iou_threshold=iou_threshold, max_per_class=max_per_class, max_detections=max_detections)

    return detect_fn


@dataclasses.dataclass(frozen=True)
class EvaluationResult:
    """`evaluate`'s output: the VOC evaluation and what it was computed from (per image)."""

    evaluation: DetectionEvaluation
    detections: list[dict[str, np.ndarray]]
    ground_truths: list[dict[str, np.ndarray]]


def evaluate(
    state: TrainState,
    batches: Iterable[Batch],
    *,
    spec: YoloSpec,
    image_size: tuple[int, int],
    detect_fn: Callable[[TrainState, jax.Array], Detections] | None = None,
    iou_threshold: float = 0.5,
    method: str = "voc2010",
) -> EvaluationResult:
    """VOC AP / mAP of the model on `batches` (detection batches, see the module docstring).

    Args:
      state: the train state.
      batches: a finite iterable of batches (e.g. one epoch of a `BatchIterator`).
      spec, image_size: the grid geometry and the image size in pixels.
      detect_fn: from `make_detect_fn` (default: its defaults).
      iou_threshold: the matching threshold of the evaluation (0.5: mAP@0.5).
      method: "voc2010" (all-point) or "voc07" (11-point).
    """
    detect_fn = detect_fn or make_detect_fn(spec, image_size=image_size)
    detections, ground_truths = [], []
    for batch in batches:
        _check_batch(batch)
        found = jax.tree_util.tree_map(np.asarray, detect_fn(state, jnp.asarray(batch["image"])))
        for i in range(len(found.valid)):
            detections.append({"boxes": found.boxes[i], "scores": found.scores[i], "classes": found.classes[i],
                               "valid": found.valid[i]})
            ground_truths.append({"boxes": np.asarray(batch["boxes"][i]), "classes": np.asarray(batch["classes"][i]),
                                  "valid": np.asarray(batch["valid"][i], bool)})
    if not detections:
        raise ValueError("batches yielded no images to evaluate")
    evaluation = evaluate_detections(detections, ground_truths, num_classes=spec.num_classes,
                                     iou_threshold=iou_threshold, method=method)
    return EvaluationResult(evaluation, detections, ground_truths)


@dataclasses.dataclass
class FitResult:
    """What `fit` returns.

    Attributes:
      state: the final state (host arrays).
      evaluation: the final evaluation (`EvaluationResult`).
      history: logged records `{"step", "train/loss", ..., "eval/map"}`.
      workdir: the run directory.
      seconds: wall time of the training loop (compilation included).
    """

    state: TrainState
    evaluation: EvaluationResult
    history: list[dict[str, Any]]
    workdir: pathlib.Path
    seconds: float


def _options(config: Any) -> dict[str, Any]:
    options = config.to_dict() if hasattr(config, "to_dict") else dict(config or {})
    return {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}


def default_config() -> ml_collections.ConfigDict:
    """Every field `fit` reads, with defaults; experiment configs override what they need."""
    return ml_collections.ConfigDict({
        "seed": 0,
        "model": "yolo_v1_tiny",
        "model_options": {},
        "num_classes": 3,
        "grid_size": 7,
        "boxes_per_cell": 2,
        "image_size": 64,
        "batch_size": 32,
        "num_train_steps": 1000,
        "optimizer": {"name": "adam", "learning_rate": 1e-3, "schedule": "cosine", "warmup_steps": 100,
                      "grad_clip_norm": 10.0, "weight_decay": 0.0},
        "loss": {"lambda_coord": 5.0, "lambda_noobj": 0.5, "rescore": True},
        "augment": {"scale": 0.0, "shift": 0.0, "flip": False},
        "detect": {"score_threshold": 0.01, "iou_threshold": 0.5, "max_per_class": 10, "max_detections": 20},
        "eval": {"iou_threshold": 0.5, "method": "voc2010"},
        "log_every_steps": 50,
        "eval_every_steps": 0,
        "progress": True,
    })


def resolve_config(config: ml_collections.ConfigDict | Mapping[str, Any]) -> ml_collections.ConfigDict:
    """`default_config()` updated with `config` (nested sections field by field; fields `fit`
    does not read, such as an experiment's data settings, are kept as given)."""
    merged = default_config().to_dict()
    given = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
    for key, value in given.items():
        if isinstance(merged.get(key), dict) and key != "model_options":
            unknown = sorted(set(value) - set(merged[key]))
            if unknown:
                raise ValueError(f"unknown config fields {key}.{unknown}; known: {sorted(merged[key])}")
            merged[key].update(value)
        else:
            merged[key] = value
    return ml_collections.ConfigDict(merged)


def _json_number(value: float) -> float | None:
    """NaN (an AP that is not defined) as JSON null."""
    return None if np.isnan(value) else float(value)


def spec_from_config(config: ml_collections.ConfigDict) -> YoloSpec:
    """`YoloSpec(config.grid_size, config.boxes_per_cell, config.num_classes)`."""
    return YoloSpec(int(config.grid_size), int(config.boxes_per_cell), int(config.num_classes))


def fit(
    config: ml_collections.ConfigDict,
    workdir: str | pathlib.Path,
    *,
    train_batches: Iterator[Batch],
    eval_batches: Callable[[], Iterable[Batch]],
) -> FitResult:
    """Trains a registered YOLO model for `config.num_train_steps` steps and evaluates mAP.

    Config fields read (`default_config()` has them all; missing ones take its values): `seed`,
    `model`, `model_options`, `num_classes`, `grid_size`, `boxes_per_cell`, `image_size`,
    `batch_size`, `num_train_steps`, `optimizer` (as `cnn.train.optim.make_optimizer`),
    `loss.{lambda_coord, lambda_noobj, rescore}`, `augment.{scale, shift, flip}`
    (`make_augmentation`), `detect.{score_threshold, iou_threshold, max_per_class,
    max_detections}` (`make_detect_fn`), `eval.{iou_threshold, method}`, `log_every_steps`,
    `eval_every_steps` (0: only at the end), `progress`.

    The run directory gets `config.json`, `metrics.jsonl` (+ TensorBoard `events/`) and
    `params.msgpack` (the final variables, `flax.serialization.to_bytes`).

    Args:
      train_batches: an endless iterator of detection batches of `config.batch_size`.
      eval_batches: returns a fresh finite iterable of evaluation batches per call.
    """
    config = resolve_config(config)
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
    spec = spec_from_config(config)
    image_size = (int(config.image_size), int(config.image_size))
    steps = int(config.num_train_steps)
    if steps < 1:
        raise ValueError(f"config.num_train_steps must be >= 1, got {steps}")
    model = cnn.models.create(config.model, num_classes=spec.num_classes, grid_size=spec.grid_size,
                              boxes_per_cell=spec.boxes_per_cell, **_options(config.model_options))
    tx, schedule = make_optimizer(config.optimizer, total_steps=steps)
    state = create_train_state(model, tx, rng=int(config.seed), input_shape=(1, *image_size, 3))
    augmentation = make_augmentation(image_size, **_options(config.augment))
    train_step = compile_single(make_train_step(
        spec, image_size=image_size, lambda_coord=float(config.loss.lambda_coord),
        lambda_noobj=float(config.loss.lambda_noobj), rescore=bool(config.loss.rescore),
        augmentation=augmentation, learning_rate_fn=schedule,
    ))
    detect_fn = make_detect_fn(spec, image_size=image_size, **_options(config.detect))

    def run_eval() -> EvaluationResult:
        return evaluate(state, eval_batches(), spec=spec, image_size=image_size, detect_fn=detect_fn,
                        iou_threshold=float(config.eval.iou_threshold), method=str(config.eval.method))

    logger = RunLogger(workdir, enabled=True, resume_step=-1)  # a fresh run (no resume)
    log_every, eval_every = int(config.log_every_steps), int(config.eval_every_steps)
    window: dict[str, float] = {}
    count = 0
    started = time.perf_counter()
    progress = tqdm(range(1, steps + 1), desc="yolo", disable=not bool(config.progress), dynamic_ncols=True)
    for step in progress:
        state, metrics = train_step(state, next(train_batches))
        for key, value in jax.device_get(metrics).items():
            window[key] = window.get(key, 0.0) + float(value)
        count += 1
        if step % log_every == 0 or step == steps:
            summary = {f"train/{k}": v / count for k, v in window.items()}
            if not np.isfinite(summary["train/loss"]):
                raise FloatingPointError(f"the training loss is {summary['train/loss']} at step {step}")
            logger.write(step, summary)
            progress.set_postfix(loss=f"{summary['train/loss']:.3f}")
            window, count = {}, 0
        if eval_every and step % eval_every == 0 and step != steps:
            result = run_eval()
            logger.write(step, {"eval/map": result.evaluation.mean_ap})
    result = run_eval()
    logger.write(steps, {"eval/map": result.evaluation.mean_ap})
    seconds = time.perf_counter() - started
    logger.close()
    host_state = to_host(state)
    (workdir / "params.msgpack").write_bytes(flax.serialization.to_bytes(host_state.variables()))
    (workdir / "results.json").write_text(json.dumps({
        "map": _json_number(result.evaluation.mean_ap),
        "average_precision": [_json_number(a) for a in result.evaluation.average_precision],
        "iou_threshold": result.evaluation.iou_threshold,
        "method": result.evaluation.method,
        "steps": steps,
        "seconds": seconds,
    }, indent=2) + "\n")
    return FitResult(host_state, result, logger.records, workdir, seconds)


__all__ = [
    "BATCH_KEYS",
    "EvaluationResult",
    "FitResult",
    "LOSS_TERMS",
    "evaluate",
    "fit",
    "default_config",
    "make_augmentation",
    "make_detect_fn",
    "make_train_step",
    "preprocess_images",
    "resolve_config",
    "spec_from_config",
]
