"""The training loop: `fit(config, workdir)` and `evaluate(...)`.

    config = experiments.configs.train_digits.get_config()
    result = fit(config, "runs/digits")          # resumes from runs/digits/checkpoints if present
    result.final_eval["accuracy"], result.state.params

A run directory holds:
    config.json        the resolved config
    metrics.jsonl      one JSON object per logged step: {"step", "train/loss", ...} or {"step", "eval/..."}
    events/            TensorBoard event files (tensorboardX)
    checkpoints/<step> Orbax checkpoints (state, input position, loop state)
    plots/learning_curve.png
    results.json       final metrics
Only process 0 writes these (every process takes part in Orbax saves).

Exact resume: the state (params, batch_stats, opt_state, step, rng), the input iterator position
and the partial sums of the current logging window are checkpointed; on restart `fit` restores
the latest checkpoint, drops `metrics.jsonl` lines written after it, and continues; the result is
bit-identical to an uninterrupted run (same device layout; a different layout restores too but
reduces in a different order).
Guardrails: `validate_config` runs before any compilation; a non-finite training loss raises
`NonFiniteLossError` naming the step and the last good checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from cnn.train import optim, parallel as parallel_lib, steps as steps_lib
from cnn.train.checkpoint import Checkpointer, tree_is_finite
from cnn.train.state import TrainState, create_train_state, to_host

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
Callback = Callable[[int, TrainState], None]
DatasetFactory = Callable[..., Any]


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN/Inf loss (or parameters); the run was stopped.

    Attributes:
      step: the step whose loss (or updated parameters) was not finite.
      value: the offending loss value.
      last_checkpoint: directory of the last good checkpoint, or None.
    """

    def __init__(self, message: str, *, step: int, value: float, last_checkpoint: pathlib.Path | None):
        super().__init__(message)
        self.step, self.value, self.last_checkpoint = step, value, last_checkpoint


