"""Orbax checkpoints of a run: the train state, the input position and the loop's own state.

    checkpointer = Checkpointer(workdir / "checkpoints", max_to_keep=3, best_metric="eval/accuracy")
    checkpointer.save(step, host_state, data_state=iterator.get_state(), loop_state={...},
                      metrics={"eval/accuracy": 0.93})
    host_state, data_state, loop_state = checkpointer.restore(template_state)   # latest step

A checkpoint `checkpoints/<step>/` holds three Orbax items:
  state  the `TrainState` arrays (params, batch_stats, opt_state, step, rng) as host numpy arrays,
         i.e. one unreplicated copy, so a checkpoint written by an 8-device pmap run restores onto
         one device (or a mesh of any size) and vice versa;
  data   `BatchIterator.get_state()` (epoch, step within the epoch, seed) as JSON;
  loop   the loop's host-side state (e.g. partial metric sums of the current logging window) as
         JSON, so a resumed run logs exactly what an uninterrupted one would.
Writes are atomic (Orbax writes into a temporary directory and renames it when complete; stale
temporary directories of a killed run are removed on start). Retention: the last `max_to_keep`
checkpoints, plus the `keep_best` best by `best_metric` among checkpoints saved with that metric.
"""

from __future__ import annotations

import math
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from cnn.ode.norm import is_evaluation_name
from cnn.train.state import TrainState, state_to_tree, tree_to_state

ITEMS = ("state", "data", "loop")


def tree_is_finite(tree: Any) -> bool:
    """True when every floating-point leaf of a (host) pytree is finite."""
    for leaf in jax.tree_util.tree_leaves(tree):
        leaf = np.asarray(leaf)
        if np.issubdtype(leaf.dtype, np.floating) and not np.all(np.isfinite(leaf)):
            return False
    return True


class Checkpointer:
    """A thin layer over `orbax.checkpoint.CheckpointManager` for `TrainState` + positions.

    Args:
      directory: where step directories are written (created if absent; must be shared by all
        processes of a multi-host run).
      max_to_keep: keep this many most recent checkpoints (>= 1).
      best_metric: name of a metric passed to `save(metrics=...)` to rank checkpoints by, or
        None; `keep_best` best ones are kept in addition to the most recent ones.
      best_mode: "max" (e.g. accuracy) or "min" (e.g. loss).
      async_save: write in a background thread (the state is copied to the host first).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        max_to_keep: int = 3,
        best_metric: str | None = None,
        best_mode: str = "max",
        keep_best: int = 1,
        async_save: bool = True,
    ):
        if max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}")
        if best_mode not in ("max", "min"):
            raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
        self.directory = pathlib.Path(directory).absolute()
        self.best_metric = best_metric or None
        policies: list[Any] = [ocp.checkpoint_managers.LatestN(n=max_to_keep)]
        best_fn = None
        if self.best_metric:
            metric = self.best_metric

            worst = -math.inf if best_mode == "max" else math.inf

            def best_fn(metrics: Mapping[str, float]) -> float:
                # Checkpoints saved without the metric rank last (LatestN keeps recent ones).
                return float(metrics.get(metric, worst))

            policies.append(
                ocp.checkpoint_managers.BestN(
                    get_metric_fn=best_fn,
                    reverse=best_mode == "min",
                    n=keep_best,
                    keep_checkpoints_without_metrics=False,
                )
            )
        options = ocp.CheckpointManagerOptions(
            best_fn=best_fn,
            best_mode=best_mode,
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def save(
        self,
        step: int,
        host_state: TrainState,
        *,
        data_state: Mapping[str, Any] | None = None,
        loop_state: Mapping[str, Any] | None = None,
        metrics: Mapping[str, float] | None = None,
    ) -> bool:
        """Writes checkpoint `step` (every process must call this in a multi-host run).

        Args:
          host_state: the state as host arrays (`DataParallel.get_state`).
          data_state: the input iterator's position after the batches of steps `<= step`.
          loop_state: JSON-serializable loop bookkeeping.
          metrics: metrics of this step (needed for `best_metric` ranking).
        Returns:
          True if a checkpoint was written (False if `step` already exists).
        """
        if step in self._manager.all_steps():
            return False
        if self.best_metric:
            # Always pass a dict (possibly without the metric): Orbax warns on every save
            # without metrics when it tracks a best checkpoint.
            metrics = {k: v for k, v in (metrics or {}).items()}
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state_to_tree(host_state)),
            data=ocp.args.JsonSave(dict(data_state or {})),
            loop=ocp.args.JsonSave(dict(loop_state or {})),
        )
        clean_metrics = None if metrics is None else {k: float(v) for k, v in metrics.items()}
        return bool(self._manager.save(int(step), args=args, metrics=clean_metrics, force=True))

    def restore(
        self, template: TrainState, step: int | None = None
    ) -> tuple[TrainState, dict[str, Any], dict[str, Any]]:
        """Reads checkpoint `step` (default: the latest) into the structure of `template`.

        Args:
          template: a host `TrainState` with the right structure (e.g. a freshly created one);
            its static fields (`apply_fn`, `tx`) are kept.
        Returns:
          `(host_state, data_state, loop_state)`.
        Raises:
          FileNotFoundError: there is no checkpoint (or no checkpoint `step`) in the directory.
        """
        steps = self.all_steps()
        if step is None:
            step = self.latest_step()
        if step is None or step not in steps:
            raise FileNotFoundError(
                f"no checkpoint step={step} in {self.directory}; available steps: {steps or 'none'}"
            )
        template_tree = jax.tree_util.tree_map(np.asarray, state_to_tree(template))
        try:
            restored = self._manager.restore(
                int(step),
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(template_tree),
                    data=ocp.args.JsonRestore(),
                    loop=ocp.args.JsonRestore(),
                ),
            )
        except ValueError as error:
            if _has_per_evaluation_stats(template_tree):
                raise ValueError(
                    f"checkpoint step {step} in {self.directory} does not fit the model's variables (Orbax: "
                    f"{str(error)[:300]}...). The model keeps BatchNorm statistics per F evaluation "
                    "(`eval{k}`, cnn.ode.norm); a checkpoint written before that feature has none: build "
                    "the model with per_evaluation_stats=False (config.model_options) to restore it"
                ) from error
            raise
        state = tree_to_state(template, jax.tree_util.tree_map(np.asarray, restored.state))
        return state, dict(restored.data or {}), dict(restored.loop or {})

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        """The best step by `best_metric` (the latest when no metric is tracked)."""
        return self._manager.best_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def step_directory(self, step: int) -> pathlib.Path:
        return self.directory / str(step)

    def wait(self) -> None:
        """Blocks until an asynchronous save has been committed to disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def _has_per_evaluation_stats(tree: Any) -> bool:
    """Whether a state tree holds per-evaluation BatchNorm statistics (`.../eval{k}/mean`)."""
    paths = jax.tree_util.tree_flatten_with_path(tree)[0]
    return any(is_evaluation_name(getattr(key, "key", None)) for path, _ in paths for key in path)


def restore_state(directory: str | os.PathLike, template: TrainState, step: int | None = None) -> TrainState:
    """The host `TrainState` of checkpoint `step` (default latest) in a run's `checkpoints/`."""
    checkpointer = Checkpointer(directory, async_save=False)
    try:
        return checkpointer.restore(template, step)[0]
    finally:
        checkpointer.close()


__all__ = ["Checkpointer", "restore_state", "tree_is_finite"]
