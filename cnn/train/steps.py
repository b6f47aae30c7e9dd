"""The pure train and eval steps of every task: `step(state, batch) -> (state, metrics)`.

    train_step = make_train_step(task)                     # task: a cnn.train.task.Task
    eval_step = make_eval_step(task)                       # (state, batch) -> sums
    step = cnn.train.parallel.compile_single(train_step)   # compilation: cnn.train.parallel

A batch is a dict of arrays with a leading batch axis (`task.batch_keys`; images
`[batch, height, width, channels]`), plus in eval an optional `PADDING_KEY` entry `[batch]` of 0/1
weights, for padded final batches. `task.prepare` runs first (integer images are scaled to [0, 1]
on device), then augmentation, then the model on `task.model_input(batch)`.

Data parallelism, and why the three paths agree:
  * sharded jit: the step is written for the global batch; XLA partitions it, so BatchNorm sees
    global-batch statistics and gradients are the global-batch mean by construction.
  * pmap: each device sees `batch / devices` examples. Gradients are averaged with
    `lax.pmean(grads, axis_name)`. BatchNorm must average its batch statistics across devices
    *inside* the forward pass to normalize like the single-device step does; models do that when
    built with `bn_axis_name=axis_name` (flax `BatchNorm(axis_name=...)`, as in flax
    examples/imagenet). The running statistics are additionally `pmean`ed after the step, which
    keeps replicas identical for models without that option (their normalization then uses
    per-device statistics, like unsynchronized BatchNorm in most multi-GPU code).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from cnn.train.state import TrainState
from cnn.train.task import (
    CLASSIFICATION,
    PADDING_KEY,
    Task,
    cross_entropy_loss,
    prepare_images,
)

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
AugmentFn = Callable[..., dict[str, jax.Array]]


def make_augment_fn(op: Callable) -> AugmentFn:
    """Wraps a per-example `cnn.data.augment` op `(key, image, targets) -> (image, targets)` as a
    batch hook `(key, fields, *, offset=0) -> fields`.

    `fields` holds a task's `augment_keys` (`{"image": [b, h, w, c]}`, plus "mask" or "boxes" and
    "box_valid"), moved together; every example draws its key from its global index
    (`cnn.data.augment.apply_batch`), so a sharded batch draws what one device would.
    """
    from cnn.data import augment

    def augment_fn(key: jax.Array, fields: Mapping[str, jax.Array], *, offset: Any = 0) -> dict[str, jax.Array]:
        return augment.apply_batch(op, key, fields, offset=offset)

    return augment_fn


def augment_batch(
    task: Task, augment_fn: AugmentFn, key: jax.Array, batch: Mapping[str, jax.Array], *, offset: Any = 0
) -> dict[str, jax.Array]:
    """`batch` with the task's `augment_keys` moved by `augment_fn` (renamed to the augmentation's
    names and back, e.g. detection's "valid" travels as "box_valid")."""
    fields = {op_key: batch[batch_key] for batch_key, op_key in task.augment_keys}
    moved = augment_fn(key, fields, offset=offset)
    return {**batch, **{batch_key: moved[op_key] for batch_key, op_key in task.augment_keys}}