def default_config() -> ml_collections.ConfigDict:
    """Every field `fit` reads, with defaults (experiment configs override what they need)."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.data_seed = -1  # -1: use `seed` for the input order too
    config.dataset = "digits"
    config.data_dir = ""  # "": the loader's default (CNN_DATA_DIR or ~/.cache/cnn/data)
    config.train_split = "train"
    config.eval_split = "test"
    config.num_classes = 10
    config.batch_size = 64  # global, over all devices and processes
    config.eval_batch_size = 0  # 0: batch_size
    config.num_train_steps = 0  # 0: num_epochs * steps_per_epoch
    config.num_epochs = 1.0
    config.model = "simple_cnn"
    config.model_options = ml_collections.ConfigDict()
    config.dtype = "float32"  # computation dtype; "bfloat16" = mixed precision (params/BN stats f32)
    config.parallelism = "auto"  # "single" | "pmap" | "sharded" | "auto"
    config.augment = ""  # a `cnn.data.augment` op factory, e.g. "cifar_standard"; "" for none
    config.augment_options = ml_collections.ConfigDict()  # its keyword arguments
    config.optimizer = ml_collections.ConfigDict(
        {
            "name": "sgd",
            "learning_rate": 0.1,
            "momentum": 0.9,
            "nesterov": False,
            "b1": 0.9,
            "b2": 0.999,
            "eps": 1e-8,
            "weight_decay": 0.0,
            "grad_clip_norm": 0.0,
            "schedule": "constant",
            "warmup_steps": 0,
            "warmup_epochs": 0.0,
            "decay_steps": (),
            "decay_epochs": (),
            "decay_factor": 0.1,
            "end_learning_rate": 0.0,
            "param_groups": ml_collections.ConfigDict(),
        }
    )
    config.loss = ml_collections.ConfigDict({"label_smoothing": 0.0})
    config.log_every_steps = 10
    config.eval_every_steps = 0  # 0: once per epoch (and always at the end)
    config.checkpoint = ml_collections.ConfigDict(
        {
            "every_steps": -1,  # -1: with every eval; 0: only the final checkpoint
            "max_to_keep": 3,
            "best_metric": "eval/accuracy",  # "" to disable best-checkpoint retention
            "best_mode": "max",
            "keep_best": 1,
            "async_save": True,
        }
    )
    config.deterministic = True  # GPU: needs XLA_FLAGS=--xla_gpu_deterministic_ops=true (the CLI sets it)
    config.progress = True  # tqdm bar (process 0)
    config.plot = True  # plots/learning_curve.png at the end
    return config


def resolve_config(config: ml_collections.ConfigDict | Mapping[str, Any]) -> ml_collections.ConfigDict:
    """`default_config()` updated with `config`, field by field (nested one level).

    `model_options` and `optimizer.param_groups` are taken as given (they are free-form).

    Raises:
      ValueError: `config` has a field that `default_config()` does not know (a typo).
    """
    merged = default_config().to_dict()
    given = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
    unknown = sorted(set(given) - set(merged))
    if unknown:
        raise ValueError(f"unknown config fields {unknown}; known fields: {sorted(merged)}")
    for key, value in given.items():
        if isinstance(merged[key], dict) and key not in ("model_options", "augment_options"):
            value = dict(value or {})
            extra = sorted(set(value) - set(merged[key]))
            if extra:
                raise ValueError(f"unknown config fields {key}.{extra}; known: {sorted(merged[key])}")
            merged[key].update(value)
        else:
            merged[key] = value
    return ml_collections.ConfigDict(merged)


# ------------------------------------------------------------------------------------------------
# Validation


def _data_module():
    import cnn.data

    return cnn.data


def _known_datasets() -> list[str] | None:
    """`cnn.data.available()`, or None when the data package does not list its datasets."""
    available = getattr(_data_module(), "available", None)
    return sorted(available()) if callable(available) else None


def _create_model(config: ml_collections.ConfigDict, extra_options: Mapping[str, Any]):
    import cnn.models

    options = dict(config.model_options.to_dict() if hasattr(config.model_options, "to_dict") else config.model_options)
    options = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
    base = dict(num_classes=config.num_classes, dtype=DTYPES[config.dtype], param_dtype=jnp.float32)
    try:
        return cnn.models.create(config.model, **base, **options, **extra_options)
    except TypeError as error:
        if not extra_options:
            raise
        warnings.warn(
            f"model {config.model!r} does not take {sorted(extra_options)} ({error}); under pmap its "
            "BatchNorm normalizes with per-device statistics (running statistics are still averaged)",
            stacklevel=2,
        )
        return cnn.models.create(config.model, **base, **options)


def validate_config(
    config: ml_collections.ConfigDict,
    data_parallel: parallel_lib.DataParallel | None = None,
    *,
    input_shape: Sequence[int] | None = None,
) -> None:
    """Checks a resolved config (`resolve_config`) before anything is compiled.

    With `input_shape` (`[1, height, width, channels]`) the model is also built and its init
    traced abstractly (`check_model`); `fit` does that once the data is loaded.

    Raises:
      ValueError: an unknown model/dataset/dtype/parallelism/optimizer, model options the model
        rejects (e.g. an unknown discretization scheme), a batch size that does not split over
        the devices/processes, non-positive step counts. The message names the field and what
        would be valid.
      FileNotFoundError: `config.data_dir` is set but does not exist.
    """
    import cnn.models

    if config.parallelism not in parallel_lib.MODES:
        raise ValueError(f"config.parallelism={config.parallelism!r} is not one of {parallel_lib.MODES}")
    if config.dtype not in DTYPES:
        raise ValueError(f"config.dtype={config.dtype!r} is not one of {sorted(DTYPES)}")
    if config.model.lower() not in cnn.models.available():
        raise ValueError(
            f"config.model={config.model!r} is not a registered model; choose one of {cnn.models.available()}"
        )
    known = _known_datasets()
    if known is not None and config.dataset not in known:
        raise ValueError(f"config.dataset={config.dataset!r} is unknown; choose one of {known}")
    if config.data_dir and not pathlib.Path(config.data_dir).expanduser().is_dir():
        raise FileNotFoundError(
            f"config.data_dir={config.data_dir!r} does not exist; point it at the directory holding the "
            f"{config.dataset!r} files, or set it to '' to use the default data directory"
        )
    if int(config.num_classes) < 1:
        raise ValueError(f"config.num_classes must be >= 1, got {config.num_classes}")
    if int(config.batch_size) < 1:
        raise ValueError(f"config.batch_size must be >= 1, got {config.batch_size}")
    if int(config.num_train_steps) < 0 or (int(config.num_train_steps) == 0 and float(config.num_epochs) <= 0):
        raise ValueError(
            f"set config.num_train_steps > 0 or config.num_epochs > 0 (got {config.num_train_steps}, "
            f"{config.num_epochs})"
        )
    if int(config.log_every_steps) < 1:
        raise ValueError(f"config.log_every_steps must be >= 1, got {config.log_every_steps}")
    if float(config.loss.label_smoothing) < 0 or float(config.loss.label_smoothing) >= 1:
        raise ValueError(f"config.loss.label_smoothing must be in [0, 1), got {config.loss.label_smoothing}")
    data_parallel = data_parallel or parallel_lib.DataParallel.create(config.parallelism)
    data_parallel.check_batch_size(int(config.batch_size), "config.batch_size")
    eval_batch = int(config.eval_batch_size) or int(config.batch_size)
    data_parallel.check_batch_size(eval_batch, "config.eval_batch_size")
    # The optimizer fields (names, schedule, groups) are checked by building it.
    optim.make_optimizer(config.optimizer, steps_per_epoch=1000, total_steps=10**9)
    if config.augment:
        _augment_fn(config)
    if input_shape is not None:
        check_model(config, data_parallel, input_shape)


def check_model(
    config: ml_collections.ConfigDict, data_parallel: parallel_lib.DataParallel, input_shape: Sequence[int]
) -> None:
    """Builds the model and traces its init abstractly (`jax.eval_shape`, nothing compiled).

    Raises:
      ValueError: the model rejects `config.model_options` (e.g. an unknown scheme) or the input.
    """
    try:
        model = _create_model(config, data_parallel.model_options())
        jax.eval_shape(
            lambda: model.init(
                {"params": jax.random.key(0), "dropout": jax.random.key(1)},
                jnp.zeros(tuple(input_shape), jnp.float32),
                train=False,
            )
        )
    except (TypeError, ValueError, KeyError) as error:
        raise ValueError(
            f"config.model={config.model!r} with config.model_options={dict(config.model_options)} "
            f"was rejected: {error}"
        ) from error


def _augment_fn(config: ml_collections.ConfigDict) -> steps_lib.AugmentFn:
    """The train-step hook for `config.augment` (a `cnn.data.augment` op factory) and its options."""
    from cnn.data import augment as augment_module

    factory = getattr(augment_module, config.augment, None)
    if not callable(factory) or config.augment.startswith("_"):
        names = sorted(n for n in dir(augment_module) if n.startswith("random_") or n.endswith("_standard"))
        raise ValueError(
            f"config.augment={config.augment!r} is not an op factory of cnn.data.augment; e.g. one of {names}"
        )
    try:
        op = factory(**dict(config.augment_options))
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"config.augment={config.augment!r} rejected config.augment_options={dict(config.augment_options)}: {error}"
        ) from error
    return steps_lib.make_augment_fn(op)


# ------------------------------------------------------------------------------------------------
# Evaluation


def _pad_batch(batch: Mapping[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """Pads a (final, short) batch to `size` rows and adds `mask` (1 real, 0 padding)."""
    rows = len(batch["label"])
    padded = {}
    for key, value in batch.items():
        value = np.asarray(value)
        pad = np.zeros((size - rows,) + value.shape[1:], value.dtype)
        padded[key] = np.concatenate([value, pad]) if rows < size else value
    padded["mask"] = (np.arange(size) < rows).astype(np.float32)
    return padded


def evaluate(
    state: TrainState,
    batches: Iterable[Mapping[str, np.ndarray]],
    *,
    data_parallel: parallel_lib.DataParallel | None = None,
    eval_step: Callable | None = None,
    label_smoothing: float = 0.0,
) -> dict[str, float]:
    """Loss and accuracy of `state` over all examples of `batches` (inference mode).

    Args:
      state: a `TrainState` in `data_parallel`'s layout (host arrays are fine for "single").
      batches: global batches `{"image": [b, h, w, c], "label": [b]}`; the first batch's size
        is the padded size of every batch (short final batches are padded and masked).
      data_parallel: the layout (default "single").
      eval_step: a compiled eval step for that layout (built when None).
    Returns:
      `{"loss": mean cross-entropy, "accuracy": fraction correct, "count": examples}`.
    """
    data_parallel = data_parallel or parallel_lib.DataParallel.create("single")
    if eval_step is None:
        eval_step = data_parallel.compile_eval(
            steps_lib.make_eval_step(axis_name=data_parallel.axis_name, label_smoothing=label_smoothing)
        )
    totals = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
    size = None
    processes, process = jax.process_count(), jax.process_index()
    for batch in batches:
        size = size or len(batch["label"])
        if size % data_parallel.num_devices:
            raise ValueError(f"eval batch size {size} is not divisible by {data_parallel.num_devices} devices")
        padded = _pad_batch(batch, size)
        rows = size // processes
        local = {key: value[process * rows : (process + 1) * rows] for key, value in padded.items()}
        sums = data_parallel.get_metrics(eval_step(state, data_parallel.put_batch(local)))
        for key in totals:
            totals[key] += sums[key]
    return steps_lib.summarize_eval(totals)


# ------------------------------------------------------------------------------------------------
# Run directory: metrics, TensorBoard, plots


class RunLogger:
    """Writes metrics to metrics.jsonl and TensorBoard (process 0 only; others do nothing).

    Args:
      workdir: the run directory.
      enabled: write files (process 0); other processes only keep `records`.
      resume_step: the checkpoint step the run resumes from, -1 for a fresh start. Records of
        later steps (from an interrupted attempt) are dropped from metrics.jsonl.
    """

    def __init__(self, workdir: pathlib.Path, *, enabled: bool, resume_step: int):
        self.enabled = enabled
        self.path = workdir / "metrics.jsonl"
        self.records: list[dict[str, Any]] = []
        if self.path.exists():
            # Keep what the checkpoint covers; later lines belong to the interrupted attempt.
            kept = []
            for line in self.path.read_text().splitlines():
                if line.strip():
                    record = json.loads(line)
                    if record["step"] <= resume_step:
                        kept.append(record)
            self.records = kept
            if enabled:
                self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self._writer = None
        if enabled:
            from tensorboardX import SummaryWriter

            # TensorBoard then drops earlier attempts' events after the checkpoint.
            self._writer = SummaryWriter(str(workdir / "events"), purge_step=resume_step + 1)

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        self.records.append(record)
        if not self.enabled:
            return
        with self.path.open("a") as file:
            file.write(json.dumps(record) + "\n")
        for key, value in metrics.items():
            self._writer.add_scalar(key, float(value), int(step))

    def history(self, prefix: str) -> list[dict[str, Any]]:
        """The records that have `prefix/...` keys (e.g. "train", "eval")."""
        return [r for r in self.records if any(k.startswith(prefix + "/") for k in r)]

    def close(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None


def plot_learning_curves(records: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> pathlib.Path:
    """Saves loss and accuracy against step (train and eval) as a PNG; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, metric in zip(axes, ("loss", "accuracy")):
        for split, style in (("train", "-"), ("eval", "o-")):
            key = f"{split}/{metric}"
            points = [(r["step"], r[key]) for r in records if key in r]
            if points:
                xs, ys = zip(*points)
                axis.plot(xs, ys, style, label=split, markersize=3)
        axis.set_xlabel("step")
        axis.set_ylabel(metric)
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


