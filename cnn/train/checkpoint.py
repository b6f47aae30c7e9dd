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

Failures say what and where, at once:
  - saving: the folder is checked to be writable when the `Checkpointer` is made and before every
    save (`cnn.train.rundir.ensure_writable`), and Orbax creates the step folder before `save`
    returns, so a folder that cannot be written raises `FileSystemError` naming the path and the
    OS error within seconds (instead of an Orbax `TimeoutError` minutes later);
  - restoring the latest checkpoint (`restore(template)`): a step that cannot be read (a truncated
    or missing file) is skipped with a warning naming the step and its folder, which is moved
    aside to `checkpoints/broken-<step>` so that the run can write that step again; the newest
    intact step is restored. If none is intact, `CheckpointError` names every step folder, what
    failed, and the fix. A checkpoint that does not fit the model (other layers or shapes: another
    config) raises `ConfigError` instead: every step of the run would fail the same way.

Older layouts: a checkpoint written before a stage's first block stopped having a scheme knob
(LM-ResNet's `k_t`: the first block takes an Euler step and never used it) holds one more knob
value per stage, or a `knobs` subtree the model no longer has; it is restored through
`cnn.ode.stage.fit_knob_layout` (the unused block-0 values dropped, in the parameters and in
the optimizer state alike), with a warning.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from cnn.ode.norm import is_evaluation_name
from cnn.ode.stage import fit_knob_layout
from cnn.train.errors import CheckpointError, ConfigError, FileSystemError
from cnn.train.rundir import ensure_writable
from cnn.train.state import TrainState, state_to_tree, tree_to_state

ITEMS = ("state", "data", "loop")
BROKEN_PREFIX = "broken-"  # broken step folders are renamed to broken-<step>[-<n>] (not a step name)


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
      writable: check at once that `directory` can be written (False for read-only use, e.g.
        `restore_state` on someone else's run: nothing is created or moved).

    Raises:
      FileSystemError: `writable` and the directory cannot be created or written.
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
        writable: bool = True,
    ):
        if max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}")
        if best_mode not in ("max", "min"):
            raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
        self.directory = pathlib.Path(directory).absolute()
        self.best_metric = best_metric or None
        self.writable = writable
        self._last_save_step = -1
        if writable:
            ensure_writable(self.directory)
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
            # The step folder is made before save() returns: an unwritable folder raises there,
            # not in a background thread that other threads then wait minutes for.
            async_options=ocp.AsyncOptions(create_directories_asynchronously=False),
            cleanup_tmp_directories=writable,
            create=writable,
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
        Raises:
          FileSystemError: the checkpoint folder cannot be written (names the path and the OS
            error); raised before anything is written.
        """
        if step in self._manager.all_steps():
            return False
        ensure_writable(self.directory)
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
        self._last_save_step = int(step)
        try:
            return bool(self._manager.save(int(step), args=args, metrics=clean_metrics, force=True))
        except OSError as error:
            raise self._save_error(step, error) from error

    def _save_error(self, step: int, error: OSError) -> FileSystemError:
        path = getattr(error, "filename", None) or self.step_directory(step)
        return FileSystemError(
            f"cannot write checkpoint step {step} to {path}: {error.strerror or error} ({type(error).__name__}). "
            f"Make {self.directory} a writable folder with free space, or choose another --workdir",
            path=path,
            cause=error,
        )

    def restore(
        self, template: TrainState, step: int | None = None
    ) -> tuple[TrainState, dict[str, Any], dict[str, Any]]:
        """Reads checkpoint `step`, or the newest intact one, into the structure of `template`.

        Args:
          template: a host `TrainState` with the right structure (e.g. a freshly created one);
            its static fields (`apply_fn`, `tx`) are kept.
          step: a step to read (no fallback), or None: the latest step, falling back to older
            ones when it cannot be read (with a warning naming the broken step and its folder,
            which is moved aside to `broken-<step>` unless the checkpointer is read-only).
        Returns:
          `(host_state, data_state, loop_state)`; `host_state.step` says which step was restored.
        Raises:
          FileNotFoundError: there is no checkpoint (or no checkpoint `step`) in the directory.
          ConfigError: the checkpoint does not fit `template` (other layers or shapes).
          CheckpointError: no step can be read (or the requested one cannot); names each step
            folder, what failed and the fix.
        """
        steps = self.all_steps()
        if step is not None:
            if step not in steps:
                raise FileNotFoundError(
                    f"no checkpoint step={step} in {self.directory}; available steps: {steps or 'none'}"
                )
            try:
                return self._restore_step(template, step)
            except ConfigError:
                raise
            except Exception as error:  # Orbax, tensorstore and json raise many types on damaged files
                raise self._unreadable_error([(step, error)]) from error
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.directory}; available steps: none")
        failures: list[tuple[int, Exception]] = []
        for candidate in reversed(steps):
            try:
                restored = self._restore_step(template, candidate)
            except ConfigError:
                raise  # the model does not fit: every step of this run would fail the same way
            except Exception as error:  # noqa: BLE001 - a broken step, whatever raised
                failures.append((candidate, error))
                continue
            if failures:
                self._set_aside(failures, restored_step=candidate)
            return restored
        raise self._unreadable_error(failures) from failures[0][1]

    def _restore_step(self, template: TrainState, step: int) -> tuple[TrainState, dict[str, Any], dict[str, Any]]:
        template_tree = jax.tree_util.tree_map(np.asarray, state_to_tree(template))
        try:
            restored = self._manager.restore(int(step), args=self._restore_args(template_tree))
        except ValueError as error:
            if "tree structures do not match" not in str(error):
                raise
            detail = " ".join(str(error).split())
            detail, cause = (detail if len(detail) <= 300 else detail[:300] + "..."), error
        else:
            tree = jax.tree_util.tree_map(np.asarray, restored.state)
            misfits = _shape_mismatches(template_tree, tree)
            if not misfits:
                return tree_to_state(template, tree), dict(restored.data or {}), dict(restored.loop or {})
            detail, cause = "; ".join(misfits), None
        # Another structure or shapes: the older knob layout is the one misfit that still restores.
        older = self._restore_older_knob_layout(step, template_tree)
        if older is None:
            raise ConfigError(self._misfit_message(step, detail, template_tree)) from cause
        tree, data, loop = older
        return tree_to_state(template, tree), data, loop

    @staticmethod
    def _restore_args(template_tree: Any = None) -> Any:
        state = ocp.args.StandardRestore(template_tree) if template_tree is not None else ocp.args.StandardRestore()
        return ocp.args.Composite(state=state, data=ocp.args.JsonRestore(), loop=ocp.args.JsonRestore())

    def _restore_older_knob_layout(
        self, step: int, template_tree: Any
    ) -> tuple[Any, dict[str, Any], dict[str, Any]] | None:
        """Step `step` read as saved and fitted to the template by `fit_knob_layout` (the older
        layout with a knob for every block), or None when it does not fit that way either."""
        if not (_has_key(template_tree, "knobs") or _has_key(self._stored_tree(step), "knobs")):
            return None
        restored = self._manager.restore(int(step), args=self._restore_args())
        stored = jax.tree_util.tree_map(np.asarray, restored.state)
        try:
            tree = fit_knob_layout(stored, template_tree)
        except (ValueError, KeyError, TypeError):
            return None
        if _shape_mismatches(template_tree, tree):
            return None
        warnings.warn(
            f"checkpoint step {step} in {self.directory} has the older scheme-knob layout (a knob for every block, "
            "block 0's unused): restored through cnn.ode.stage.fit_knob_layout, which drops the unused values",
            stacklevel=4,
        )
        return tree, dict(restored.data or {}), dict(restored.loop or {})

    def _stored_tree(self, step: int) -> Any:
        """The saved state's tree of array metadata (structure and shapes, no data); None when
        it cannot be read (the restore that follows then names the problem)."""
        try:
            metadata = self._manager.item_metadata(int(step))["state"]
        except Exception:  # noqa: BLE001 - Orbax raises many types on damaged metadata
            return None
        return getattr(metadata, "tree", metadata)

    def _misfit_message(self, step: int, detail: str, template_tree: Any) -> str:
        message = (
            f"checkpoint step {step} in {self.directory} does not fit the model's variables ({detail}): it was "
            "written by another model config. Use the config that made this run (its config.json), or a new "
            "--workdir"
        )
        if _has_per_evaluation_stats(template_tree):
            message += (
                ". The model keeps BatchNorm statistics per F evaluation (`eval{k}`, cnn.ode.norm); a checkpoint "
                "written before that feature has none: build the model with per_evaluation_stats=False "
                "(config.model_options) to restore it"
            )
        return message

    def _set_aside(self, failures: list[tuple[int, Exception]], *, restored_step: int) -> None:
        """Warns about each broken step and (process 0, writable) moves its folder aside."""
        for step, error in failures:
            folder = self.step_directory(step)
            moved = None
            if self.writable and jax.process_index() == 0:
                moved = self._free_name(step)
                try:
                    folder.rename(moved)
                except OSError:
                    moved = None
            warnings.warn(
                f"checkpoint step {step} at {folder} cannot be restored ({_describe(error, folder)}); "
                + (f"moved it to {moved} and " if moved else "")
                + f"restored step {restored_step} instead: training continues from there",
                stacklevel=3,
            )
        if self.writable:
            if jax.process_count() > 1:  # every process saw the same broken steps; wait for the moves
                from jax.experimental import multihost_utils

                multihost_utils.sync_global_devices("cnn.train.checkpoint: broken steps set aside")
            self._manager.reload()

    def _free_name(self, step: int) -> pathlib.Path:
        candidate, number = self.directory / f"{BROKEN_PREFIX}{step}", 1
        while candidate.exists():
            number += 1
            candidate = self.directory / f"{BROKEN_PREFIX}{step}-{number}"
        return candidate

    def _unreadable_error(self, failures: list[tuple[int, Exception]]) -> CheckpointError:
        lines = [f"no checkpoint in {self.directory} can be restored:"]
        lines += [f"  step {step}: {self.step_directory(step)}: {_describe(error, self.step_directory(step))}"
                  for step, error in failures]
        lines.append(
            f"Fix: restore these folders from a backup, or delete {self.directory} to train from step 0 "
            "(the run's metrics.jsonl is then rewritten)."
        )
        return CheckpointError("\n".join(lines))

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
        """Blocks until an asynchronous save has been committed to disk.

        Raises:
          FileSystemError: the background write failed with an OS error (names the path).
        """
        try:
            self._manager.wait_until_finished()
        except OSError as error:
            raise self._save_error(self._last_save_step, error) from error

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._manager.close()


def _has_per_evaluation_stats(tree: Any) -> bool:
    """Whether a state tree holds per-evaluation BatchNorm statistics (`.../eval{k}/mean`)."""
    paths = jax.tree_util.tree_flatten_with_path(tree)[0]
    return any(is_evaluation_name(getattr(key, "key", None)) for path, _ in paths for key in path)


def _has_key(tree: Any, name: str) -> bool:
    """Whether a nested mapping has a key `name` at any depth."""
    if not isinstance(tree, Mapping):
        return False
    return any(key == name or _has_key(value, name) for key, value in tree.items())


def _shape_mismatches(template_tree: Any, restored_tree: Any, limit: int = 3) -> list[str]:
    """`"params.Conv_0.kernel: checkpoint float32[...], model float32[...]"` for leaves whose shape
    or dtype differ, parameters first (at most `limit`)."""
    expected = dict(jax.tree_util.tree_flatten_with_path(template_tree)[0])
    found = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(restored_tree)[0]:
        want = expected.get(path)
        if want is None:
            continue
        want, leaf = np.asarray(want), np.asarray(leaf)
        if want.shape != leaf.shape or want.dtype != leaf.dtype:
            name = ".".join(str(getattr(key, "key", getattr(key, "idx", key))) for key in path)
            found.append(f"{name}: checkpoint {leaf.dtype}{list(leaf.shape)}, model {want.dtype}{list(want.shape)}")
    return sorted(found, key=lambda line: (not line.startswith("params."), line))[:limit]


def _describe(error: Exception, folder: pathlib.Path) -> str:
    """The error in one line, plus the files of `folder` that are empty or not valid JSON (Orbax's
    JSON errors do not name the file)."""
    text = " ".join(str(error).split())
    text = f"{type(error).__name__}: {text[:300]}{'...' if len(text) > 300 else ''}"
    suspects = []
    if folder.is_dir():
        for path in sorted(folder.rglob("*")):
            if not path.is_file():
                continue
            if path.stat().st_size == 0:
                suspects.append(f"{path.relative_to(folder)} is empty")
            elif path.name in ("metadata", "_METADATA", "_CHECKPOINT_METADATA"):
                try:
                    json.loads(path.read_bytes())
                except (ValueError, UnicodeDecodeError):
                    suspects.append(f"{path.relative_to(folder)} is not valid JSON (truncated?)")
    else:
        suspects.append("the folder is missing")
    return text + (f" [{'; '.join(suspects)}]" if suspects else "")


def restore_state(directory: str | os.PathLike, template: TrainState, step: int | None = None) -> TrainState:
    """The host `TrainState` of checkpoint `step` (default: the newest intact one) in a run's
    `checkpoints/`; reads only (creates, cleans and moves nothing)."""
    checkpointer = Checkpointer(directory, async_save=False, writable=False)
    try:
        return checkpointer.restore(template, step)[0]
    finally:
        checkpointer.close()


__all__ = ["BROKEN_PREFIX", "Checkpointer", "restore_state", "tree_is_finite"]