def global_norm(tree: Any) -> jax.Array:
    """The L2 norm of all leaves of `tree` together (float32)."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(leaf.astype(jnp.float32))) for leaf in jax.tree_util.tree_leaves(tree)))


def make_train_step(
    task: Task = CLASSIFICATION,
    *,
    axis_name: str | None = None,
    augment_fn: AugmentFn | None = None,
    learning_rate_fn: optax.Schedule | None = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """Builds the pure `train_step(state, batch) -> (state, metrics)` of `task`.

    Args:
      task: the loss and metrics (`cnn.train.task`); classification by default.
      axis_name: the mapped axis name when the step runs under `pmap` (or `shard_map`):
        gradients, BatchNorm statistics and metrics are `pmean`ed over it. None otherwise.
      augment_fn: optional on-device augmentation `(key, fields, *, offset) -> fields`
        (`make_augment_fn`) of the task's `augment_keys`, with a key derived from
        `(state.rng, state.step)`. Under pmap every device gets the same key and `offset` = the
        index of its first example in the global batch, so per-example draws equal one device's.
      learning_rate_fn: the schedule, to report `learning_rate` in the metrics.

    Returns:
      `train_step(state, batch, augment_rng=None)`; its metrics are float32 scalars `loss`, the
      task's metrics, `grad_norm` (and `learning_rate`), averaged over the (global) batch.
      `augment_rng` (raw key data, `TrainState.rng` of another run) draws the augmentation from
      that run's keys instead of this state's, as an ensemble's shared data does.
    """

    def train_step(state: TrainState, batch: Batch, augment_rng: jax.Array | None = None) -> tuple[TrainState, Metrics]:
        augment_key, dropout_key = jax.random.split(state.step_key())
        if augment_rng is not None:  # another run key's draws (an ensemble's shared augmentation)
            augment_key = jax.random.split(jax.random.fold_in(jax.random.wrap_key_data(augment_rng), state.step))[0]
        batch = task.prepare(batch)
        offset = 0
        if axis_name is not None:
            device = jax.lax.axis_index(axis_name)
            dropout_key = jax.random.fold_in(dropout_key, device)
            offset = device * jax.tree_util.tree_leaves(batch)[0].shape[0]
        if augment_fn is not None:
            batch = augment_batch(task, augment_fn, augment_key, batch, offset=offset)

        def loss_fn(params):
            outputs, updates = state.apply_fn(
                state.variables(params),
                task.model_input(batch),
                train=True,
                mutable=["batch_stats"],
                rngs={"dropout": dropout_key},
            )
            loss, metrics = task.loss(outputs, batch)
            return loss, (metrics, updates)

        (loss, (task_metrics, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        batch_stats = updates.get("batch_stats", state.batch_stats)
        metrics = {"loss": loss, **task_metrics}
        if axis_name is not None:
            grads = jax.lax.pmean(grads, axis_name)
            batch_stats = jax.lax.pmean(batch_stats, axis_name)
            metrics = jax.lax.pmean(metrics, axis_name)
        metrics["grad_norm"] = global_norm(grads)
        if learning_rate_fn is not None:
            metrics["learning_rate"] = jnp.asarray(learning_rate_fn(state.step), jnp.float32)
        return state.apply_gradients(grads=grads, batch_stats=batch_stats), metrics

    return train_step


def make_eval_step(task: Task = CLASSIFICATION, *, axis_name: str | None = None) -> Callable[[TrainState, Batch], Metrics]:
    """Builds the pure `eval_step(state, batch) -> sums` (inference mode, running BN statistics).

    Returns the task's `eval_sums`, which aggregate exactly over batches of any size (padding
    rows carry `batch[PADDING_KEY] = 0`). Under `axis_name` the summed entries are `psum`ed; the
    task's `gather_keys` stay per device (the host concatenates them).
    """

    def eval_step(state: TrainState, batch: Batch) -> Metrics:
        batch = task.prepare(batch)
        inputs = task.model_input(batch)
        weight = batch.get(PADDING_KEY)
        weight = jnp.ones(inputs.shape[:1], jnp.float32) if weight is None else weight.astype(jnp.float32)
        outputs = state.apply_fn(state.variables(), inputs, train=False)
        sums = task.eval_sums(outputs, batch, weight)
        if axis_name is not None:
            summed = {k: v for k, v in sums.items() if k not in task.gather_keys}
            sums = {**sums, **jax.lax.psum(summed, axis_name)}
        return sums

    return eval_step


__all__ = [
    "augment_batch",
    "cross_entropy_loss",
    "global_norm",
    "make_augment_fn",
    "make_eval_step",
    "make_train_step",
    "prepare_images",
]