# ------------------------------------------------------------------------------------------------
# fit


@dataclasses.dataclass
class FitResult:
    """What `fit` returns.

    Attributes:
      state: the final `TrainState` as host (numpy) arrays, one copy.
      train_history: logged training records `{"step", "train/loss", "train/accuracy", ...}`.
      eval_history: evaluation records `{"step", "eval/loss", "eval/accuracy"}`.
      final_eval: the evaluation at the last step (`{"loss", "accuracy", "count"}`) or None.
      workdir: the run directory.
      steps: the number of optimizer steps of the run.
      best_step: the checkpoint step that is best by `checkpoint.best_metric` (or the latest).
    """

    state: TrainState
    train_history: list[dict[str, Any]]
    eval_history: list[dict[str, Any]]
    final_eval: dict[str, float] | None
    workdir: pathlib.Path
    steps: int
    best_step: int | None


class _Window:
    """Host-side running sums of the training metrics between two log lines (checkpointed)."""

    KEYS = ("loss", "accuracy", "grad_norm")

    def __init__(self, state: Mapping[str, Any] | None = None):
        state = dict(state or {})
        self.sums = {k: float(state.get("sums", {}).get(k, 0.0)) for k in self.KEYS}
        self.count = int(state.get("count", 0))
        self.learning_rate = float(state.get("learning_rate", float("nan")))
        self.started = time.perf_counter()

    def add(self, metrics: Mapping[str, float]) -> None:
        for key in self.KEYS:
            self.sums[key] += metrics[key]
        self.count += 1
        self.learning_rate = metrics.get("learning_rate", self.learning_rate)

    def summary(self, batch_size: int) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        summary = {f"train/{k}": v / self.count for k, v in self.sums.items()}
        summary["train/learning_rate"] = self.learning_rate
        summary["train/examples_per_sec"] = self.count * batch_size / elapsed
        return summary

    def to_json(self) -> dict[str, Any]:
        return {"sums": dict(self.sums), "count": self.count, "learning_rate": self.learning_rate}

    def reset(self) -> None:
        self.sums = {k: 0.0 for k in self.KEYS}
        self.count = 0
        self.started = time.perf_counter()


