"""What differs between training tasks, as data: a `Task` is the loss, the metrics and the evaluation.

`cnn.train.fit` is one loop for every task; the task supplies the small pieces that differ:

    task = classification(label_smoothing=0.1)            # CLASSIFICATION is the default
    result = cnn.train.fit(config, "runs/x", task=task)

    loss, metrics = task.loss(outputs, batch)             # on device, inside the train step
    sums = task.eval_sums(outputs, batch, weight)         # on device, per evaluation batch
    metrics = task.summarize(totals)                      # on the host, over the whole split

Segmentation, detection and dynamics define their `Task`s next to their own pieces
(`cnn.tasks.segmentation.task`, ...). A task is compared and hashed by `name` and `options`
only, so two tasks built with the same options share compiled steps.

Batches are dicts of arrays with a leading batch axis. `prepare` maps a batch to what the model
and the loss read (uint8 images to float, on device); augmentation (`fit`'s `config.augment` or
its `augment_fn`) moves the task's `augment_keys` together (an image and its mask or boxes).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]
LossFn = Callable[[Any, Batch], tuple[jax.Array, Metrics]]
EvalSumsFn = Callable[[Any, Batch, jax.Array], Metrics]
SummarizeFn = Callable[[Mapping[str, np.ndarray]], dict[str, float]]
PrepareFn = Callable[[Batch], dict[str, jax.Array]]
# The evaluation batch entry that marks padding rows (0) of a short final batch; not "mask",
# which is segmentation's label map.
PADDING_KEY = "example_weight"


def prepare_images(images: jax.Array) -> jax.Array:
    """Integer pixels (uint8 0..255) -> float32 in [0, 1]; float images pass unchanged.

    Loaders may ship uint8 batches (4x less host-to-device traffic); the scaling happens on
    device, identically in the train and eval steps.
    """
    if jnp.issubdtype(images.dtype, jnp.integer):
        return images.astype(jnp.float32) / 255.0
    return images


def prepare_image_batch(batch: Batch) -> dict[str, jax.Array]:
    """The default `Task.prepare`: `batch["image"]` through `prepare_images`, the rest as is."""
    return {**batch, "image": prepare_images(batch["image"])}


@dataclasses.dataclass(frozen=True)
class Task:
    """The pieces of training and evaluation that differ between tasks.

    Attributes:
      name: a short name ("classification", "segmentation", ...), recorded in the run's config.
      options: the options the task was built with, as sorted `(name, value)` pairs of hashable
        values; with `name`, they define equality (and the run directory's record).
      batch_keys: the batch entries the steps read (others are dropped before the device).
      loss: `(outputs, batch) -> (scalar loss, metrics)`, `outputs` being the model's train-mode
        output on the prepared, augmented batch; metrics are float32 scalars averaged over the
        batch (the loop averages them over its logging window).
      eval_sums: `(outputs, batch, weight) -> sums` in inference mode; `weight` `[batch]` is 0
        for padding rows (`batch[PADDING_KEY]`), 1 otherwise. Entries are summed over batches (and devices), except `gather_keys`.
      summarize: host-side `totals -> {metric: float}` over a whole evaluation split.
      gather_keys: `eval_sums` entries with a leading batch axis that are concatenated over
        batches (padding rows dropped) instead of summed, e.g. detections for VOC mAP.
      best_metric, best_mode: the summary metric that picks the best checkpoint, "max" or "min".
      prepare: on-device batch preparation before augmentation, in train and eval steps.
      augment_keys: `{batch key: augmentation key}` moved together by an augmentation op
        (`cnn.data.augment`: "image", "mask", "boxes", "box_valid").
      input_key: the batch entry whose shape is the model's input shape.
      inputs: `prepared, augmented batch -> model input` (default: `batch[input_key]`), e.g. a
        per-channel normalization that must come after augmentation.
      model_options: extra model constructor arguments the task needs, as `(name, value)` pairs.
      takes_num_classes: pass `config.num_classes` to the model constructor.
      progress_metric: a training metric shown next to the loss on the progress bar ("" none).
    """

    name: str
    options: tuple[tuple[str, Any], ...]
    batch_keys: tuple[str, ...] = dataclasses.field(compare=False)
    loss: LossFn = dataclasses.field(compare=False)
    eval_sums: EvalSumsFn = dataclasses.field(compare=False)
    summarize: SummarizeFn = dataclasses.field(compare=False)
    gather_keys: tuple[str, ...] = dataclasses.field(default=(), compare=False)
    best_metric: str = dataclasses.field(default="accuracy", compare=False)
    best_mode: str = dataclasses.field(default="max", compare=False)
    prepare: PrepareFn = dataclasses.field(default=prepare_image_batch, compare=False)
    augment_keys: tuple[tuple[str, str], ...] = dataclasses.field(default=(("image", "image"),), compare=False)
    input_key: str = dataclasses.field(default="image", compare=False)
    inputs: Callable[[Batch], jax.Array] | None = dataclasses.field(default=None, compare=False)
    model_options: tuple[tuple[str, Any], ...] = dataclasses.field(default=(), compare=False)
    takes_num_classes: bool = dataclasses.field(default=True, compare=False)
    progress_metric: str = dataclasses.field(default="accuracy", compare=False)

    def __post_init__(self):
        if self.best_mode not in ("max", "min"):
            raise ValueError(f"Task {self.name!r}: best_mode={self.best_mode!r} must be 'max' or 'min'")
        missing = [key for key, _ in self.augment_keys if key not in self.batch_keys]
        if missing or self.input_key not in self.batch_keys:
            raise ValueError(
                f"Task {self.name!r}: augment_keys {missing} / input_key {self.input_key!r} must be among "
                f"batch_keys={self.batch_keys}"
            )

    def model_input(self, batch: Batch) -> jax.Array:
        """What the model is applied to: `inputs(batch)`, or `batch[input_key]`."""
        return batch[self.input_key] if self.inputs is None else self.inputs(batch)

    def record(self) -> dict[str, Any]:
        """`{"name": ..., **options}`: what the run directory stores of the task."""
        return {"name": self.name, **dict(self.options)}

    def select(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """The task's `batch_keys` of a host batch (plus `PADDING_KEY`, eval's padding marker).

        Raises:
          ValueError: a key is missing, naming the keys the batch has.
        """
        missing = [key for key in self.batch_keys if key not in batch]
        if missing:
            raise ValueError(
                f"a {self.name} batch needs keys {list(self.batch_keys)}; this batch lacks {missing} "
                f"(it has {sorted(batch)})"
            )
        keys = self.batch_keys + ((PADDING_KEY,) if PADDING_KEY in batch else ())
        return {key: batch[key] for key in keys}


def options_tuple(**options: Any) -> tuple[tuple[str, Any], ...]:
    """Sorted `(name, value)` pairs, lists and arrays turned into tuples so that they hash."""

    def frozen(value: Any) -> Any:
        if isinstance(value, np.ndarray):
            value = value.tolist()
        return tuple(frozen(v) for v in value) if isinstance(value, (list, tuple)) else value

    return tuple(sorted((name, frozen(value)) for name, value in options.items()))


# ------------------------------------------------------------------------------------------------
# Classification


def cross_entropy_loss(
    logits: jax.Array, labels: jax.Array, *, label_smoothing: float = 0.0, weights: jax.Array | None = None
) -> jax.Array:
    """Mean softmax cross-entropy of `logits [batch, classes]` against int `labels [batch]`.

    With `label_smoothing = a`, the target is `(1 - a) * one_hot + a / classes`. `weights [batch]`
    (0/1) gives a weighted mean. Computed in float32 whatever the logits' dtype.
    """
    per_example = _per_example_cross_entropy(logits, labels, label_smoothing)
    if weights is None:
        return jnp.mean(per_example)
    weights = weights.astype(jnp.float32)
    return jnp.sum(per_example * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def _per_example_cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float) -> jax.Array:
    logits = logits.astype(jnp.float32)
    targets = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def split_auxiliary(outputs: Any) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """`(main logits, auxiliary logits)` of a model output: a plain array has no auxiliaries; a
    tuple (e.g. GoogLeNet's train-mode `GoogLeNetOutput(logits, aux1, aux2)`) has its first entry
    as the main logits and the rest as auxiliary heads."""
    if isinstance(outputs, tuple):
        return outputs[0], tuple(outputs[1:])
    return outputs, ()


def pool_images(images: jax.Array, factor: int) -> jax.Array:
    """Mean over `factor x factor` pixel blocks: `[b, h, w, c] -> [b, h // factor, w // factor, c]`
    (float; trailing rows and columns that do not fill a block are dropped)."""
    if factor == 1:
        return images
    b, h, w, c = images.shape
    h, w = h // factor * factor, w // factor * factor
    blocks = images[:, :h, :w].reshape(b, h // factor, factor, w // factor, factor, c)
    return blocks.astype(jnp.float32).mean(axis=(2, 4))


def classification(*, label_smoothing: float = 0.0, aux_weight: float = 0.3, input_pool: int = 1) -> Task:
    """Image classification: softmax cross-entropy on `batch["label"]`, accuracy.

    Args:
      label_smoothing: in [0, 1); the target is `(1 - a) one_hot + a / classes` (train and eval).
      aux_weight: weight of each auxiliary head's loss when the model returns several logits in
        train mode (GoogLeNet's auxiliary classifiers: 0.3 in Szegedy et al. 2015); the loss is
        `main + aux_weight * sum(aux losses)`, accuracy is that of the main head.

      input_pool: average-pool the images by this factor on device, in training and evaluation
        (`pool_images`: a coarser, cheaper view of the data, e.g. 28x28 Fashion-MNIST at 14x14).

    Batch: `{"image": [batch, height, width, channels], "label": [batch] int}`.
    Summary: `loss` (mean cross-entropy), `accuracy`, `count`.
    """
    if not 0.0 <= float(label_smoothing) < 1.0:
        raise ValueError(f"label_smoothing={label_smoothing!r} must be in [0, 1)")
    if float(aux_weight) < 0:
        raise ValueError(f"aux_weight={aux_weight!r} must be >= 0")
    if int(input_pool) < 1:
        raise ValueError(f"input_pool={input_pool!r} must be an integer >= 1")
    smoothing, aux, pool = float(label_smoothing), float(aux_weight), int(input_pool)

    def prepare(batch: Batch) -> dict[str, jax.Array]:
        return {**batch, "image": pool_images(prepare_images(batch["image"]), pool)}

    def loss(outputs: Any, batch: Batch) -> tuple[jax.Array, Metrics]:
        logits, auxiliary = split_auxiliary(outputs)
        labels = batch["label"]
        main = cross_entropy_loss(logits, labels, label_smoothing=smoothing)
        total = main + sum(aux * cross_entropy_loss(a, labels, label_smoothing=smoothing) for a in auxiliary)
        metrics = {"accuracy": jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))}
        if auxiliary:
            metrics["main_loss"] = main
        return total, metrics

    def eval_sums(outputs: Any, batch: Batch, weight: jax.Array) -> Metrics:
        logits, _ = split_auxiliary(outputs)
        labels = batch["label"]
        per_example = _per_example_cross_entropy(logits, labels, smoothing)
        correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
        return {"loss_sum": jnp.sum(per_example * weight), "correct": jnp.sum(correct * weight), "count": jnp.sum(weight)}

    return Task(
        name="classification",
        options=options_tuple(label_smoothing=smoothing, aux_weight=aux, **({"input_pool": pool} if pool > 1 else {})),
        batch_keys=("image", "label"),
        prepare=prepare if pool > 1 else prepare_image_batch,
        loss=loss,
        eval_sums=eval_sums,
        summarize=summarize_classification,
        best_metric="accuracy",
        best_mode="max",
    )


def summarize_classification(totals: Mapping[str, Any]) -> dict[str, float]:
    """`{"loss", "accuracy", "count"}` from summed `loss_sum`, `correct`, `count`.

    Raises:
      ValueError: nothing was evaluated (count 0).
    """
    count = float(totals["count"])
    if count <= 0:
        raise ValueError(f"no examples were evaluated (count={count})")
    return {"loss": float(totals["loss_sum"]) / count, "accuracy": float(totals["correct"]) / count, "count": count}


CLASSIFICATION = classification()

__all__ = [
    "CLASSIFICATION",
    "PADDING_KEY",
    "Task",
    "classification",
    "cross_entropy_loss",
    "options_tuple",
    "pool_images",
    "prepare_image_batch",
    "prepare_images",
    "split_auxiliary",
    "summarize_classification",
]
