"""Runs a grid of training cells with `cnn.train.fit`, resumably, and summarizes them.

A *cell* is one training run: a name, overrides of the base training config (model options,
seed, ...) and where it lives (`<workdir>/cells/<name>/`, a complete `cnn.train` run
directory). A finished cell holds `cell.json` (its summary) and is never retrained; an
interrupted one resumes from its last checkpoint. Any cell can be rerun alone by naming it in
`config.only`.

Used by `experiments/compare_schemes.py` (scheme x depth x seed) and `experiments/ablations.py`
(named variants x seed).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from cnn import models
from cnn.ode import analysis, get_scheme
from cnn.train import loop


@dataclasses.dataclass(frozen=True)
class Cell:
    """One training run of a grid.

    Attributes:
      name: unique, filesystem-safe (e.g. "lm-d20-s0").
      group: what the cell's seeds are averaged over (e.g. "lm-d20").
      overrides: fields of the training config to set (nested dicts merge one level deep).
      labels: values describing the cell in tables and plots (scheme, depth, seed, ...).
    """

    name: str
    group: str
    overrides: Mapping[str, Any]
    labels: Mapping[str, Any]


def cell_config(base: ml_collections.ConfigDict, cell: Cell) -> ml_collections.ConfigDict:
    """The training config of `cell`: `base` with the cell's overrides merged in."""
    config = ml_collections.ConfigDict(base.to_dict())
    for key, value in cell.overrides.items():
        if isinstance(value, Mapping) and key in config and isinstance(config[key], ml_collections.ConfigDict):
            merged = config[key].to_dict()
            merged.update(dict(value))
            config[key] = ml_collections.ConfigDict(merged)
        else:
            config[key] = value
    return config


def _median_step_seconds(history: Sequence[Mapping[str, Any]], batch_size: int) -> float:
    """Median wall time per step over the logged windows, leaving out the first (it compiles)."""
    rates = [record["train/examples_per_sec"] for record in history if "train/examples_per_sec" in record]
    rates = rates[1:] if len(rates) > 1 else rates
    return float(batch_size / np.median(rates)) if rates else float("nan")


def _learned_knobs(params: Mapping[str, Any], scheme_name: str | None) -> dict[str, list[float]]:
    if not scheme_name:
        return {}
    scheme = get_scheme(scheme_name)
    return {knob: analysis.learned_knobs(params, scheme, knob).tolist() for knob in scheme.knob_names}


def _write_json(path: pathlib.Path, payload: Mapping[str, Any]) -> None:
    """Atomic write: a crash never leaves a half-written summary behind."""
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    os.replace(temporary, path)


def run_cell(
    base: ml_collections.ConfigDict,
    cell: Cell,
    workdir: pathlib.Path,
    *,
    datasets: loop.DatasetFactory | None = None,
) -> dict[str, Any]:
    """Trains one cell (or resumes it) and returns its summary; a finished cell is read back.

    The summary holds the cell's labels, parameter count, final test loss/accuracy, final
    training loss, the evaluation curve, median wall time per step, the time from the start of
    `fit` to the first dispatched step (compilation dominates it; near zero when an identical
    model was compiled earlier in the process), and learned scheme knobs (LM's `k_t`).
    """
    cell_dir = workdir / "cells" / cell.name
    done = cell_dir / "cell.json"
    if done.exists():
        return json.loads(done.read_text())
    config = cell_config(base, cell)
    started = time.perf_counter()
    first_step: list[float] = []

    def note_first_step(step: int, state: Any) -> None:
        if not first_step:
            first_step.append(time.perf_counter())

    result = loop.fit(config, cell_dir, datasets=datasets, callbacks=[note_first_step])
    finished = time.perf_counter()
    params = result.state.params
    train_losses = [r["train/loss"] for r in result.train_history if "train/loss" in r]
    scheme_name = dict(config.model_options).get("scheme")
    summary = {
        "name": cell.name,
        "group": cell.group,
        "labels": dict(cell.labels),
        "params": models.count_params(params),
        "test_accuracy": float(result.final_eval["accuracy"]),
        "test_loss": float(result.final_eval["loss"]),
        "train_loss": float(train_losses[-1]) if train_losses else float("nan"),
        "eval_curve": [[int(r["step"]), float(r["eval/accuracy"])] for r in result.eval_history],
        "steps": int(result.steps),
        "seconds_per_step": _median_step_seconds(result.train_history, int(config.batch_size)),
        "seconds_to_first_step": (first_step[0] - started) if first_step else float("nan"),
        "seconds_total": finished - started,
        "knobs": _learned_knobs(params, scheme_name if isinstance(scheme_name, str) else None),
    }
    _write_json(done, summary)
    return summary