_STEP_CACHE: dict[Any, tuple[Any, ...]] = {}
_STEP_CACHE_SIZE = 8


def _schedule_length_key(optimizer_config, steps_per_epoch: int, total_steps: int) -> tuple[int, ...]:
    """What of the run length the learning-rate schedule depends on (nothing for step-based
    constant/piecewise schedules)."""
    uses_epochs = any(optim._is_set(optimizer_config.get(name)) for name in ("warmup_epochs", "decay_epochs"))
    return (
        steps_per_epoch if uses_epochs else 0,
        total_steps if str(optimizer_config.schedule).lower() == "cosine" else 0,
    )


def _compiled_steps(config, model, data_parallel, augment_fn, *, steps_per_epoch: int, total_steps: int):
    """`(tx, learning_rate_fn, train_step, eval_step)` for a run, compiled lazily for its layout.

    Runs that agree on everything the compiled steps depend on (model, optimizer config and
    schedule length, loss, augmentation, layout) share one entry, so repeated `fit` calls in a
    process (seeds, resumes) reuse the compilations; the seed and data are not part of it.
    """
    try:
        key = (
            model,
            json.dumps(config.optimizer.to_dict(), sort_keys=True, default=str),
            _schedule_length_key(config.optimizer, steps_per_epoch, total_steps),
            float(config.loss.label_smoothing),
            augment_fn,  # a hook passed to fit (by identity), else config.augment by name:
            "" if augment_fn is not None else config.augment,
            json.dumps(config.augment_options.to_dict(), sort_keys=True, default=str),
            data_parallel.mode,
            data_parallel.use_shard_map,
            tuple(device.id for device in jax.devices()),
        )
        hash(key)
    except TypeError:  # unhashable model attributes: build without caching
        key = None
    if key is not None and key in _STEP_CACHE:
        return _STEP_CACHE[key]
    tx, learning_rate_fn = optim.make_optimizer(config.optimizer, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
    if augment_fn is None and config.augment:
        augment_fn = _augment_fn(config)
    label_smoothing = float(config.loss.label_smoothing)
    train_step = data_parallel.compile_train(
        steps_lib.make_train_step(
            label_smoothing=label_smoothing,
            axis_name=data_parallel.axis_name,
            augment_fn=augment_fn,
            learning_rate_fn=learning_rate_fn,
        )
    )
    eval_step = data_parallel.compile_eval(
        steps_lib.make_eval_step(axis_name=data_parallel.axis_name, label_smoothing=label_smoothing)
    )
    entry = (tx, learning_rate_fn, train_step, eval_step)
    if key is not None:
        if len(_STEP_CACHE) >= _STEP_CACHE_SIZE:
            _STEP_CACHE.pop(next(iter(_STEP_CACHE)))
        _STEP_CACHE[key] = entry
    return entry


def _default_datasets(config: ml_collections.ConfigDict) -> DatasetFactory:
    data = _data_module()
    load = getattr(data, "load", None)
    if load is None:
        raise ValueError(
            f"cnn.data.load is not available to load config.dataset={config.dataset!r}; pass "
            "fit(..., datasets=factory) with factory(split, batch_size=..., ...) -> BatchIterator"
        )

    def factory(split: str, **kwargs: Any):
        if config.data_dir:
            kwargs["data_dir"] = config.data_dir
        return load(config.dataset, split, **kwargs)

    return factory


def _write_config(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")


def fit(
    config: ml_collections.ConfigDict | Mapping[str, Any],
    workdir: str | os.PathLike,
    *,
    datasets: DatasetFactory | None = None,
    augment_fn: steps_lib.AugmentFn | None = None,
    callbacks: Sequence[Callback] = (),
) -> FitResult:
    """Trains `config.model` on `config.dataset`, writing a run directory; resumes if possible.

    Args:
      config: an experiment config (missing fields take `default_config()` values).
      workdir: the run directory (created). If it holds checkpoints, training resumes from the
        latest one and continues exactly as the interrupted run would have.
      datasets: `factory(split, *, batch_size, shuffle, seed, drop_remainder, num_epochs,
        shard_index, num_shards) -> BatchIterator`; default `cnn.data.load(config.dataset, ...)`.
      augment_fn: on-device augmentation `(key, images) -> images` inside the train step
        (overrides `config.augment`).
      callbacks: `callback(step, device_state)` after every step is dispatched (keep them cheap;
        they see the state in the run's device layout).

    Returns:
      A `FitResult`.

    Raises:
      ValueError / FileNotFoundError: invalid config (before any compilation).
      NonFiniteLossError: the loss became NaN/Inf; names the step and the last good checkpoint.
    """
    parallel_lib.maybe_initialize_distributed()
    config = resolve_config(config)
    data_parallel = parallel_lib.DataParallel.create(config.parallelism)
    validate_config(config, data_parallel)
    if config.deterministic and parallel_lib.gpu_determinism_missing():
        warnings.warn(
            "config.deterministic=True but the GPU backend started without "
            f"XLA_FLAGS={parallel_lib.DETERMINISTIC_GPU_FLAG}: runs (and resumes) will not be bit-identical. "
            "Set it in the environment (or call cnn.train.parallel.request_deterministic_gpu()) before JAX starts.",
            stacklevel=2,
        )
    workdir = pathlib.Path(workdir).absolute()
    primary = parallel_lib.is_primary()
    if primary:
        workdir.mkdir(parents=True, exist_ok=True)
        _write_config(config, workdir)

    # Data: every process reads its slice of each global batch.
    datasets = datasets or _default_datasets(config)
    seed = int(config.seed)
    data_seed = seed if int(config.data_seed) < 0 else int(config.data_seed)
    train_iter = datasets(
        config.train_split,
        batch_size=int(config.batch_size),
        shuffle=True,
        seed=data_seed,
        drop_remainder=True,
        num_epochs=None,
        shard_index=jax.process_index(),
        num_shards=jax.process_count(),
    )
    eval_batch_size = int(config.eval_batch_size) or int(config.batch_size)

    def eval_batches():
        return datasets(
            config.eval_split,
            batch_size=eval_batch_size,
            shuffle=False,
            seed=0,
            drop_remainder=False,
            num_epochs=1,
            shard_index=0,
            num_shards=1,
        )

    steps_per_epoch = int(train_iter.steps_per_epoch)
    total_steps = int(config.num_train_steps) or max(1, int(math.ceil(float(config.num_epochs) * steps_per_epoch)))
    eval_every = int(config.eval_every_steps) or steps_per_epoch
    checkpoint_every = int(config.checkpoint.every_steps)
    checkpoint_every = eval_every if checkpoint_every < 0 else checkpoint_every
    log_every = int(config.log_every_steps)

    # Model, optimizer, state (host), then the checkpoint if there is one.
    position = train_iter.get_state()
    example = next(train_iter)
    train_iter.set_state(position)
    input_shape = (1,) + tuple(np.shape(example["image"])[1:])
    check_model(config, data_parallel, input_shape)
    model = _create_model(config, data_parallel.model_options())
    tx, learning_rate_fn, train_step, eval_step = _compiled_steps(
        config, model, data_parallel, augment_fn, steps_per_epoch=steps_per_epoch, total_steps=total_steps
    )
    host_state = to_host(create_train_state(model, tx, rng=seed, input_shape=input_shape))

    checkpointer = Checkpointer(
        workdir / "checkpoints",
        max_to_keep=int(config.checkpoint.max_to_keep),
        best_metric=config.checkpoint.best_metric or None,
        best_mode=config.checkpoint.best_mode,
        keep_best=int(config.checkpoint.keep_best),
        async_save=bool(config.checkpoint.async_save),
    )
    loop_state: dict[str, Any] = {}
    resume_step = checkpointer.latest_step()
    if resume_step is not None:
        host_state, data_state, loop_state = checkpointer.restore(host_state, resume_step)
        train_iter.set_state(data_state)
    start_step = int(host_state.step)
    logger = RunLogger(workdir, enabled=primary, resume_step=resume_step if resume_step is not None else -1)

    state = data_parallel.put_state(host_state)
    window = _Window(loop_state.get("window"))
    final_eval: dict[str, float] | None = None
    progress = tqdm(
        total=total_steps,
        initial=start_step,
        desc=f"train {config.model}",
        unit="step",
        disable=not (primary and config.progress),
        dynamic_ncols=True,
    )

    def stop_non_finite(step: int, value: float, what: str, learning_rate: float | None = None) -> None:
        """Raises NonFiniteLossError; `what` describes the non-finite quantity at `step`."""
        checkpointer.wait()
        good = checkpointer.latest_step()
        where = (
            f"last good checkpoint: {checkpointer.step_directory(good)} (step {good})"
            if good is not None
            else "no checkpoint was saved before it"
        )
        progress.close()
        logger.close()
        raise NonFiniteLossError(
            f"training stopped at step {step}: {what} is {value}; {where}. "
            + (f"The learning rate at that step was {learning_rate:g}. " if learning_rate is not None else "")
            + "Lower config.optimizer.learning_rate (or its schedule) or set config.optimizer.grad_clip_norm, "
            "then resume from that checkpoint or restart.",
            step=step,
            value=value,
            last_checkpoint=checkpointer.step_directory(good) if good is not None else None,
        )

    pending: tuple[int, Any] | None = None

    def consume_pending() -> None:
        nonlocal pending
        if pending is None:
            return
        step, device_metrics = pending
        pending = None
        metrics = data_parallel.get_metrics(device_metrics)
        for key, what in (("loss", "the training loss"), ("grad_norm", "the gradient norm")):
            if not math.isfinite(metrics[key]):
                stop_non_finite(step, metrics[key], what, metrics.get("learning_rate"))
        window.add(metrics)

    def run_eval(step: int) -> dict[str, float]:
        result = evaluate(state, eval_batches(), data_parallel=data_parallel, eval_step=eval_step)
        logger.write(step, {"eval/loss": result["loss"], "eval/accuracy": result["accuracy"]})
        return result

    def save(step: int, eval_metrics: Mapping[str, float] | None) -> None:
        host = data_parallel.get_state(state)
        if not tree_is_finite(host.params):
            stop_non_finite(step, float("nan"), "a parameter updated by this step")
        metrics = None if eval_metrics is None else {f"eval/{k}": v for k, v in eval_metrics.items()}
        checkpointer.save(
            step,
            host,
            data_state=train_iter.get_state(),
            loop_state={"window": window.to_json()},
            metrics=metrics,
        )

    try:
        for step in range(start_step + 1, total_steps + 1):
            batch = next(train_iter)
            state, device_metrics = train_step(state, data_parallel.put_batch(batch))
            consume_pending()  # the previous step's metrics, while this step runs
            pending = (step, device_metrics)
            for callback in callbacks:
                callback(step, state)
            progress.update(1)
            last = step == total_steps
            if step % log_every == 0 or last:
                consume_pending()
                summary = window.summary(int(config.batch_size))
                logger.write(step, summary)
                progress.set_postfix(
                    loss=f"{summary['train/loss']:.4f}",
                    acc=f"{summary['train/accuracy']:.3f}",
                    ex_per_s=f"{summary['train/examples_per_sec']:.0f}",
                )
                window.reset()
            eval_metrics = None
            if step % eval_every == 0 or last:
                consume_pending()
                eval_metrics = run_eval(step)
                if last:
                    final_eval = eval_metrics
            if (checkpoint_every and step % checkpoint_every == 0) or last:
                consume_pending()
                save(step, eval_metrics)
        consume_pending()
        if final_eval is None:  # nothing left to train (a finished run resumed): evaluate anyway
            final_eval = evaluate(state, eval_batches(), data_parallel=data_parallel, eval_step=eval_step)
        checkpointer.wait()
        best_step = checkpointer.best_step()
        final_host_state = data_parallel.get_state(state)
    finally:
        progress.close()
        checkpointer.close()
        logger.close()

    if primary:
        if config.plot:
            plot_learning_curves(logger.records, workdir / "plots" / "learning_curve.png")
        results = {"steps": total_steps, "final_eval": final_eval, "best_step": best_step}
        (workdir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return FitResult(
        state=final_host_state,
        train_history=logger.history("train"),
        eval_history=logger.history("eval"),
        final_eval=final_eval,
        workdir=workdir,
        steps=total_steps,
        best_step=best_step,
    )


__all__ = [
    "DTYPES",
    "FitResult",
    "NonFiniteLossError",
    "RunLogger",
    "check_model",
    "default_config",
    "evaluate",
    "fit",
    "plot_learning_curves",
    "resolve_config",
    "validate_config",
]
