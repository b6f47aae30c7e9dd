"""Training and evaluating segmentation models with the training engine's state and optimizers.

The engine's generic step (`cnn.train.steps.make_train_step`) is written for one label per
image; segmentation needs a per-pixel loss (with an ignore label) and a confusion matrix, so the
steps here are its per-pixel counterparts. Everything else comes from `cnn.train`: `TrainState` /
`create_train_state`, `make_optimizer` (Optax), `compile_single` (jit), `prepare_images`, and
`RunLogger` (metrics.jsonl + TensorBoard) in the run directory.

A segmentation batch (numpy or jax arrays):

    {"image": [batch, height, width, channels]  uint8 (0..255) or float (0..1),
     "mask":  [batch, height, width]            int, class index or the ignore label (255)}

    step = compile_single(make_train_step(num_classes=4))
    state, metrics = step(state, batch)          # loss, pixel_accuracy, grad_norm (, learning_rate)
    result = evaluate(state, batches, num_classes=4)     # confusion matrix, mIoU, ...
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from tqdm.auto import tqdm

import cnn.models
from cnn.data import augment
from cnn.metrics.segmentation import confusion_matrix_jax, per_class_iou, segmentation_metrics
from cnn.tasks.segmentation.loss import (
    IGNORE_LABEL,
    median_frequency_weights,
    per_pixel_cross_entropy,
    pixel_cross_entropy,
)
from cnn.train.loop import RunLogger
from cnn.train.optim import make_optimizer
from cnn.train.state import TrainState, create_train_state, to_host
from cnn.train.steps import compile_single, prepare_images

Batch = Mapping[str, Any]
BATCH_KEYS = ("image", "mask")


def _check_batch(batch: Batch) -> None:
    missing = [key for key in BATCH_KEYS if key not in batch]
    if missing:
        raise ValueError(f"batch is missing {missing}; a segmentation batch has keys {BATCH_KEYS}, got {sorted(batch)}")
    if tuple(batch["mask"].shape) != tuple(batch["image"].shape[:3]):
        raise ValueError(
            f"batch['mask'].shape={tuple(batch['mask'].shape)} must be batch['image'].shape[:3]="
            f"{tuple(batch['image'].shape[:3])}"
        )


def preprocess_images(
    images: jax.Array, mean: Sequence[float] | None = None, std: Sequence[float] | None = None
) -> jax.Array:
    """uint8 -> float32 in [0, 1] (`cnn.train.steps.prepare_images`), then `(x - mean) / std` per
    channel when given (e.g. `cnn.data.info("shapes").mean`)."""
    images = prepare_images(jnp.asarray(images)).astype(jnp.float32)
    if mean is not None:
        images = images - jnp.asarray(mean, jnp.float32)
    if std is not None:
        images = images / jnp.asarray(std, jnp.float32)
    return images


def make_augmentation(
    *, flip_horizontal: bool = True, flip_vertical: bool = False, max_shift: int = 0,
    ignore_label: int = IGNORE_LABEL, shift_fill_label: int | None = None,
) -> augment.Op | None:
    """Mirrors and shifts that move image and mask together (`cnn.data.augment`, nearest-neighbour
    for the mask). Pixels uncovered by a shift get label `shift_fill_label` (default: the ignore
    label, so they do not count). Returns None when everything is off."""
    ops = []
    if flip_horizontal or flip_vertical:
        ops.append(augment.random_flip(horizontal=flip_horizontal, vertical=flip_vertical))
    if max_shift:
        fill = ignore_label if shift_fill_label is None else shift_fill_label
        ops.append(augment.random_shift(int(max_shift), mask_fill=fill))
    if not ops:
        return None
    return ops[0] if len(ops) == 1 else augment.compose(ops)


def make_train_step(
    *,
    num_classes: int,
    ignore_label: int = IGNORE_LABEL,
    class_weights: Sequence[float] | np.ndarray | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    augmentation: augment.Op | None = None,
    learning_rate_fn: optax.Schedule | None = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """The pure `train_step(state, batch) -> (state, metrics)` of a segmentation model.

    The model maps `[batch, h, w, c]` to `[batch, h, w, num_classes]` scores; the loss is
    `pixel_cross_entropy` (ignore label, optional class weights). Augmentation (applied to image
    and mask together) and dropout keys derive from `state.step_key()`.

    Returns:
      `train_step`; metrics are float32 scalars `loss`, `pixel_accuracy` (of the non-ignored
      pixels), `grad_norm` (and `learning_rate` with `learning_rate_fn`).
    """
    weights = None if class_weights is None else jnp.asarray(class_weights, jnp.float32)

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        _check_batch(batch)
        augment_key, dropout_key = jax.random.split(state.step_key())
        images, masks = batch["image"], batch["mask"]
        if augmentation is not None:
            moved = augment.apply_batch(augmentation, augment_key, {"image": images, "mask": masks})
            images, masks = moved["image"], moved["mask"]
        images = preprocess_images(images, mean, std)

        def loss_fn(params):
            logits, updates = state.apply_fn(
                state.variables(params), images, train=True, mutable=["batch_stats"], rngs={"dropout": dropout_key}
            )
            loss = pixel_cross_entropy(logits, masks, ignore_label=ignore_label, class_weights=weights)
            return loss, (logits, updates)

        (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        valid = masks != ignore_label
        correct = (jnp.argmax(logits, -1) == masks) & valid
        metrics = {
            "loss": loss,
            "pixel_accuracy": jnp.sum(correct) / jnp.maximum(jnp.sum(valid), 1),
            "grad_norm": jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree_util.tree_leaves(grads))),
        }
        if learning_rate_fn is not None:
            metrics["learning_rate"] = jnp.asarray(learning_rate_fn(state.step), jnp.float32)
        new_state = state.apply_gradients(grads=grads, batch_stats=updates.get("batch_stats", state.batch_stats))
        return new_state, metrics

    return train_step


def make_eval_step(
    *,
    num_classes: int,
    ignore_label: int = IGNORE_LABEL,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    return_predictions: bool = False,
) -> Callable[[TrainState, Batch], dict[str, jax.Array]]:
    """The pure `eval_step(state, batch) -> sums` (inference mode): `confusion` (int32
    `[num_classes, num_classes]`, rows = truth), `loss_sum` (summed per-pixel cross-entropy) and
    `count` (non-ignored pixels). Sums aggregate exactly over batches of any size. With
    `return_predictions`, also `predictions`: the int32 `[batch, h, w]` class map."""

    def eval_step(state: TrainState, batch: Batch) -> dict[str, jax.Array]:
        _check_batch(batch)
        logits = state.apply_fn(state.variables(), preprocess_images(batch["image"], mean, std), train=False)
        masks = batch["mask"]
        loss, valid = per_pixel_cross_entropy(logits, masks, ignore_label=ignore_label)
        predictions = jnp.argmax(logits, -1).astype(jnp.int32)
        sums = {
            "confusion": confusion_matrix_jax(masks, predictions, num_classes, ignore_label=ignore_label),
            "loss_sum": jnp.sum(loss),
            "count": jnp.sum(valid.astype(jnp.float32)),
        }
        if return_predictions:
            sums["predictions"] = predictions
        return sums

    return eval_step


def make_predict_fn(
    mean: Sequence[float] | None = None, std: Sequence[float] | None = None
) -> Callable[[TrainState, jax.Array], jax.Array]:
    """A jitted `predict(state, images) -> int32 [batch, h, w]` class map (inference mode)."""

    @jax.jit
    def predict(state: TrainState, images: jax.Array) -> jax.Array:
        logits = state.apply_fn(state.variables(), preprocess_images(images, mean, std), train=False)
        return jnp.argmax(logits, -1).astype(jnp.int32)

    return predict


@dataclasses.dataclass(frozen=True)
class EvaluationResult:
    """`evaluate`'s output.

    Attributes:
      confusion: int64 `[num_classes, num_classes]`, rows = ground truth, columns = prediction.
      metrics: `pixel_accuracy`, `mean_accuracy`, `mean_iou`, `frequency_weighted_iou`, `loss`.
      per_class_iou: float64 `[num_classes]` (nan for classes absent from truth and prediction).
      predictions: int32 `[n, h, w]` class maps of the first `n = num_predictions` images (in
        batch order), or None.
    """

    confusion: np.ndarray
    metrics: dict[str, float]
    per_class_iou: np.ndarray
    predictions: np.ndarray | None = None


def evaluate(
    state: TrainState,
    batches: Iterable[Batch],
    *,
    num_classes: int,
    ignore_label: int = IGNORE_LABEL,
    eval_step: Callable[[TrainState, Batch], dict[str, jax.Array]] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    num_predictions: int = 0,
) -> EvaluationResult:
    """Confusion matrix and segmentation metrics of the model over a finite iterable of batches.

    Args:
      eval_step: a compiled `make_eval_step(...)` (built and jitted here when None); it must
        return predictions when `num_predictions > 0`.
      num_predictions: keep the predicted class maps of this many first images.

    Raises:
      ValueError: `batches` is empty or every pixel is ignored.
    """
    eval_step = eval_step or jax.jit(make_eval_step(
        num_classes=num_classes, ignore_label=ignore_label, mean=mean, std=std, return_predictions=num_predictions > 0
    ))
    confusion = np.zeros((num_classes, num_classes), np.int64)
    loss_sum, count = 0.0, 0.0
    kept: list[np.ndarray] = []
    for batch in batches:
        sums = jax.device_get(eval_step(state, {key: batch[key] for key in BATCH_KEYS}))
        confusion += np.asarray(sums["confusion"], np.int64)
        loss_sum += float(sums["loss_sum"])
        count += float(sums["count"])
        missing = num_predictions - sum(len(p) for p in kept)
        if missing > 0:
            if "predictions" not in sums:
                raise ValueError("num_predictions > 0 needs an eval_step built with return_predictions=True")
            kept.append(np.asarray(sums["predictions"][:missing]))
    if count == 0:
        raise ValueError("batches held no labelled pixel to evaluate")
    metrics = {**segmentation_metrics(confusion), "loss": loss_sum / count}
    predictions = np.concatenate(kept) if kept else None
    return EvaluationResult(confusion, metrics, per_class_iou(confusion), predictions)


@dataclasses.dataclass
class FitResult:
    """What `fit` returns.

    Attributes:
      state: the final state (host arrays).
      evaluation: the final evaluation.
      history: logged records `{"step", "train/loss", ..., "eval/mean_iou"}`.
      workdir: the run directory.
      seconds: wall time of the training loop (compilation included).
      seconds_per_step: mean wall time of a training step after the first (compiled) one.
      num_params: the model's parameter count.
    """

    state: TrainState
    evaluation: EvaluationResult
    history: list[dict[str, Any]]
    workdir: pathlib.Path
    seconds: float
    seconds_per_step: float
    num_params: int


def overlay_params(params: Mapping[str, Any], source: Mapping[str, Any]) -> tuple[dict[str, Any], int]:
    """`params` with every leaf that `source` has at the same path and shape replaced by `source`'s.

    Returns:
      `(new params, number of leaves copied)`.
    """
    flat_source = {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(source)}
    copied = 0

    def pick(path, leaf):
        nonlocal copied
        other = flat_source.get(jax.tree_util.keystr(path))
        if other is not None and np.shape(other) == np.shape(leaf):
            copied += 1
            return jnp.asarray(other, leaf.dtype)
        return leaf

    return jax.tree_util.tree_map_with_path(pick, params), copied


def init_state(
    model: Any, tx: optax.GradientTransformation, *, seed: int, input_shape: Sequence[int]
) -> TrainState:
    """`cnn.train.create_train_state` with an integer seed (its fast-compiling init included)."""
    return create_train_state(model, tx, rng=seed, input_shape=input_shape)


def default_config() -> ml_collections.ConfigDict:
    """Every field `fit` reads, with defaults (a U-Net on 32x32 RGB images, 4 classes)."""
    return ml_collections.ConfigDict({
        "seed": 0,
        "model": "unet",
        "model_options": {"depth": 4, "width": 8, "batch_norm": True},
        "num_classes": 4,
        "image_size": 32,
        "channels": 3,
        "batch_size": 32,
        "num_train_steps": 1000,
        "optimizer": {"name": "adam", "learning_rate": 2e-3, "schedule": "cosine", "warmup_steps": 100,
                      "grad_clip_norm": 5.0, "weight_decay": 0.0},
        "loss": {"ignore_label": IGNORE_LABEL, "class_weighting": "none"},
        "augment": {"flip_horizontal": True, "flip_vertical": False, "max_shift": 0},
        "normalize": {"mean": (), "std": ()},
        "log_every_steps": 50,
        "eval_every_steps": 0,
        "progress": True,
    })


def _options(config: Any) -> dict[str, Any]:
    options = config.to_dict() if hasattr(config, "to_dict") else dict(config or {})
    return {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}


def _optional_tuple(value: Any) -> tuple[float, ...] | None:
    return None if value is None or len(value) == 0 else tuple(float(v) for v in value)


def fit(
    config: ml_collections.ConfigDict,
    workdir: str | pathlib.Path,
    *,
    train_batches: Iterator[Batch],
    eval_batches: Callable[[], Iterable[Batch]],
    class_weight_masks: Iterable[np.ndarray] | None = None,
    num_predictions: int = 0,
    initial_params: Mapping[str, Any] | None = None,
) -> FitResult:
    """Trains a registered segmentation model for `config.num_train_steps` steps and evaluates it.

    Config fields read (`default_config()`; see also `experiments/configs/segmentation.py`): `seed`, `model`,
    `model_options`, `num_classes`, `image_size`, `channels`, `batch_size`, `num_train_steps`,
    `optimizer` (as `cnn.train.optim.make_optimizer`), `loss.{ignore_label, class_weighting}`
    ("none" or "median_frequency", computed from `class_weight_masks`), `augment.{flip_horizontal,
    flip_vertical, max_shift}`, `normalize.{mean, std}` (empty: none), `log_every_steps`,
    `eval_every_steps` (0: only at the end), `progress`.

    The run directory gets `config.json`, `metrics.jsonl` (+ TensorBoard `events/`),
    `results.json` and `params.msgpack` (the final variables, `flax.serialization.to_bytes`).

    Args:
      train_batches: an endless iterator of segmentation batches of `config.batch_size`.
      eval_batches: returns a fresh finite iterable of evaluation batches per call.
      class_weight_masks: the training masks, for median-frequency class weights.
      num_predictions: keep the final predictions of this many first evaluation images
        (`result.evaluation.predictions`), from the same compiled eval step.
      initial_params: parameters of a trained model to start from (`overlay_params`): e.g. a
        trained dilated front end for the front end + context module (Yu & Koltun train the
        front end first); layers it lacks keep their initialization. Parameters only: BatchNorm
        running statistics restart and are re-estimated while training.
    """
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
    steps = int(config.num_train_steps)
    if steps < 1:
        raise ValueError(f"config.num_train_steps must be >= 1, got {steps}")
    num_classes, ignore_label = int(config.num_classes), int(config.loss.ignore_label)
    weighting = str(config.loss.class_weighting)
    if weighting not in ("none", "median_frequency"):
        raise ValueError(f"config.loss.class_weighting={weighting!r} must be 'none' or 'median_frequency'")
    class_weights = None
    if weighting == "median_frequency":
        if class_weight_masks is None:
            raise ValueError("config.loss.class_weighting='median_frequency' needs class_weight_masks")
        class_weights = median_frequency_weights(class_weight_masks, num_classes, ignore_label=ignore_label)
    mean, std = _optional_tuple(config.normalize.mean), _optional_tuple(config.normalize.std)

    model = cnn.models.create(config.model, num_classes=num_classes, **_options(config.model_options))
    tx, schedule = make_optimizer(config.optimizer, total_steps=steps)
    size = int(config.image_size)
    state = init_state(model, tx, seed=int(config.seed), input_shape=(1, size, size, int(config.channels)))
    if initial_params is not None:
        params, copied = overlay_params(state.params, initial_params)
        if not copied:
            raise ValueError("initial_params share no parameter (same path and shape) with the model")
        state = state.replace(params=params, opt_state=tx.init(params))
    num_params = cnn.models.count_params(state.params)
    train_step = compile_single(make_train_step(
        num_classes=num_classes, ignore_label=ignore_label, class_weights=class_weights, mean=mean, std=std,
        augmentation=make_augmentation(ignore_label=ignore_label, **_options(config.augment)),
        learning_rate_fn=schedule,
    ))
    eval_step = jax.jit(make_eval_step(
        num_classes=num_classes, ignore_label=ignore_label, mean=mean, std=std, return_predictions=num_predictions > 0
    ))

    def run_eval() -> EvaluationResult:
        return evaluate(state, eval_batches(), num_classes=num_classes, ignore_label=ignore_label, eval_step=eval_step,
                        num_predictions=num_predictions)

    logger = RunLogger(workdir, enabled=True, resume_step=-1)
    log_every, eval_every = int(config.log_every_steps), int(config.eval_every_steps)
    window: dict[str, jax.Array] | None = None  # metric sums since the last log, kept on device
    count = 0
    started = time.perf_counter()
    first_step_done = None
    eval_seconds = 0.0
    progress = tqdm(range(1, steps + 1), desc=str(config.model), disable=not bool(config.progress), dynamic_ncols=True)
    for step in progress:
        state, metrics = train_step(state, next(train_batches))
        if step == 1:
            jax.block_until_ready(state)
            first_step_done = time.perf_counter()
        window = metrics if window is None else jax.tree_util.tree_map(jnp.add, window, metrics)
        count += 1
        if step % log_every == 0 or step == steps:
            summary = {f"train/{k}": float(v) / count for k, v in jax.device_get(window).items()}
            if not np.isfinite(summary["train/loss"]):
                raise FloatingPointError(f"the training loss is {summary['train/loss']} at step {step}")
            logger.write(step, summary)
            progress.set_postfix(loss=f"{summary['train/loss']:.3f}")
            window, count = None, 0
        if eval_every and step % eval_every == 0 and step != steps:
            eval_started = time.perf_counter()
            result = run_eval()
            eval_seconds += time.perf_counter() - eval_started
            logger.write(step, {f"eval/{k}": v for k, v in result.metrics.items()})
    jax.block_until_ready(state)
    train_done = time.perf_counter()
    seconds_per_step = (train_done - first_step_done - eval_seconds) / (steps - 1) if steps > 1 else float("nan")
    result = run_eval()
    logger.write(steps, {f"eval/{k}": v for k, v in result.metrics.items()})
    seconds = time.perf_counter() - started
    logger.close()
    host_state = to_host(state)
    import flax.serialization

    (workdir / "params.msgpack").write_bytes(flax.serialization.to_bytes(host_state.variables()))
    (workdir / "results.json").write_text(json.dumps({
        **result.metrics,
        "per_class_iou": [None if np.isnan(v) else float(v) for v in result.per_class_iou],
        "confusion": result.confusion.tolist(),
        "steps": steps,
        "seconds": seconds,
        "seconds_per_step": seconds_per_step,
        "num_params": num_params,
    }, indent=2) + "\n")
    return FitResult(host_state, result, logger.records, workdir, seconds, seconds_per_step, num_params)


__all__ = [
    "BATCH_KEYS",
    "EvaluationResult",
    "FitResult",
    "default_config",
    "evaluate",
    "fit",
    "init_state",
    "make_augmentation",
    "make_eval_step",
    "make_predict_fn",
    "make_train_step",
    "overlay_params",
    "preprocess_images",
]