def run_grid(
    base: ml_collections.ConfigDict,
    cells: Sequence[Cell],
    workdir: str | os.PathLike,
    *,
    only: Iterable[str] = (),
    datasets: loop.DatasetFactory | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Runs every cell (or those named in `only`), skipping finished ones; returns all summaries
    that exist (finished cells outside `only` included, so tables stay complete).

    Raises:
      ValueError: `only` names a cell that is not in the grid.
    """
    workdir = pathlib.Path(workdir)
    names = [cell.name for cell in cells]
    if len(set(names)) != len(names):
        raise ValueError(f"cell names must be unique, got duplicates in {names}")
    only = list(only)
    unknown = sorted(set(only) - set(names))
    if unknown:
        raise ValueError(f"config.only names unknown cells {unknown}; cells of this grid: {names}")
    todo = [cell for cell in cells if not only or cell.name in only]
    summaries: dict[str, dict[str, Any]] = {}
    bar = tqdm(todo, desc="cells", unit="cell", disable=not progress, dynamic_ncols=True)
    for cell in bar:
        bar.set_postfix_str(cell.name)
        summary = run_cell(base, cell, workdir, datasets=datasets)
        summaries[cell.name] = summary
        bar.set_postfix_str(f"{cell.name}: acc {summary['test_accuracy']:.4f}")
    for summary in finished_summaries(cells, workdir):  # finished cells outside `only`
        summaries.setdefault(summary["name"], summary)
    return [summaries[name] for name in names if name in summaries]


def run_experiment(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    cells: Sequence[Cell],
    base: ml_collections.ConfigDict,
    *,
    datasets: loop.DatasetFactory | None = None,
) -> list[dict[str, Any]]:
    """What an experiment script does before its report: writes config.json into `workdir`, then
    runs the grid (`config.only`, `config.progress`) or, with `config.report_only`, collects the
    finished cells without training.

    Raises:
      ValueError: `config.report_only` is set but no cell has finished.
    """
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
    if config.report_only:
        summaries = finished_summaries(cells, workdir)
        if not summaries:
            raise ValueError(f"config.report_only=True but no finished cells under {workdir / 'cells'}")
        return summaries
    return run_grid(base, cells, workdir, only=config.only, datasets=datasets, progress=bool(config.progress))


def finished_summaries(cells: Sequence[Cell], workdir: str | os.PathLike) -> list[dict[str, Any]]:
    """The summaries of the cells of `cells` that have finished under `workdir`, in grid order."""
    found = []
    for cell in cells:
        done = pathlib.Path(workdir) / "cells" / cell.name / "cell.json"
        if done.exists():
            found.append(json.loads(done.read_text()))
    return found


# ------------------------------------------------------------------------------------------------
# Summaries over seeds


@dataclasses.dataclass(frozen=True)
class GroupStats:
    """A group's cells (its seeds) reduced to mean and spread."""

    group: str
    labels: Mapping[str, Any]
    count: int
    accuracy_mean: float
    accuracy_std: float  # sample standard deviation over seeds (0 for one seed)
    train_loss_mean: float
    params: int
    seconds_per_step: float
    seconds_to_first_step: float  # the largest over seeds: the one that compiled

    @property
    def accuracy_sem(self) -> float:
        """Standard error of the mean accuracy."""
        return self.accuracy_std / math.sqrt(self.count) if self.count > 1 else float("nan")


def group_stats(summaries: Sequence[Mapping[str, Any]], seed_label: str = "seed") -> list[GroupStats]:
    """Reduces cell summaries to one `GroupStats` per group, in first-appearance order."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for summary in summaries:
        groups.setdefault(summary["group"], []).append(summary)
    stats = []
    for group, members in groups.items():
        accuracies = np.array([m["test_accuracy"] for m in members])
        labels = {k: v for k, v in members[0]["labels"].items() if k != seed_label}
        stats.append(
            GroupStats(
                group=group,
                labels=labels,
                count=len(members),
                accuracy_mean=float(accuracies.mean()),
                accuracy_std=float(accuracies.std(ddof=1)) if len(members) > 1 else 0.0,
                train_loss_mean=float(np.mean([m["train_loss"] for m in members])),
                params=int(members[0]["params"]),
                seconds_per_step=float(np.median([m["seconds_per_step"] for m in members])),
                seconds_to_first_step=float(max(m["seconds_to_first_step"] for m in members)),
            )
        )
    return stats


def compare_to_reference(stat: GroupStats, reference: GroupStats, sigmas: float = 2.0) -> tuple[float, float, str]:
    """Difference of mean accuracies (stat - reference), its standard error, and a verdict.

    The verdict is "within noise" unless the difference exceeds `sigmas` standard errors
    (Welch's combination of the two groups' standard errors); with one seed per group there is
    no error estimate and the verdict says so.
    """
    difference = stat.accuracy_mean - reference.accuracy_mean
    if stat.count < 2 or reference.count < 2:
        return difference, float("nan"), "one seed: no noise estimate"
    error = math.sqrt(stat.accuracy_sem**2 + reference.accuracy_sem**2)
    if error == 0.0 or abs(difference) <= sigmas * error:
        return difference, error, "within noise"
    return difference, error, "better" if difference > 0 else "worse"


def chance_note(flagged: int, comparisons: int, sigmas: float) -> str | None:
    """A verdict line putting `flagged` of `comparisons` differences beyond `sigmas` standard
    errors next to how many chance alone gives (`comparisons * P(|Z| > sigmas)` for normal
    errors), or None when fewer than two comparisons or nothing was flagged."""
    if flagged == 0 or comparisons < 2:
        return None
    expected = comparisons * math.erfc(sigmas / math.sqrt(2))
    return (
        f"{flagged} of {comparisons} comparisons {'exceeds' if flagged == 1 else 'exceed'} {sigmas:g} standard "
        f"errors; by chance alone about {expected:.1f} would (normal errors; fewer seeds make it more): treat "
        "a single flag as a hint to rerun with more seeds, not as a finding."
    )


def hardware() -> str:
    """Devices, host, JAX version and the date, for the header of a results file."""
    import datetime
    import platform

    import jax

    device = jax.devices()[0]
    kind = getattr(device, "device_kind", device.platform)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (
        f"{jax.device_count()} x {kind} ({device.platform}), host {platform.machine()}, {cores} CPU cores; "
        f"JAX {jax.__version__}; {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
    )


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def write_csv(path: pathlib.Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    import csv

    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def use_compilation_cache(directory: str | os.PathLike, min_compile_seconds: float = 0.2) -> None:
    """Turns on JAX's persistent compilation cache in `directory` for this process.

    The cells of a grid that differ only in their seed compile the same programs: with the cache
    the second and third seeds of a cell load them (about 0.5 s instead of 4-7 s per cell on a
    2-core CPU, most of a small cell's time). Called by the experiment scripts' command lines,
    before anything is compiled; library functions leave the process-wide setting alone.
    Programs that compile in under `min_compile_seconds` are not stored.
    """
    pathlib.Path(directory).mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_seconds)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def cli_main(
    argv: Sequence[str],
    default_config_path: str,
    run: Callable[..., Any],
    module: str,
    *,
    compilation_cache: bool = True,
    default_workdir: str | None = None,
) -> None:
    """The command line of an experiment script: parse `--config` / `--workdir` (default
    `default_workdir`, else `runs/<config.name>`), turn on the compilation cache in
    `<workdir>/.jax_cache` (with `compilation_cache`: the seeds of a grid after the first reuse
    the programs), run `run(config, workdir, command=...)` and, when it returns the path of a
    report, print the report. absl/Orbax logging is kept to warnings."""
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # Orbax logs every checkpoint operation at INFO
    config, workdir = parse_cli_config(argv, default_config_path, default_workdir)
    if compilation_cache:
        use_compilation_cache(workdir / ".jax_cache")
    result = run(config, workdir, command=" ".join([f"python -m {module}", *argv[1:]]))
    if isinstance(result, pathlib.Path):
        print(result.read_text())
        print(f"wrote {result}")


def parse_cli_config(
    argv: Sequence[str], default_config_path: str, default_workdir: str | None = None
) -> tuple[ml_collections.ConfigDict, pathlib.Path]:
    """`--config=path.py [--config.key=value ...] --workdir=dir` via ml_collections' config flags.

    Raises:
      SystemExit: with a usage message, for arguments that are not flags.
    """
    from absl import flags
    from ml_collections import config_flags

    flag_values = flags.FlagValues()
    # ml_collections finds the `--config.key=value` overrides in sys.argv, not in the argv given.
    saved_argv, sys.argv = sys.argv, list(argv)
    try:
        config_flags.DEFINE_config_file("config", default_config_path, "experiment config file", flag_values=flag_values)
        flags.DEFINE_string("workdir", None, "run directory", flag_values=flag_values)
        positional = flag_values(list(argv))[1:]
    finally:
        sys.argv = saved_argv
    if positional:
        raise SystemExit(f"unexpected arguments {positional}; overrides look like --config.field=value")
    config = flag_values.config
    workdir = flag_values.workdir or default_workdir or str(pathlib.Path("runs") / config.get("name", "run"))
    return config, pathlib.Path(workdir)

