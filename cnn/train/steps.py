"""Pure train/eval steps and the three ways of compiling them (jit, pmap, sharded jit).

    train_step = make_train_step(label_smoothing=0.1)         # (state, batch) -> (state, metrics)
    eval_step = make_eval_step()                              # (state, batch) -> metric sums
    step = compile_single(train_step)                         # one device
    step = compile_pmap(make_train_step(axis_name="batch"))   # replicated state, [devices, b, ...]
    step = compile_sharded(train_step, mesh)                  # global batch sharded over "data"

A batch is `{"image": [batch, height, width, channels], "label": [batch] int32}` (+ an optional
`"mask": [batch]` of 0/1 weights in eval, for padded final batches). Integer images are scaled
to [0, 1] on device (`prepare_images`).

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

import functools
import inspect
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cnn.train.state import TrainState

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
AugmentFn = Callable[[jax.Array, jax.Array], jax.Array]


def cross_entropy_loss(
    logits: jax.Array, labels: jax.Array, *, label_smoothing: float = 0.0, weights: jax.Array | None = None
) -> jax.Array:
    """Mean softmax cross-entropy of `logits [batch, classes]` against int `labels [batch]`.

    With `label_smoothing = a`, the target is `(1 - a) * one_hot + a / classes`. `weights [batch]`
    (0/1) gives a weighted mean. Computed in float32 whatever the logits' dtype.
    """
    logits = logits.astype(jnp.float32)
    targets = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    per_example = optax.softmax_cross_entropy(logits, targets)
    if weights is None:
        return jnp.mean(per_example)
    weights = weights.astype(jnp.float32)
    return jnp.sum(per_example * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def prepare_images(images: jax.Array) -> jax.Array:
    """Integer pixels (uint8 0..255) -> float32 in [0, 1]; float images pass unchanged.

    Loaders may ship uint8 batches (4x less host-to-device traffic); the scaling happens here,
    on device, identically in the train and eval steps.
    """
    if jnp.issubdtype(images.dtype, jnp.integer):
        return images.astype(jnp.float32) / 255.0
    return images


def _accepts_offset(function: Callable) -> bool:
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False
    return "offset" in parameters


def make_augment_fn(op: Callable) -> AugmentFn:
    """Wraps a per-example `cnn.data.augment` op `(key, image, targets) -> (image, targets)` as a
    batch hook `(key, images, *, offset=0) -> images` (one key per global example index)."""
    from cnn.data import augment

    def augment_fn(key: jax.Array, images: jax.Array, *, offset: Any = 0) -> jax.Array:
        return augment.apply_batch(op, key, {"image": images}, offset=offset)["image"]

    return augment_fn


def make_train_step(
    *,
    label_smoothing: float = 0.0,
    axis_name: str | None = None,
    augment_fn: AugmentFn | None = None,
    learning_rate_fn: optax.Schedule | None = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """Builds the pure `train_step(state, batch) -> (state, metrics)`.

    Args:
      label_smoothing: label-smoothing coefficient of the cross-entropy.
      axis_name: the mapped axis name when the step runs under `pmap` (or `shard_map`):
        gradients, BatchNorm statistics and metrics are `pmean`ed over it. None otherwise.
      augment_fn: optional on-device augmentation `(key, images) -> images`, applied to
        `batch["image"]` (float, [0, 1]) with a key derived from `(state.rng, state.step)`. Under
        pmap, a hook that takes an `offset` keyword gets the same key on every device and
        `offset` = index of its first example in the global batch (so it can draw per-example
        keys as `cnn.data.augment.apply_batch` does, identical to a single-device run); other
        hooks get the key folded with the device index.
      learning_rate_fn: the schedule, to report `learning_rate` in the metrics.

    Returns:
      `train_step`; its metrics are float32 scalars `loss`, `accuracy`, `grad_norm` (and
      `learning_rate`), averaged over the (global) batch.
    """

    takes_offset = augment_fn is not None and _accepts_offset(augment_fn)

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        augment_key, dropout_key = jax.random.split(state.step_key())
        images, labels = prepare_images(batch["image"]), batch["label"]
        if axis_name is not None:
            device = jax.lax.axis_index(axis_name)
            dropout_key = jax.random.fold_in(dropout_key, device)
            if augment_fn is not None and takes_offset:
                # Per-example keys from the global example index: same draws as one device.
                images = augment_fn(augment_key, images, offset=device * images.shape[0])
            elif augment_fn is not None:
                images = augment_fn(jax.random.fold_in(augment_key, device), images)
        elif augment_fn is not None:
            images = augment_fn(augment_key, images)

        def loss_fn(params):
            logits, updates = state.apply_fn(
                state.variables(params),
                images,
                train=True,
                mutable=["batch_stats"],
                rngs={"dropout": dropout_key},
            )
            loss = cross_entropy_loss(logits, labels, label_smoothing=label_smoothing)
            return loss, (logits, updates)

        (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        batch_stats = updates.get("batch_stats", state.batch_stats)
        if axis_name is not None:
            grads = jax.lax.pmean(grads, axis_name)
            batch_stats = jax.lax.pmean(batch_stats, axis_name)
        metrics = {
            "loss": loss,
            "accuracy": jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32)),
        }
        if axis_name is not None:
            metrics = jax.lax.pmean(metrics, axis_name)
        metrics["grad_norm"] = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree_util.tree_leaves(grads)))
        if learning_rate_fn is not None:
            metrics["learning_rate"] = jnp.asarray(learning_rate_fn(state.step), jnp.float32)
        new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
        return new_state, metrics

    return train_step


def make_eval_step(
    *, axis_name: str | None = None, label_smoothing: float = 0.0
) -> Callable[[TrainState, Batch], Metrics]:
    """Builds the pure `eval_step(state, batch) -> metrics` (inference mode, running BN stats).

    Returns sums, so that batches of any size (and padding) aggregate exactly:
    `loss_sum` (summed per-example cross-entropy), `correct` (number right), `count` (number of
    real examples; `batch["mask"]` marks padding with 0). Under `axis_name` they are `psum`ed.
    `summarize_eval` turns the totals into `loss` and `accuracy`.
    """

    def eval_step(state: TrainState, batch: Batch) -> Metrics:
        images = prepare_images(batch["image"])
        logits = state.apply_fn(state.variables(), images, train=False).astype(jnp.float32)
        labels = batch["label"]
        mask = batch.get("mask")
        mask = jnp.ones(labels.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
        targets = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
        if label_smoothing:
            targets = optax.smooth_labels(targets, label_smoothing)
        per_example = optax.softmax_cross_entropy(logits, targets)
        sums = {
            "loss_sum": jnp.sum(per_example * mask),
            "correct": jnp.sum((jnp.argmax(logits, -1) == labels).astype(jnp.float32) * mask),
            "count": jnp.sum(mask),
        }
        if axis_name is not None:
            sums = jax.lax.psum(sums, axis_name)
        return sums

    return eval_step


def summarize_eval(totals: dict[str, float]) -> dict[str, float]:
    """`{"loss", "accuracy", "count"}` from summed eval metrics."""
    count = float(totals["count"])
    if count <= 0:
        raise ValueError(f"no examples were evaluated (count={count})")
    return {"loss": float(totals["loss_sum"]) / count, "accuracy": float(totals["correct"]) / count, "count": count}


def _donate() -> tuple[int, ...]:
    # Buffer donation saves memory on accelerators; the CPU backend ignores it with a warning.
    return (0,) if jax.default_backend() != "cpu" else ()


# XLA CPU options for every compiled step (benchmarks/RESULTS.md, "XLA CPU options"). In this
# JAX, XLA CPU hands some convolutions and the elementwise fusions to YNNPACK by default, among
# them every kernel-gradient convolution (a whole-image window with the batch as features), which
# YNNPACK runs 2.5-3x slower than XLA's Eigen convolution on 2 cores. Keeping YNNPACK for dots
# and reductions only makes the CIFAR ResNet train step 1.2x (one core) to 1.5x (two cores)
# faster and eval 1.35x, with the same numbers up to rounding.
CPU_COMPILER_OPTIONS: Mapping[str, str] = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE",
}


@functools.lru_cache(maxsize=None)
def _compiler_options_accepted(options: tuple[tuple[str, str], ...]) -> bool:
    # Option names and enum values come and go between XLA versions: probe once per process.
    try:
        jax.jit(lambda x: x + 1, compiler_options=dict(options)).lower(np.float32(0)).compile()
    except (jax.errors.JaxRuntimeError, TypeError, ValueError):
        return False
    return True


def default_compiler_options(backend: str | None = None) -> dict[str, str] | None:
    """The XLA options `compile_single`/`compile_sharded` use by default, or None for XLA's own.

    `CPU_COMPILER_OPTIONS` on the CPU backend when the installed jaxlib accepts them; None on
    GPU/TPU, when the jaxlib rejects them, or when `XLA_FLAGS` already sets one of them (the
    user's flag wins).
    """
    if (backend or jax.default_backend()) != "cpu":
        return None
    flags = os.environ.get("XLA_FLAGS", "")
    if any(f"--{name}" in flags for name in CPU_COMPILER_OPTIONS):
        return None
    if not _compiler_options_accepted(tuple(sorted(CPU_COMPILER_OPTIONS.items()))):
        return None
    return dict(CPU_COMPILER_OPTIONS)


CompilerOptions = Mapping[str, str] | None | str


def _resolve_options(compiler_options: CompilerOptions) -> dict[str, Any]:
    """`jax.jit` keyword arguments for `compiler_options` ("auto", None or a mapping)."""
    if isinstance(compiler_options, str):
        if compiler_options != "auto":
            raise ValueError(f'compiler_options must be "auto", None or a mapping, got {compiler_options!r}')
        compiler_options = default_compiler_options()
    return {"compiler_options": dict(compiler_options)} if compiler_options else {}


def compile_single(
    step_fn: Callable, *, donate_state: bool = True, compiler_options: CompilerOptions = "auto"
) -> Callable:
    """`jax.jit(step_fn)` for one device (state donated on accelerators).

    `compiler_options`: XLA options for this compilation; "auto" is `default_compiler_options()`
    (faster convolution gradients on CPU), None XLA's defaults.
    """
    return jax.jit(step_fn, donate_argnums=_donate() if donate_state else (), **_resolve_options(compiler_options))


def _shard_map(fn, mesh, in_specs, out_specs):
    if hasattr(jax, "shard_map"):
        try:
            return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
        except TypeError:  # older signature
            pass
    from jax.experimental.shard_map import shard_map

    return shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


def pmap_via_shard_map(
    step_fn: Callable, *, axis_name: str, devices: Any = None, compiler_options: CompilerOptions = "auto"
) -> Callable:
    """A `jax.pmap(step_fn, axis_name)` look-alike built on `shard_map` + `jit`.

    Same calling convention as pmap (every argument carries a leading device axis; collectives
    over `axis_name` work inside `step_fn`), for JAX versions where `jax.pmap` is deprecated or
    removed. Single-process only: `devices` (default: local devices) form a 1-D mesh.
    """
    devices = np.asarray(jax.local_devices() if devices is None else devices)
    mesh = Mesh(devices, (axis_name,))
    spec = PartitionSpec(axis_name)

    def per_device(*args):
        squeezed = jax.tree_util.tree_map(lambda x: x[0], args)
        return jax.tree_util.tree_map(lambda x: x[None], step_fn(*squeezed))

    @functools.wraps(step_fn)
    def wrapper(*args):
        mapped = _shard_map(per_device, mesh, in_specs=(spec,) * len(args), out_specs=spec)
        return mapped(*args)

    return jax.jit(wrapper, **_resolve_options(compiler_options))


def compile_pmap(
    step_fn: Callable, *, axis_name: str = "batch", use_shard_map: bool | None = None, donate_state: bool = True
) -> Callable:
    """The pmap-compiled step: state replicated, batch `[local_devices, batch/devices, ...]`.

    `step_fn` must be built with the same `axis_name` (e.g. `make_train_step(axis_name="batch")`).
    Uses `jax.pmap` when the installed JAX has it (jax 0.10/0.11 implement it on `jit` +
    `shard_map` themselves); `use_shard_map=True` (or a JAX without `pmap`) uses
    `pmap_via_shard_map`, which keeps the same API (and, unlike `jax.pmap`, takes
    `default_compiler_options()`).
    """
    if use_shard_map is None:
        use_shard_map = not hasattr(jax, "pmap")
    if use_shard_map:
        return pmap_via_shard_map(step_fn, axis_name=axis_name)
    return jax.pmap(step_fn, axis_name=axis_name, donate_argnums=_donate() if donate_state else ())


def compile_sharded(
    step_fn: Callable,
    mesh: Mesh,
    *,
    data_axis: str = "data",
    returns_state: bool = True,
    compiler_options: CompilerOptions = "auto",
) -> Callable:
    """`jax.jit` with the state replicated and the batch sharded over `mesh` axis `data_axis`.

    Args:
      step_fn: `train_step` (returns `(state, metrics)`) or `eval_step` (returns metrics; pass
        `returns_state=False`), written for the global batch (no axis name).
      mesh: the device mesh (`cnn.train.parallel.make_mesh`).
      compiler_options: as in `compile_single`.
    """
    replicated = NamedSharding(mesh, PartitionSpec())
    batch_sharding = NamedSharding(mesh, PartitionSpec(data_axis))
    out_shardings = (replicated, replicated) if returns_state else replicated
    return jax.jit(
        step_fn,
        in_shardings=(replicated, batch_sharding),
        out_shardings=out_shardings,
        donate_argnums=_donate() if returns_state else (),
        **_resolve_options(compiler_options),
    )


__all__ = [
    "CPU_COMPILER_OPTIONS",
    "compile_pmap",
    "compile_sharded",
    "compile_single",
    "cross_entropy_loss",
    "default_compiler_options",
    "make_augment_fn",
    "make_eval_step",
    "make_train_step",
    "pmap_via_shard_map",
    "prepare_images",
    "summarize_eval",
]
