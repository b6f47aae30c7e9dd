"""The training loop of every task: `fit(config, workdir, task=...)` and `evaluate(...)`.

    result = fit(config, "runs/digits")                           # classification
    result = fit(config, "runs/unet", task=segmentation_task)     # any cnn.train.task.Task
    result.final_eval, result.state.params

A run directory holds:
    config.json        the resolved config (with the task's name and options in `task_options`)
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
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from cnn.train import ensemble as ensemble_lib, optim, parallel as parallel_lib, rundir, steps as steps_lib
from cnn.train.checkpoint import Checkpointer, tree_is_finite
from cnn.train.errors import DataError
from cnn.train.config import (
    DTYPES,
    augment_fn_from_config,
    create_model,
    default_config,
    resolve_config,
    validate_config,
)
from cnn.train.run_log import MetricWindow, RunLogger, plot_learning_curves
from cnn.train.state import TrainState, create_train_state, to_host
from cnn.train.task import CLASSIFICATION, PADDING_KEY, Task, classification

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


@dataclasses.dataclass
class FitResult:
    """What `fit` returns.

    Attributes:
      state: the final `TrainState` as host (numpy) arrays, one copy.
      train_history: logged training records `{"step", "train/loss", ...}`.
      eval_history: evaluation records `{"step", "eval/<metric>", ...}`.
      final_eval: the task's summary of the evaluation at the last step, e.g. `{"loss",
        "accuracy", "count"}` for classification.
      workdir: the run directory.
      steps: the number of optimizer steps of the run.
      best_step: the checkpoint step that is best by `checkpoint.best_metric` (or the latest).
      seconds: wall time of this `fit` call (compilation included).
      num_params: the model's parameter count.
    """

    state: TrainState
    train_history: list[dict[str, Any]]
    eval_history: list[dict[str, Any]]
    final_eval: dict[str, float] | None
    workdir: pathlib.Path
    steps: int
    best_step: int | None
    seconds: float = float("nan")
    num_params: int = 0


# ------------------------------------------------------------------------------------------------
# Evaluation


def _pad_batch(batch: Mapping[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """Pads a (final, short) batch to `size` rows and adds `PADDING_KEY` (1 real, 0 padding)."""
    rows = len(next(iter(batch.values())))
    padded = {}
    for key, value in batch.items():
        value = np.asarray(value)
        pad = np.zeros((size - rows,) + value.shape[1:], value.dtype)
        padded[key] = np.concatenate([value, pad]) if rows < size else value
    padded[PADDING_KEY] = (np.arange(size) < rows).astype(np.float32)
    return padded


def evaluate(
    state: TrainState,
    batches: Iterable[Mapping[str, np.ndarray]],
    *,
    task: Task = CLASSIFICATION,
    data_parallel: Any = None,
    eval_step: Callable | None = None,
) -> dict[str, Any]:
    """The task's summary (`task.summarize`) of `state` over all examples of `batches`.

    Args:
      state: a `TrainState` in `data_parallel`'s layout (host arrays are fine for "single").
      batches: global batches with the task's `batch_keys`; the first batch's size is the padded
        size of every batch (short final batches are padded and marked by `PADDING_KEY`).
      task: what is evaluated (classification: `{"loss", "accuracy", "count"}`).
      data_parallel: the layout (default "single"); an `ensemble.EnsembleParallel` evaluates
        every member (`members` in the result, with the mean and `std` of each metric).
      eval_step: a compiled `make_eval_step(task)` for that layout (built when None).
    """
    data_parallel = data_parallel or parallel_lib.DataParallel.create("single")
    if eval_step is None:
        eval_step = data_parallel.compile_eval(steps_lib.make_eval_step(task, axis_name=data_parallel.axis_name))
    members = isinstance(data_parallel, ensemble_lib.EnsembleParallel)
    totals: dict[str, Any] = {}
    gathered: dict[str, list[np.ndarray]] = {key: [] for key in task.gather_keys}
    size = None
    processes, process = jax.process_count(), jax.process_index()
    for batch in batches:
        batch = task.select(batch)
        size = size or len(batch[task.input_key])
        if size % data_parallel.num_devices:
            raise ValueError(f"eval batch size {size} is not divisible by {data_parallel.num_devices} devices")
        padded = _pad_batch(batch, size)
        rows = size // processes
        local = {key: value[process * rows : (process + 1) * rows] for key, value in padded.items()}
        placed = data_parallel.put_batch(local, member_axis=False) if members else data_parallel.put_batch(local)
        outputs = data_parallel.get_eval_outputs(eval_step(state, placed), task.gather_keys)
        real = padded[PADDING_KEY] > 0
        for key, value in outputs.items():
            if key in gathered:
                gathered[key].append(value[:, real] if members else value[real])
            else:
                totals[key] = totals.get(key, 0) + value
    if size is None:
        raise ValueError("evaluate: `batches` yielded no batch")
    totals.update({key: np.concatenate(parts, axis=1 if members else 0) for key, parts in gathered.items()})
    if not members:
        return task.summarize(totals)
    summaries = [task.summarize({k: v[i] for k, v in totals.items()}) for i in range(data_parallel.ensemble.size)]
    return summarize_members(summaries)


def summarize_members(summaries: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """An ensemble's evaluation: each numeric metric's mean over members, its `std` (ddof 1) and
    every member's own summary under `members`."""
    numeric = [k for k, v in summaries[0].items() if _is_number(v)]
    values = {k: np.array([float(s[k]) for s in summaries]) for k in numeric}
    result: dict[str, Any] = {k: float(v.mean()) for k, v in values.items()}
    result["std"] = {k: float(v.std(ddof=1)) if len(v) > 1 else 0.0 for k, v in values.items()}
    result["members"] = [dict(s) for s in summaries]
    return result


# ------------------------------------------------------------------------------------------------
# The pieces of a run


@dataclasses.dataclass(frozen=True)
class RunLength:
    """How long a run is and how often it logs, evaluates and checkpoints (in steps)."""

    total_steps: int
    steps_per_epoch: int
    log_every: int
    eval_every: int
    checkpoint_every: int

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, steps_per_epoch: int) -> RunLength:
        total = int(config.num_train_steps) or max(1, int(math.ceil(float(config.num_epochs) * steps_per_epoch)))
        eval_every = int(config.eval_every_steps) or steps_per_epoch
        checkpoint_every = int(config.checkpoint.every_steps)
        return cls(
            total_steps=total,
            steps_per_epoch=steps_per_epoch,
            log_every=int(config.log_every_steps),
            eval_every=eval_every,
            checkpoint_every=eval_every if checkpoint_every < 0 else checkpoint_every,
        )


class RunData:
    """The run's input: a resumable training iterator (this process's rows of each global batch;
    one per member for an ensemble with `data="per_member"`, batches stacked `[M, b, ...]`) and
    fresh evaluation iterators, both reduced to the task's batch keys."""

    def __init__(self, config: ml_collections.ConfigDict, task: Task, datasets: DatasetFactory | None,
                 ensemble: ensemble_lib.Ensemble | None = None):
        self.config, self.task = config, task
        self.datasets = datasets or _default_datasets(config)
        seeds = ensemble.seeds if ensemble is not None else (int(config.seed),)
        if int(config.data_seed) >= 0:
            seeds = (int(config.data_seed),)  # one input order for every member
        elif ensemble is None or ensemble.data == "shared":
            seeds = seeds[:1]
        iterators = [self._train_iterator(seed) for seed in seeds]
        self.train = iterators[0] if len(iterators) == 1 else ensemble_lib.MemberBatches(iterators)
        start = iterators[0].get_state()
        example = task.select(next(iterators[0]))
        iterators[0].set_state(start)
        # What the model sees: the prepared input (e.g. pooled images), for one example.
        one = {key: np.asarray(value)[:1] for key, value in example.items()}
        self.input_shape = tuple(jax.eval_shape(lambda batch: task.model_input(task.prepare(batch)), one).shape)

    def _train_iterator(self, seed: int):
        return self.datasets(
            self.config.train_split,
            batch_size=int(self.config.batch_size),
            shuffle=True,
            seed=seed,
            drop_remainder=True,
            num_epochs=None,
            shard_index=jax.process_index(),
            num_shards=jax.process_count(),
        )

    def next_batch(self) -> dict[str, np.ndarray]:
        return self.task.select(next(self.train))

    def eval_batches(self) -> Iterable[Mapping[str, np.ndarray]]:
        return self.datasets(
            self.config.eval_split,
            batch_size=int(self.config.eval_batch_size) or int(self.config.batch_size),
            shuffle=False,
            seed=0,
            drop_remainder=False,
            num_epochs=1,
            shard_index=0,
            num_shards=1,
        )


def _default_datasets(config: ml_collections.ConfigDict) -> DatasetFactory:
    """`cnn.data.load(config.dataset, split, ...)` (with `config.data_dir` when set)."""
    import functools

    import cnn.data

    extra = {"data_dir": config.data_dir} if config.data_dir else {}
    return functools.partial(_load_split, cnn.data.load, config.dataset, extra)


def _load_split(load: Callable, dataset: str, extra: Mapping[str, Any], split: str, **kwargs: Any):
    return load(dataset, split, **kwargs, **extra)


_STEP_CACHE: dict[Any, tuple[Any, ...]] = {}
_STEP_CACHE_SIZE = 8


def _schedule_length_key(optimizer_config, length: RunLength) -> tuple[int, ...]:
    """What of the run length the learning-rate schedule depends on (nothing for step-based
    constant/piecewise schedules)."""
    uses_epochs = any(optim._is_set(optimizer_config.get(name)) for name in ("warmup_epochs", "decay_epochs"))
    cosine = str(optimizer_config.schedule).lower() == "cosine"
    return (length.steps_per_epoch if uses_epochs else 0, length.total_steps if cosine else 0)


def compiled_steps(config, task: Task, model, data_parallel, augment_fn, length: RunLength):
    """`(tx, learning_rate_fn, train_step, eval_step)` for a run, compiled lazily for its layout.

    Runs that agree on everything the compiled steps depend on (model, task, optimizer config
    and schedule length, augmentation, layout) share one entry, so repeated `fit` calls in a
    process (seeds, resumes) reuse the compilations; the seed and data are not part of it.
    """
    try:
        key = (
            model,
            task,
            json.dumps(config.optimizer.to_dict(), sort_keys=True, default=str),
            _schedule_length_key(config.optimizer, length),
            augment_fn,  # a hook passed to fit (by identity), else config.augment by name:
            "" if augment_fn is not None else config.augment,
            json.dumps(config.augment_options.to_dict(), sort_keys=True, default=str),
            data_parallel.mode,
            data_parallel.use_shard_map,
            getattr(data_parallel, "ensemble", None),
            tuple(device.id for device in jax.devices()),
        )
        hash(key)
    except TypeError:  # unhashable model attributes: build without caching
        key = None
    if key is not None and key in _STEP_CACHE:
        return _STEP_CACHE[key]
    tx, learning_rate_fn = optim.make_optimizer(
        config.optimizer, steps_per_epoch=length.steps_per_epoch, total_steps=length.total_steps
    )
    augment_fn = augment_fn or augment_fn_from_config(config)
    axis = data_parallel.axis_name
    train_step = data_parallel.compile_train(
        steps_lib.make_train_step(task, axis_name=axis, augment_fn=augment_fn, learning_rate_fn=learning_rate_fn)
    )
    eval_step = data_parallel.compile_eval(steps_lib.make_eval_step(task, axis_name=axis))
    entry = (tx, learning_rate_fn, train_step, eval_step)
    if key is not None:
        if len(_STEP_CACHE) >= _STEP_CACHE_SIZE:
            _STEP_CACHE.pop(next(iter(_STEP_CACHE)))
        _STEP_CACHE[key] = entry
    return entry


def overlay_variables(variables: Mapping[str, Any], source: Mapping[str, Any]) -> tuple[dict[str, Any], int, int]:
    """`variables` with every leaf that `source` has at the same path and shape replaced by it.

    Returns:
      `(new variables, leaves copied, leaves in variables)`.
    """
    flat_source = {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(source)}
    copied = 0

    def pick(path, leaf):
        nonlocal copied
        other = flat_source.get(jax.tree_util.keystr(path))
        if other is None or np.shape(other) != np.shape(leaf):
            return leaf
        copied += 1
        return np.asarray(other, np.asarray(leaf).dtype)

    new = jax.tree_util.tree_map_with_path(pick, dict(variables))
    return new, copied, len(jax.tree_util.tree_leaves(variables))


def initial_state(
    model, tx, *, seed: int | Sequence[int], input_shape: Sequence[int], init_variables: Mapping[str, Any] | None
) -> tuple[TrainState, dict[str, int] | None]:
    """The host state at step 0: the model's init from `seed`, with `init_variables` (Flax
    variables, e.g. a pretrained trunk) laid over it where paths and shapes match; the optimizer
    state is initialized from the resulting parameters. A sequence of seeds gives an ensemble's
    state: each member's, stacked on a leading axis.

    Returns:
      `(state, {"copied": n, "total": m})`, the second None without `init_variables`.

    Raises:
      ValueError: `init_variables` shares no leaf with the model.
    """
    if not isinstance(seed, int):  # an ensemble: one state per member seed, stacked
        states = [initial_state(model, tx, seed=s, input_shape=input_shape, init_variables=init_variables)
                  for s in seed]
        return ensemble_lib.stack([state for state, _ in states]), states[0][1]
    state = to_host(create_train_state(model, tx, rng=seed, input_shape=input_shape))
    if init_variables is None:
        return state, None
    variables, copied, total = overlay_variables(state.variables(), init_variables)
    if not copied:
        raise ValueError(
            "init_variables shares no variable (same path and shape) with the model; its top-level "
            f"collections are {sorted(init_variables)}, the model's {sorted(state.variables())}"
        )
    params = variables["params"]
    state = state.replace(
        params=params, batch_stats=variables.get("batch_stats", state.batch_stats), opt_state=to_host(tx.init(params))
    )
    return state, {"copied": copied, "total": total}


# ------------------------------------------------------------------------------------------------
# The mutable side of one run


class Training:
    """One run in progress: the device state, the metric windows, logs, checkpoints, the bar.

    `fit` drives it step by step; each method does one thing of the loop. Training metrics are
    read one step late (`_pending`), so that reading them does not stall the device. An
    ensemble keeps one metric window per member and logs one record per member and step.
    """

    def __init__(self, *, config, task, data_parallel, data: RunData, length: RunLength, state, steps,
                 checkpointer: Checkpointer, logger: RunLogger, loop_state: Mapping[str, Any], primary: bool):
        self.config, self.task, self.data_parallel, self.data, self.length = config, task, data_parallel, data, length
        ensemble = getattr(data_parallel, "ensemble", None)
        self.seeds = ensemble.seeds if ensemble is not None else None
        self.state = data_parallel.put_state(state)
        self.augment_rng = data_parallel.put_augment_rng(state.rng) if ensemble is not None else None
        self.train_step, self.eval_step = steps
        self.checkpointer, self.logger = checkpointer, logger
        saved = loop_state.get("windows") or [loop_state.get("window")]
        self.windows = [MetricWindow(saved[i] if i < len(saved) else None) for i in range(len(self.seeds or (0,)))]
        self._pending: tuple[int, Any] | None = None
        step = _step_of(state)
        self.progress = tqdm(total=length.total_steps, initial=step, desc=f"train {config.model}", unit="step",
                             disable=not (primary and config.progress), dynamic_ncols=True)

    @property
    def members(self) -> list[int | None]:
        """Member indices to log (`[None]` for a single run: records carry no member field)."""
        return [None] if self.seeds is None else list(range(len(self.seeds)))

    def step(self, step: int) -> None:
        """Dispatches training step `step` and reads the previous step's metrics meanwhile."""
        batch = self.data_parallel.put_batch(self.data.next_batch())
        extra = () if self.augment_rng is None else (self.augment_rng,)
        self.state, device_metrics = self.train_step(self.state, batch, *extra)
        self.consume_pending()
        self._pending = (step, device_metrics)
        self.progress.update(1)

    def consume_pending(self) -> None:
        """Adds the last dispatched step's metrics to the windows (the NaN guard looks here)."""
        if self._pending is None:
            return
        step, device_metrics = self._pending
        self._pending = None
        metrics = self.data_parallel.get_metrics(device_metrics)
        for index, window in zip(self.members, self.windows):
            values = {k: float(v if index is None else v[index]) for k, v in metrics.items()}
            for key, what in (("loss", "the training loss"), ("grad_norm", "the gradient norm")):
                if not math.isfinite(values[key]):
                    self.stop_non_finite(step, values[key], what, values.get("learning_rate"), member=index)
            window.add(values)

    def log(self, step: int) -> None:
        self.consume_pending()
        summaries = [window.summary(int(self.config.batch_size)) for window in self.windows]
        for index, summary in zip(self.members, summaries):
            self.logger.write(step, summary, member=index)
        mean = {k: float(np.mean([s[k] for s in summaries])) for k in summaries[0]}
        shown = {"loss": f"{mean['train/loss']:.4f}"}
        if f"train/{self.task.progress_metric}" in mean:
            shown[self.task.progress_metric[:8]] = f"{mean[f'train/{self.task.progress_metric}']:.3f}"
        self.progress.set_postfix(**shown, ex_per_s=f"{mean['train/examples_per_sec'] * len(summaries):.0f}")
        for window in self.windows:
            window.reset()

    def evaluate(self, step: int | None = None) -> dict[str, Any]:
        """The task's summary on the eval split (per member and their mean for an ensemble);
        logged under "eval/" at `step` (if given)."""
        self.consume_pending()
        result = evaluate(self.state, self.data.eval_batches(), task=self.task, data_parallel=self.data_parallel,
                          eval_step=self.eval_step)
        if step is not None:
            for index, summary in zip(self.members, result.get("members", [result])):
                self.logger.write(step, {f"eval/{k}": v for k, v in summary.items() if _is_number(v)}, member=index)
        return result

    def save(self, step: int, eval_metrics: Mapping[str, Any] | None) -> None:
        """Checkpoints the state, the input position and the windows (an ensemble's best
        checkpoint is ranked by the members' mean metric)."""
        self.consume_pending()
        host = self.data_parallel.get_state(self.state)
        if not tree_is_finite(host.params):
            self.stop_non_finite(step, float("nan"), "a parameter updated by this step")
        metrics = None if eval_metrics is None else {f"eval/{k}": v for k, v in eval_metrics.items() if _is_number(v)}
        windows = [window.to_json() for window in self.windows]
        loop_state = {"window": windows[0]} if self.seeds is None else {"windows": windows}
        self.checkpointer.save(step, host, data_state=self.data.train.get_state(), loop_state=loop_state,
                               metrics=metrics)

    def stop_non_finite(self, step: int, value: float, what: str, learning_rate: float | None = None,
                        member: int | None = None) -> None:
        """Raises NonFiniteLossError; `what` describes the non-finite quantity at `step`. An
        ensemble stops as a whole (its members share one program and one checkpoint)."""
        self.checkpointer.wait()
        good = self.checkpointer.latest_step()
        directory = self.checkpointer.step_directory(good) if good is not None else None
        where = f"last good checkpoint: {directory} (step {good})" if good is not None else "no checkpoint was saved before it"
        who = "" if member is None else f" of ensemble member {member} (seed {self.seeds[member]})"
        self.close()
        error = NonFiniteLossError(
            f"training stopped at step {step}: {what}{who} is {value}; {where}. "
            + (f"The learning rate at that step was {learning_rate:g}. " if learning_rate is not None else "")
            + "Lower config.optimizer.learning_rate (or its schedule) or set config.optimizer.grad_clip_norm, "
            "then resume from that checkpoint or restart.",
            step=step, value=value, last_checkpoint=directory,
        )
        error.member = member
        raise error

    def close(self) -> None:
        self.progress.close()
        self.checkpointer.close()
        self.logger.close()


def _step_of(state: TrainState) -> int:
    """The state's step (an ensemble's members all share it: the first member's)."""
    return int(np.asarray(state.step).reshape(-1)[0])


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool)


def task_from_config(config: ml_collections.ConfigDict) -> Task:
    """The default task: classification with `config.loss`'s label smoothing and aux weight and
    `config.input_pool`."""
    return classification(label_smoothing=float(config.loss.label_smoothing), aux_weight=float(config.loss.aux_weight),
                          input_pool=int(config.input_pool))


def _checkpointer(config: ml_collections.ConfigDict, task: Task, workdir: pathlib.Path) -> Checkpointer:
    best = config.checkpoint.best_metric
    best = f"eval/{task.best_metric}" if best == "auto" else best
    mode = task.best_mode if config.checkpoint.best_mode == "auto" else config.checkpoint.best_mode
    return Checkpointer(workdir / "checkpoints", max_to_keep=int(config.checkpoint.max_to_keep),
                        best_metric=best or None, best_mode=mode, keep_best=int(config.checkpoint.keep_best),
                        async_save=bool(config.checkpoint.async_save))


def _claim_workdir(workdir: pathlib.Path, config: ml_collections.ConfigDict, primary: bool):
    """Checks, before anything is compiled, that a config `workdir` already holds is this one
    (`cnn.train.rundir`).

    Returns:
      `(action, stored config or None)`, action one of "fresh", "same", "restart", "extend".

    Raises:
      RunConfigMismatchError: the workdir was made by another config (keys old -> new, fixes).
    """
    action = rundir.check_run_config(workdir, config, on_mismatch=str(config.on_mismatch))
    stored = rundir.read_run_config(workdir) if action == "extend" else None
    return action, stored


def _prepare_workdir(workdir: pathlib.Path, action: str, primary: bool) -> None:
    """Clears the run for on_mismatch="restart" and checks checkpoints/ can be written (after
    the config proved valid, so that a bad config leaves the directory untouched)."""
    if primary and action == "restart":
        rundir.reset_run_directory(workdir)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("cnn.train.fit: run directory prepared")
    rundir.ensure_writable(workdir / "checkpoints")


def _warn_if_gpu_nondeterministic(config: ml_collections.ConfigDict) -> None:
    if config.deterministic and parallel_lib.gpu_determinism_missing():
        warnings.warn(
            "config.deterministic=True but the GPU backend started without "
            f"XLA_FLAGS={parallel_lib.DETERMINISTIC_GPU_FLAG}: runs (and resumes) will not be bit-identical. "
            "Set it in the environment (or call cnn.train.parallel.request_deterministic_gpu()) before JAX starts.",
            stacklevel=3,
        )


# ------------------------------------------------------------------------------------------------
# fit


def fit(
    config: ml_collections.ConfigDict | Mapping[str, Any],
    workdir: str | os.PathLike,
    *,
    task: Task | None = None,
    datasets: DatasetFactory | None = None,
    augment_fn: steps_lib.AugmentFn | None = None,
    init_variables: Mapping[str, Any] | None = None,
    callbacks: Sequence[Callback] = (),
) -> FitResult:
    """Trains `config.model` on `config.dataset` for `task`, writing a run directory; resumes.

    Args:
      config: an experiment config (missing fields take `default_config()` values).
      workdir: the run directory (created). If it holds checkpoints, training resumes from the
        latest one and continues exactly as the interrupted run would have.
      task: what is learned and measured (`cnn.train.task.Task`); default classification with
        `config.loss`'s options.
      datasets: `factory(split, *, batch_size, shuffle, seed, drop_remainder, num_epochs,
        shard_index, num_shards) -> BatchIterator`; default `cnn.data.load(config.dataset, ...)`.
      augment_fn: on-device augmentation `(key, fields, *, offset) -> fields` of the task's
        `augment_keys` (`steps.make_augment_fn(op)`), overriding `config.augment`.
      init_variables: Flax variables to start from instead of the random init where paths and
        shapes match (a pretrained trunk, a trained front end); ignored when resuming.
      callbacks: `callback(step, device_state)` after every step is dispatched (keep them cheap).

    Raises:
      ValueError / FileNotFoundError: invalid config (before any compilation).
      RunConfigMismatchError: `workdir` holds a run of another config (`config.on_mismatch`:
        "restart" trains it again from step 0, "extend" continues a run whose budget grew).
      FileSystemError: `workdir` cannot be written.
      NonFiniteLossError: the loss became NaN/Inf; names the step and the last good checkpoint.
    """
    started = time.perf_counter()
    parallel_lib.maybe_initialize_distributed()
    config = resolve_config(config)
    task = task or task_from_config(config)
    config.task_options = ml_collections.ConfigDict(task.record())
    data_parallel = parallel_lib.DataParallel.create(config.parallelism)
    ensemble = ensemble_lib.Ensemble.from_config(config, data_parallel.num_devices)
    if ensemble is not None:
        data_parallel = ensemble_lib.EnsembleParallel.create(data_parallel, ensemble)
    validate_config(config, data_parallel, check_optimizer=False, check_dataset=datasets is None)
    _warn_if_gpu_nondeterministic(config)
    workdir, primary = pathlib.Path(workdir).absolute(), parallel_lib.is_primary()
    action, stored = _claim_workdir(workdir, config, primary)

    try:
        data = RunData(config, task, datasets, ensemble)
    except (ValueError, OSError) as error:
        raise DataError(f"config.dataset={config.dataset!r}: {error}") from error
    length = RunLength.from_config(config, int(data.train.steps_per_epoch))
    model = create_model(config, task, data_parallel, data.input_shape)
    tx, _, train_step, eval_step = compiled_steps(config, task, model, data_parallel, augment_fn, length)
    _prepare_workdir(workdir, action, primary)
    seeds = int(config.seed) if ensemble is None else ensemble.seeds
    state, overlaid = initial_state(model, tx, seed=seeds, input_shape=data.input_shape, init_variables=init_variables)
    if primary:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")

    checkpointer = _checkpointer(config, task, workdir)
    loop_state: dict[str, Any] = {}
    resume_step = None
    if checkpointer.latest_step() is not None:  # the newest intact checkpoint (broken ones are set aside)
        state, data_state, loop_state = checkpointer.restore(state)
        resume_step = _step_of(state)
        data.train.set_state(data_state)
    logger = RunLogger(workdir, enabled=primary, resume_step=-1 if resume_step is None else resume_step)
    if action == "extend":
        extension = rundir.extension_record(stored, config, from_step=int(resume_step or 0),
                                            total_steps=length.total_steps)
        warnings.warn(extension["note"], stacklevel=2)
        if primary:
            rundir.record_extension(workdir, extension)
    run = Training(config=config, task=task, data_parallel=data_parallel, data=data, length=length, state=state,
                   steps=(train_step, eval_step), checkpointer=checkpointer, logger=logger, loop_state=loop_state,
                   primary=primary)
    final_eval = None
    try:
        for step in range(_step_of(state) + 1, length.total_steps + 1):
            run.step(step)
            for callback in callbacks:
                callback(step, run.state)
            last = step == length.total_steps
            if step % length.log_every == 0 or last:
                run.log(step)
            eval_metrics = run.evaluate(step) if step % length.eval_every == 0 or last else None
            final_eval = eval_metrics if last else final_eval
            if (length.checkpoint_every and step % length.checkpoint_every == 0) or last:
                run.save(step, eval_metrics)
        run.consume_pending()
        final_eval = final_eval or run.evaluate()  # a finished run resumed: evaluate anyway
        checkpointer.wait()
        best_step = checkpointer.best_step()
        final_state = data_parallel.get_state(run.state)
    finally:
        run.close()

    one = final_state if ensemble is None else ensemble_lib.member(final_state, 0)
    num_params = int(sum(np.size(leaf) for leaf in jax.tree_util.tree_leaves(one.params)))
    if primary:
        if config.plot:
            plot_learning_curves(logger.records, workdir / "plots" / "learning_curve.png", metric=task.best_metric)
        results = {"steps": length.total_steps, "final_eval": final_eval, "best_step": best_step,
                   "task": task.record(), "num_params": num_params, "init_variables": overlaid}
        if ensemble is not None:
            results["members"] = member_best_steps(logger.records, ensemble.seeds, task, config)
        results["extensions"] = rundir.read_extensions(workdir)
        (workdir / "results.json").write_text(json.dumps(results, indent=2, default=_json_default) + "\n")
    return FitResult(state=final_state, train_history=logger.history("train"), eval_history=logger.history("eval"),
                     final_eval=final_eval, workdir=workdir, steps=length.total_steps, best_step=best_step,
                     seconds=time.perf_counter() - started, num_params=num_params)


def member_best_steps(records: Sequence[Mapping[str, Any]], seeds: Sequence[int], task: Task,
                      config: ml_collections.ConfigDict) -> list[dict[str, Any]]:
    """Per ensemble member: its seed, and the evaluated step with its best `best_metric` (the
    checkpoint of that step is on disk only if retention kept it; see `config.checkpoint`)."""
    metric = config.checkpoint.best_metric
    metric = f"eval/{task.best_metric}" if metric in ("auto", "") else metric
    mode = task.best_mode if config.checkpoint.best_mode == "auto" else config.checkpoint.best_mode
    rows = []
    for index, seed in enumerate(seeds):
        evals = [(r["step"], r[metric]) for r in records if r.get("member") == index and metric in r]
        best = (max if mode == "max" else min)(evals, key=lambda pair: pair[1]) if evals else (None, None)
        rows.append({"member": index, "seed": int(seed), "best_step": best[0], metric: best[1]})
    return rows


def _json_default(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return str(value)


__all__ = [
    "DTYPES",
    "FitResult",
    "NonFiniteLossError",
    "RunData",
    "RunLength",
    "RunLogger",
    "Training",
    "compiled_steps",
    "default_config",
    "evaluate",
    "fit",
    "initial_state",
    "overlay_variables",
    "plot_learning_curves",
    "resolve_config",
    "task_from_config",
    "validate_config",
]
