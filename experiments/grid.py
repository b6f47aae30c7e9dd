"""Runs a grid of training cells with `cnn.train.fit`, resumably, and summarizes them.

A *cell* is one training run: a name, overrides of the base training config (model options,
seed, ...) and where it lives (`<workdir>/cells/<name>/`, a complete `cnn.train` run
directory). A finished cell holds `cell.json` (its summary) and is not retrained; an
interrupted one resumes from its last checkpoint. Any cell can be rerun alone by naming it in
`config.only`.

A cell is reused only for the config that made it: before anything is trained, every cell of
the grid that has a stored `config.json` is compared with the config requested for it
(`cnn.train.rundir.config_differences`: the keys that change results). Any difference stops the
run with the differing keys per cell, unless `on_mismatch` (the experiment config's
`on_mismatch`, else its training config's, `--config.train.on_mismatch=`) is "restart" (such
cells are trained again from step 0) or "extend" (only the budget grew: such cells continue to
it). Reports describe the training from the cells' own stored configs (`training_header`), not
from the requested one.

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
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from cnn import models
from cnn.ode import get_scheme
from cnn.train import ensemble, errors, loop, rundir


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


def requested_cell_config(base: ml_collections.ConfigDict, cell: Cell) -> ml_collections.ConfigDict:
    """The config `fit` stores in the cell's config.json when it trains `cell`: `cell_config`
    with the trainer's defaults filled in and the default task's record (`task_options`)."""
    config = loop.resolve_config(cell_config(base, cell))
    if "task_options" in config and hasattr(loop, "task_from_config"):
        config.task_options = ml_collections.ConfigDict(loop.task_from_config(config).record())
    return config


def cell_differences(
    base: ml_collections.ConfigDict, cell: Cell, workdir: str | os.PathLike
) -> list[tuple[str, Any, Any]] | None:
    """`(key, stored, requested)` for every result key in which the cell's stored config.json
    differs from the requested config; None when the cell has no stored config (never started)."""
    stored = rundir.read_run_config(pathlib.Path(workdir) / "cells" / cell.name)
    if stored is None:
        return None
    return rundir.config_differences(stored, requested_cell_config(base, cell))


def _can_extend(base: ml_collections.ConfigDict, cell: Cell, workdir: pathlib.Path) -> bool:
    stored = rundir.read_run_config(workdir / "cells" / cell.name)
    return stored is not None and rundir.is_extension(stored, requested_cell_config(base, cell))


def stale_cells_error(
    stale: Mapping[str, Sequence[tuple[str, Any, Any]]], workdir: str | os.PathLike, *, extendable: bool
) -> errors.RunConfigMismatchError:
    """The refusal to reuse cells made by another config: each cell's differing keys (old -> new)
    and the fixes."""
    lines = [
        f"{len(stale)} cell(s) under {pathlib.Path(workdir) / 'cells'} were trained with another config "
        "(keys that change results differ from their config.json):"
    ]
    for name, differences in stale.items():
        changes = "; ".join(
            f"{key}: {rundir.show_value(old)} -> {rundir.show_value(new)}" for key, old, new in differences
        )
        lines.append(f"  {name}: {changes}")
    fixes = [
        "use a new --workdir for this config (keeps these results)",
        "or pass --config.train.on_mismatch=restart (or set on_mismatch='restart' in the experiment config) to "
        "train these cells again from step 0",
    ]
    if extendable:
        fixes.append("or pass --config.train.on_mismatch=extend to continue them to the new budget (the learning-rate "
                     "schedule is recomputed over the new total)")
    lines.append("Fix: " + ";\n     ".join(fixes) + ".")
    differences = [(f"{name}:{key}", old, new) for name, diffs in stale.items() for key, old, new in diffs]
    return errors.RunConfigMismatchError("\n".join(lines), differences=differences, workdir=pathlib.Path(workdir))


def median_step_seconds(history: Sequence[Mapping[str, Any]], batch_size: int) -> float:
    """Median wall time per step over the logged windows (`train/examples_per_sec` of batches of
    `batch_size`), leaving out the first (it compiles)."""
    rates = [record["train/examples_per_sec"] for record in history if "train/examples_per_sec" in record]
    rates = rates[1:] if len(rates) > 1 else rates
    return float(batch_size / np.median(rates)) if rates else float("nan")


def _learned_knobs(
    params: Mapping[str, Any], scheme_name: str | None, scheme_options: Mapping[str, Any] | None = None
) -> dict[str, list[float]]:
    """`{knob: values of every block that has one, in stage order}` of a trained model.

    `scheme_options` must be those the model was built with (`model_options["scheme_options"]`):
    a constrained knob stores `raw` and has the value `tanh(raw)`, which only the scheme built
    with `constrain=True` knows. Reads through `cnn.ode.stage.knob_values`, as every reader of
    learned knobs does (blocks without a knob, `ODEStage.first_block_uses_no_knob`, have no entry).
    """
    from cnn.ode.stage import knob_values

    if not scheme_name:
        return {}
    scheme = get_scheme(scheme_name, **dict(scheme_options or {}))
    per_stage = knob_values(params, scheme)
    return {knob: [float(v) for values in per_stage.values() for v in np.ravel(values[knob])] for knob in scheme.knob_names}


def _implicit_scheme(model_options: Mapping[str, Any]) -> Any:
    """The implicit Runge-Kutta `Scheme` a cell's `model_options` build (`scheme` +
    `scheme_options`), or None when they name none, an explicit one, or one `get_scheme` rejects."""
    scheme = model_options.get("scheme")
    if scheme is None:
        return None
    try:
        built = get_scheme(scheme, **dict(model_options.get("scheme_options") or {}))
    except (TypeError, ValueError):
        return None
    return built if built.kind == "runge_kutta" and built.is_implicit else None


def implicit_solve_record(config: ml_collections.ConfigDict, state: Any,
                          datasets: loop.DatasetFactory | None = None) -> dict[str, Any] | None:
    """What the implicit solve of a trained cell achieved, or None when its scheme is explicit.

    The trained network (`state.params`, `state.batch_stats`: a single run's state or an
    ensemble member's) is applied in eval mode -- the network whose test accuracy is reported --
    to the first batch of the evaluation split, and every implicit step reports the relative
    residual `|z_{i+1} - z_i| / |z_{i+1}|` of its last counted sweep and the sweeps it used
    (`cnn.ode.stage.implicit_solve_stats`). Returns `{"mode": "eval", "examples": batch size,
    "blocks": {block path: {"residual": [per step], "sweeps": [per step]}}, "steps",
    "max_residual", "mean_residual", "mean_sweeps", "max_sweeps"}` (JSON-ready).
    """
    if _implicit_scheme(dict(config.model_options)) is None:
        return None
    from cnn.ode.stage import implicit_solve_stats, summarize_implicit_solve
    from cnn.train.config import create_model, resolve_config
    from cnn.train.parallel import DataParallel

    resolved = resolve_config(config)
    task = loop.task_from_config(resolved)
    data = loop.RunData(resolved, task, datasets)
    batch = task.select(next(iter(data.eval_batches())))
    inputs = task.model_input(task.prepare({key: jax.numpy.asarray(value) for key, value in batch.items()}))
    model = create_model(resolved, task, DataParallel.create("single"), data.input_shape)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    stats = implicit_solve_stats(model, variables, inputs, train=False)
    return {
        "mode": "eval",
        "examples": int(inputs.shape[0]),
        "blocks": {path: {"residual": [float(v) for v in s["residual"]], "sweeps": [int(v) for v in s["sweeps"]]}
                   for path, s in stats.items()},
        **summarize_implicit_solve(stats),
    }


def _implicit_solve_fields(config: ml_collections.ConfigDict, state: Any,
                           datasets: loop.DatasetFactory | None) -> dict[str, Any]:
    """`{"implicit_solve": implicit_solve_record(...)}` for an implicit scheme's cell, else {}."""
    record = implicit_solve_record(config, state, datasets)
    return {} if record is None else {"implicit_solve": record}


def scheme_label(name: str, summaries: Sequence[Mapping[str, Any]]) -> str:
    """A table's name for a group of cells (its seeds) trained with one scheme: `name`, or, for an
    implicit scheme, `name` with what its solve achieved (`cnn.ode.stage.implicit_scheme_label`),
    e.g. "backward_euler, 2 sweeps, residual 0.31" when the tolerance was not met (or none was
    set), over the cells' `implicit_solve` records (largest residual and sweeps over seeds);
    "..., residual not measured" for cells recorded without one.

    The scheme and its options are read from the cells' stored configs (`summary["config"]`).
    """
    from cnn.ode.stage import implicit_scheme_label

    configs = [s.get("config") or {} for s in summaries]
    scheme = _implicit_scheme(dict(configs[0].get("model_options") or {})) if configs else None
    if scheme is None:
        return name
    records = [s.get("implicit_solve") for s in summaries]
    combined = None
    if records and all(records):
        combined = {
            "max_residual": max(r["max_residual"] for r in records),
            "mean_sweeps": float(np.mean([r["mean_sweeps"] for r in records])),
            "max_sweeps": max(int(r["max_sweeps"]) for r in records),
        }
    label = implicit_scheme_label(scheme, combined)
    return name + label[len(scheme.name):] if label.startswith(scheme.name) else label


def config_scheme_specs(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """`{label: cnn.ode.SchemeSpec}` of `config.schemes`, an experiment config's one scheme
    address: each entry a name (`"lm"`) or a mapping of a name, the scheme's options and an
    optional label (`{"name": "backward_euler", "iterations": 20, "tolerance": 1e-3}`).

    Raises:
      ValueError: the config still has the old second address `config.scheme_options`, or an
        entry is invalid (`cnn.ode.scheme_specs`).
    """
    from cnn.ode.schemes import scheme_specs

    if "scheme_options" in config:
        raise ValueError("config.scheme_options is gone: write a scheme's options into its entry of config.schemes, "
                         "e.g. config.schemes = ('euler', {'name': 'backward_euler', 'iterations': 20})")
    return {spec.label: spec for spec in scheme_specs(config.schemes)}


def _write_json(path: pathlib.Path, payload: Mapping[str, Any]) -> None:
    """Atomic write: a crash never leaves a half-written summary behind."""
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    os.replace(temporary, path)


def _timed_fit(config: ml_collections.ConfigDict, run_dir: pathlib.Path, datasets) -> tuple[Any, float, float]:
    """`loop.fit` with `(result, seconds to the first dispatched step, seconds in all)`: the first
    is mostly compilation (near zero when an identical model was compiled earlier in the process)."""
    started = time.perf_counter()
    first_step: list[float] = []

    def note_first_step(step: int, state: Any) -> None:
        if not first_step:
            first_step.append(time.perf_counter())

    result = loop.fit(config, run_dir, datasets=datasets, callbacks=[note_first_step])
    to_first = (first_step[0] - started) if first_step else float("nan")
    return result, to_first, time.perf_counter() - started


def _cell_summary(cell: Cell, config: ml_collections.ConfigDict, params: Any, final: Mapping[str, Any],
                  train_history: Sequence[Mapping[str, Any]], eval_history: Sequence[Mapping[str, Any]],
                  steps: int) -> dict[str, Any]:
    """A cell's summary from one model's parameters, final evaluation and logged records (the
    timing fields are the caller's)."""
    train_losses = [r["train/loss"] for r in train_history if "train/loss" in r]
    scheme_name = dict(config.model_options).get("scheme")
    return {
        "name": cell.name,
        "group": cell.group,
        "labels": dict(cell.labels),
        "params": models.count_params(params),
        "test_accuracy": float(final["accuracy"]),
        "test_loss": float(final["loss"]),
        "train_loss": float(train_losses[-1]) if train_losses else float("nan"),
        "eval_curve": [[int(r["step"]), float(r["eval/accuracy"])] for r in eval_history],
        "steps": int(steps),
        "knobs": _learned_knobs(params, scheme_name if isinstance(scheme_name, str) else None,
                                dict(config.model_options).get("scheme_options")),
    }


def run_cell(
    base: ml_collections.ConfigDict,
    cell: Cell,
    workdir: pathlib.Path,
    *,
    datasets: loop.DatasetFactory | None = None,
    on_mismatch: str = "error",
) -> dict[str, Any]:
    """Trains one cell (or resumes it) and returns its summary; a finished cell is read back if
    its stored config equals the requested one.

    The summary holds the cell's labels, parameter count, final test loss/accuracy, final
    training loss, the evaluation curve, median wall time per step, the time from the start of
    `fit` to the first dispatched step (compilation dominates it; near zero when an identical
    model was compiled earlier in the process), learned scheme knobs (LM's `k_t`), for an
    implicit scheme the residual and sweeps its solve reached (`implicit_solve`, see
    `implicit_solve_record`), and (read back, not stored in cell.json) `config`: the cell's
    stored config.json.

    Raises:
      RunConfigMismatchError: the cell was trained with another config (result keys differ) and
        `on_mismatch` is "error" (or "extend" and the difference is not a longer budget).
    """
    workdir = pathlib.Path(workdir)
    cell_dir = workdir / "cells" / cell.name
    done = cell_dir / "cell.json"
    if on_mismatch not in rundir.ON_MISMATCH:
        raise errors.ConfigError(f"on_mismatch={on_mismatch!r} must be one of {list(rundir.ON_MISMATCH)}")
    differences = cell_differences(base, cell, workdir)
    if differences:
        if on_mismatch == "restart":
            rundir.reset_run_directory(cell_dir, extra=("cell.json", "cell.tmp"))
        elif on_mismatch == "extend" and _can_extend(base, cell, workdir):
            done.unlink(missing_ok=True)  # fit continues the run to the new budget
        else:
            raise stale_cells_error({cell.name: differences}, workdir, extendable=_can_extend(base, cell, workdir))
    if done.exists():
        return _with_config(json.loads(done.read_text()), cell_dir)
    config = requested_cell_config(base, cell)
    if "on_mismatch" in config:
        config.on_mismatch = on_mismatch
    result, to_first, total = _timed_fit(config, cell_dir, datasets)
    summary = _cell_summary(cell, config, result.state.params, result.final_eval, result.train_history,
                            result.eval_history, result.steps)
    summary.update(seconds_per_step=median_step_seconds(result.train_history, int(config.batch_size)),
                   seconds_to_first_step=to_first, seconds_total=total)
    summary.update(_implicit_solve_fields(config, result.state, datasets))
    _write_json(done, summary)
    return _with_config(summary, cell_dir)


def _with_config(summary: dict[str, Any], cell_dir: pathlib.Path) -> dict[str, Any]:
    """The summary with the cell's stored config.json under "config" (None if absent)."""
    return {**summary, "config": rundir.read_run_config(cell_dir)}


def run_pack(
    base: ml_collections.ConfigDict,
    cells: Sequence[Cell],
    workdir: pathlib.Path,
    *,
    datasets: loop.DatasetFactory | None = None,
    on_mismatch: str = "error",
) -> list[dict[str, Any]]:
    """Trains cells that differ only in their seed as one ensemble (`cnn.train.ensemble`, each
    member with its own data order and augmentation: `data="per_member"`) and writes every
    member's cell as if it had been trained alone: its `config.json` is the single run's
    (`requested_cell_config`), its `cell.json` the member's summary. Member i computes what the
    single run with its seed computes up to float rounding (the vmapped BatchNorm reductions,
    strided convolutions and dense layers sum in another order; on CPU the stride-1
    convolutions run per member, as the single model's, `cnn.ops.conv`): 2e-7 after 10 steps
    of a depth-8 ResNet on digits (tests/train/test_ensemble.py), which training then amplifies
    like any rounding difference. A packed cell is therefore another draw of the same seed's
    noise, not the same numbers; a grid may mix packed and single cells. The ensemble's own run directory is
    `<workdir>/packs/<group>-s<seeds>` (resumable like any run).

    Returns:
      The cells' summaries, in the order of `cells`.
    """
    seeds = [int(cell.overrides["seed"]) for cell in cells]
    config = requested_cell_config(base, cells[0])
    config.ensemble.seeds = tuple(seeds)
    config.ensemble.size = len(seeds)
    config.ensemble.data = "per_member"
    if "on_mismatch" in config:
        config.on_mismatch = on_mismatch
    pack_dir = workdir / "packs" / f"{cells[0].group}-s{'-'.join(map(str, seeds))}"
    result, to_first, total = _timed_fit(config, pack_dir, datasets)
    # The ensemble's wall time per step (every member's window runs over the same steps).
    step_seconds = median_step_seconds([r for r in result.train_history if r.get("member") == 0],
                                       int(config.batch_size))
    summaries = []
    for index, cell in enumerate(cells):
        cell_dir = workdir / "cells" / cell.name
        cell_dir.mkdir(parents=True, exist_ok=True)
        single = requested_cell_config(base, cell)
        (cell_dir / "config.json").write_text(single.to_json_best_effort(indent=2, sort_keys=True) + "\n")
        summary = _cell_summary(
            cell, config, ensemble.member(result.state, index).params, result.final_eval["members"][index],
            [r for r in result.train_history if r.get("member") == index],
            [r for r in result.eval_history if r.get("member") == index], result.steps,
        )
        summary.update(
            # The ensemble's step time shared among its members: the cost of one seed's step.
            seconds_per_step=step_seconds / len(seeds),
            seconds_to_first_step=to_first,
            seconds_total=total / len(seeds),
            trained_in=str(pack_dir.relative_to(workdir)),
            ensemble_members=len(seeds),
        )
        summary.update(_implicit_solve_fields(single, ensemble.member(result.state, index), datasets))
        _write_json(cell_dir / "cell.json", summary)
        summaries.append(_with_config(summary, cell_dir))
    return summaries


def _packs(cells: Sequence[Cell]) -> list[list[Cell]]:
    """`cells` split into groups that differ only in the seed (same `group`, same overrides but
    "seed"), in order of first appearance."""
    packs: dict[tuple[str, str], list[Cell]] = {}
    for cell in cells:
        rest = {k: v for k, v in cell.overrides.items() if k != "seed"}
        key = (cell.group, json.dumps(rest, sort_keys=True, default=str))
        packs.setdefault(key, []).append(cell)
    return list(packs.values())


def run_grid(
    base: ml_collections.ConfigDict,
    cells: Sequence[Cell],
    workdir: str | os.PathLike,
    *,
    only: Iterable[str] = (),
    datasets: loop.DatasetFactory | None = None,
    progress: bool = True,
    on_mismatch: str = "error",
    ensembles: bool = False,
) -> list[dict[str, Any]]:
    """Runs every cell (or those named in `only`), skipping finished ones; returns all summaries
    that exist (finished cells outside `only` included, so tables stay complete).

    With `ensembles`, unfinished cells that differ only in their seed train as one ensemble
    program (`run_pack`); their cells are written as if trained alone.

    Before training anything, every cell with a stored config is compared with the requested
    one (`cell_differences`). Cells that differ are refused (`on_mismatch="error"`), trained
    again (`"restart"`) or continued to a larger budget (`"extend"`); with "restart" or
    "extend", such cells outside `only` are left out of the returned summaries (with a warning).

    Raises:
      ValueError: `only` names a cell that is not in the grid.
      RunConfigMismatchError: cells were trained with another config and `on_mismatch` does not
        allow it; lists every such cell with its differing keys (nothing is trained).
    """
    workdir = pathlib.Path(workdir)
    names = [cell.name for cell in cells]
    if len(set(names)) != len(names):
        raise ValueError(f"cell names must be unique, got duplicates in {names}")
    only = list(only)
    unknown = sorted(set(only) - set(names))
    if unknown:
        raise ValueError(f"config.only names unknown cells {unknown}; cells of this grid: {names}")
    if on_mismatch not in rundir.ON_MISMATCH:
        raise errors.ConfigError(f"on_mismatch={on_mismatch!r} must be one of {list(rundir.ON_MISMATCH)}")
    todo = [cell for cell in cells if not only or cell.name in only]
    stale = {cell.name: d for cell in cells if (d := cell_differences(base, cell, workdir))}
    if stale:
        refused = {
            name: differences
            for name, differences in stale.items()
            if on_mismatch == "error"
            or (on_mismatch == "extend" and not _can_extend(base, next(c for c in cells if c.name == name), workdir))
        }
        if refused:
            extendable = all(_can_extend(base, c, workdir) for c in cells if c.name in refused)
            raise stale_cells_error(refused, workdir, extendable=extendable)
        left_out = sorted(set(stale) - {cell.name for cell in todo})
        if left_out:
            warnings.warn(
                f"cells {left_out} were trained with another config and are not in config.only: they are left out "
                f"of the results (on_mismatch={on_mismatch!r} retrains only the cells it runs)",
                stacklevel=2,
            )
    summaries: dict[str, dict[str, Any]] = {}
    if ensembles:  # finished (or reusable) cells are read back; the rest train in packs of seeds
        for cell in todo:
            if cell.name not in stale and (workdir / "cells" / cell.name / "cell.json").exists():
                summaries[cell.name] = run_cell(base, cell, workdir, datasets=datasets, on_mismatch=on_mismatch)
        if on_mismatch == "restart":
            for cell in todo:
                if cell.name in stale:
                    rundir.reset_run_directory(workdir / "cells" / cell.name, extra=("cell.json", "cell.tmp"))
        groups = _packs([cell for cell in todo if cell.name not in summaries])
    else:
        groups = [[cell] for cell in todo]
    bar = tqdm(total=len(todo), initial=len(summaries), desc="cells", unit="cell", disable=not progress,
               dynamic_ncols=True)
    for group in groups:
        bar.set_postfix_str(group[0].name if len(group) == 1 else f"{group[0].group} x{len(group)} seeds")
        if len(group) == 1:
            trained = [run_cell(base, group[0], workdir, datasets=datasets, on_mismatch=on_mismatch)]
        else:
            trained = run_pack(base, group, workdir, datasets=datasets, on_mismatch=on_mismatch)
        for summary in trained:
            summaries[summary["name"]] = summary
        bar.update(len(group))
        bar.set_postfix_str(f"{group[0].group}: acc {np.mean([t['test_accuracy'] for t in trained]):.4f}")
    bar.close()
    for summary in finished_summaries(cells, workdir):  # finished cells outside `only`
        if summary["name"] not in stale:
            summaries.setdefault(summary["name"], summary)
    return [summaries[name] for name in names if name in summaries]


def training_base(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """An experiment's training config shared by all its cells: `config.train` with
    `config.model` and `config.model_options` merged in (the scheme comparison, the ablations)."""
    base = ml_collections.ConfigDict(config.train.to_dict())
    base.model = config.model
    options = base.model_options.to_dict()
    options.update(config.model_options.to_dict())
    base.model_options = ml_collections.ConfigDict(options)
    return base


def datasets_factory(config: ml_collections.ConfigDict) -> loop.DatasetFactory | None:
    """`cnn.data.load` with `in_memory=True` when `config.data_in_memory` asks for it (else fit's
    default loader)."""
    if not config.data_in_memory:
        return None
    from cnn import data

    def factory(split: str, **kwargs: Any):
        if config.train.data_dir:
            kwargs["data_dir"] = config.train.data_dir
        return data.load(config.train.dataset, split, in_memory=True, **kwargs)

    return factory


def run_experiment(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    cells: Sequence[Cell],
    base: ml_collections.ConfigDict,
    *,
    datasets: loop.DatasetFactory | None = None,
) -> list[dict[str, Any]]:
    """What an experiment script does before its report: writes config.json into `workdir`, then
    runs the grid (`config.only`, `config.progress`, `on_mismatch`: the experiment config's, else
    the training config's) or, with `config.report_only`, collects the finished cells without
    training (each summary carries its stored config, from which `training_header` describes it).

    Raises:
      ValueError: `config.report_only` is set but no cell has finished.
      RunConfigMismatchError: see `run_grid`.
    """
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
    if config.report_only:
        summaries = finished_summaries(cells, workdir)
        if not summaries:
            raise ValueError(f"config.report_only=True but no finished cells under {workdir / 'cells'}")
        return summaries
    on_mismatch = config.get("on_mismatch", None) or base.get("on_mismatch", None) or "error"
    return run_grid(base, cells, workdir, only=config.only, datasets=datasets, progress=bool(config.progress),
                    on_mismatch=on_mismatch, ensembles=bool(config.get("ensembles", False)))


def finished_summaries(cells: Sequence[Cell], workdir: str | os.PathLike) -> list[dict[str, Any]]:
    """The summaries of the cells of `cells` that have finished under `workdir`, in grid order,
    each with its stored config.json under "config"."""
    found = []
    for cell in cells:
        done = pathlib.Path(workdir) / "cells" / cell.name / "cell.json"
        if done.exists():
            found.append(_with_config(json.loads(done.read_text()), done.parent))
    return found


def _budget(config: Mapping[str, Any], steps: Any) -> str:
    if config.get("num_train_steps"):
        return f"{config['num_train_steps']} steps"
    trained = f" ({steps} steps)" if isinstance(steps, int) else ""
    return f"{float(config.get('num_epochs', 0)):g} epochs{trained}"


def _training_fields(config: Mapping[str, Any], steps: Any) -> dict[str, str]:
    optimizer = config.get("optimizer", {})
    return {
        "dataset": f"dataset: `{config.get('dataset')}` ({config.get('train_split')} / {config.get('eval_split')})",
        "budget": f"budget {_budget(config, steps)} of batch {config.get('batch_size')}",
        "optimizer": (
            f"optimizer {optimizer.get('name')} lr {float(optimizer.get('learning_rate', float('nan'))):g} "
            f"({optimizer.get('schedule')}), weight decay {float(optimizer.get('weight_decay', float('nan'))):g}"
        ),
        "augmentation": f"augmentation `{config.get('augment') or 'none'}`",
        "dtype": f"dtype {config.get('dtype')}",
    }


def training_header(summaries: Sequence[Mapping[str, Any]]) -> str:
    """The training a report's numbers come from, read from the cells' own stored configs:

        dataset: `digits` (train / test); budget 300 steps of batch 64; optimizer sgd lr 0.1
        (cosine), weight decay 0.0001; augmentation `none`; dtype float32

    A part on which cells differ lists each value with its cells (`... [cells a, b] | ...
    [cells c]`); cells without a stored config.json are named as such.
    """
    per_cell = {
        summary["name"]: _training_fields(summary["config"], summary.get("steps"))
        for summary in summaries
        if summary.get("config")
    }
    parts = []
    for field in ("dataset", "budget", "optimizer", "augmentation", "dtype"):
        values: dict[str, list[str]] = {}
        for name, fields in per_cell.items():
            values.setdefault(fields[field], []).append(name)
        if len(values) == 1:
            parts.append(next(iter(values)))
        elif values:
            parts.append(" | ".join(f"{value} [cells {', '.join(names)}]" for value, names in values.items()))
    missing = [summary["name"] for summary in summaries if not summary.get("config")]
    if missing:
        parts.append(f"no stored config.json for cells {', '.join(missing)}")
    return "; ".join(parts)


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
    try:
        config, workdir = parse_cli_config(argv, default_config_path, default_workdir)
        if compilation_cache:
            use_compilation_cache(workdir / ".jax_cache")
        result = run(config, workdir, command=" ".join([f"python -m {module}", *argv[1:]]))
    except Exception as error:  # noqa: BLE001 - only the kinds describe_error knows are reported
        described = errors.describe_error(error)
        if described is None:
            raise
        prefix, code = described
        print(errors.one_line(error, prefix), file=sys.stderr)
        raise SystemExit(code) from None
    if isinstance(result, pathlib.Path):
        print(result.read_text())
        print(f"wrote {result}")


def parse_cli_config(
    argv: Sequence[str], default_config_path: str, default_workdir: str | None = None
) -> tuple[ml_collections.ConfigDict, pathlib.Path]:
    """`--config=path.py [--config.key=value ...] --workdir=dir` via ml_collections' config flags.

    Keys may be added only under free-form sub-configs (`model_options`, `scheme_options`, ...).

    Raises:
      ConfigError: an override names a key the config does not have (with the closest keys).
      SystemExit: with a usage message, for arguments that are not flags.
    """
    from absl import flags
    from ml_collections import config_flags

    # Unknown keys are reported here with the closest existing ones (absl would raise a KeyError).
    rundir.check_command_line(list(argv)[1:], default_config_file=default_config_path)
    flag_values = flags.FlagValues()
    # ml_collections finds the `--config.key=value` overrides in sys.argv, not in the argv given.
    saved_argv, sys.argv = sys.argv, list(argv)
    try:
        config_flags.DEFINE_config_file(
            "config", default_config_path, "experiment config file", flag_values=flag_values,
            accept_new_attributes=True, lock_config=False,  # new keys: checked above (free-form ones only)
        )
        flags.DEFINE_string("workdir", None, "run directory", flag_values=flag_values)
        positional = flag_values(list(argv))[1:]
    finally:
        sys.argv = saved_argv
    if positional:
        raise SystemExit(f"unexpected arguments {positional}; overrides look like --config.field=value")
    config = flag_values.config
    workdir = flag_values.workdir or default_workdir or str(pathlib.Path("runs") / config.get("name", "run"))
    return config, pathlib.Path(workdir)

