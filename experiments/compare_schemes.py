"""Compare ODE discretization schemes of CIFAR-style ResNets: accuracy, parameters and speed.

Trains the same ResNet (`cnn.models.create("cifar_resnet", depth=..., scheme=...)`) under each
scheme at several depths and seeds, with identical data order, augmentation, optimizer and
budget, and writes into the run directory:

    results.md, results.csv    the table: scheme, depth, parameters, F evaluations, test accuracy
                               mean +- std over seeds, difference to Euler with its standard error
                               and a noise verdict, train loss, time per step, compile time
    plots/                     accuracy vs depth, accuracy vs parameters, learning curves,
                               learned k_t per block (LM)
    cells/<scheme>-d<depth>-s<seed>/
                               each training run: config.json, metrics.jsonl, TensorBoard events,
                               checkpoints, cell.json (its summary)
    config.json                the experiment config

Finished cells are skipped, an interrupted cell resumes from its checkpoint, so rerunning the
same command continues an interrupted comparison. One cell alone:
`--config.only='("lm-d20-s0",)'`.

    python -m experiments.compare_schemes --config=experiments/configs/demo.py --workdir=runs/demo
    python -m experiments.compare_schemes --config=experiments/configs/fashion_mnist.py --workdir=runs/fmnist
"""

from __future__ import annotations

import json
import math
import pathlib
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib
import ml_collections
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from cnn.models.cifar_resnet import blocks_per_stage  # noqa: E402
from cnn.ode import get_scheme  # noqa: E402
from cnn.train import loop  # noqa: E402
from experiments import grid  # noqa: E402

REFERENCE_SCHEME = "euler"


def base_config() -> ml_collections.ConfigDict:
    """Fields every scheme-comparison config sets (the configs in experiments/configs override)."""
    config = ml_collections.ConfigDict()
    config.name = "compare_schemes"
    config.schemes = ("euler", "lm")
    # Per-scheme options for cnn.ode.get_scheme, e.g. {"backward_euler": {"iterations": 2}}.
    config.scheme_options = ml_collections.ConfigDict()
    config.depths = (20,)
    config.seeds = (0,)
    config.model = "cifar_resnet"
    config.model_options = ml_collections.ConfigDict({"width": 16})  # common to every cell
    # Per-scheme model options on top, e.g. {"lm": {"preactivation": True, "shortcut": "B"}} for
    # the LM-ResNet paper's networks next to He et al.'s original ResNets.
    config.scheme_model_options = ml_collections.ConfigDict()
    config.train = loop.default_config()
    config.train.model = "cifar_resnet"
    config.train.progress = False  # one bar over cells instead
    config.data_in_memory = False  # read TFDS datasets' raw files straight into RAM
    config.only = ()  # cell names to (re)run; () runs every unfinished cell
    config.noise_sigmas = 2.0  # a difference counts only beyond this many standard errors
    config.progress = True  # a bar over cells
    config.report_only = False  # only (re)write the report from the finished cells
    return config


def cells(config: ml_collections.ConfigDict) -> list[grid.Cell]:
    """One cell per (scheme, depth, seed), seed-major: an interrupted or time-limited run has
    every (scheme, depth) for the first seeds rather than all seeds of the first schemes."""
    for scheme in config.schemes:
        get_scheme(scheme, **dict(config.scheme_options.get(scheme, {})))  # fail early on bad names
    for depth in config.depths:
        blocks_per_stage(depth)
    result = []
    for seed in config.seeds:
        for depth in config.depths:
            for scheme in config.schemes:
                model_options = {"depth": int(depth), "scheme": scheme}
                model_options.update(dict(config.scheme_model_options.get(scheme, {})))
                if scheme in config.scheme_options:
                    model_options["scheme_options"] = dict(config.scheme_options[scheme])
                result.append(
                    grid.Cell(
                        name=f"{scheme}-d{depth}-s{seed}",
                        group=f"{scheme}-d{depth}",
                        overrides={"seed": int(seed), "model_options": model_options},
                        labels={"scheme": scheme, "depth": int(depth), "seed": int(seed)},
                    )
                )
    return result


def training_base(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The training config shared by all cells (model options merged in)."""
    base = ml_collections.ConfigDict(config.train.to_dict())
    base.model = config.model
    options = base.model_options.to_dict()
    options.update(config.model_options.to_dict())
    base.model_options = ml_collections.ConfigDict(options)
    return base


def datasets_factory(config: ml_collections.ConfigDict) -> loop.DatasetFactory | None:
    """`cnn.data.load` with `in_memory=True` when the config asks for it (else fit's default)."""
    if not config.data_in_memory:
        return None
    from cnn import data

    def factory(split: str, **kwargs: Any):
        if config.train.data_dir:
            kwargs["data_dir"] = config.train.data_dir
        return data.load(config.train.dataset, split, in_memory=True, **kwargs)

    return factory


# ------------------------------------------------------------------------------------------------
# Table


def evaluations_per_forward(scheme: str, depth: int, options: Mapping[str, Any]) -> int:
    """Nominal residual-function evaluations of one forward pass: evaluations per step x blocks."""
    return get_scheme(scheme, **dict(options)).evals_per_step * 3 * blocks_per_stage(depth)


def _format_difference(difference: float, error: float, verdict: str, is_reference: bool) -> str:
    if is_reference:
        return "reference"
    if math.isnan(error):
        return f"{100 * difference:+.2f} ({verdict})"
    return f"{100 * difference:+.2f} ± {100 * error:.2f} ({verdict})"


def table_rows(config: ml_collections.ConfigDict, stats: Sequence[grid.GroupStats]) -> tuple[list[str], list[list[Any]], list[str]]:
    """Header, rows and notes of the results table (rows ordered by depth, then scheme)."""
    header = [
        "scheme", "depth", "params", "F evals / forward", "test acc % (mean ± std)", "seeds",
        f"Δ vs {REFERENCE_SCHEME} (pp ± s.e.)", "train loss", "ms / step", "compile s",
    ]
    by_key = {(s.labels["scheme"], s.labels["depth"]): s for s in stats}
    rows, notes = [], []
    for depth in config.depths:
        reference = by_key.get((REFERENCE_SCHEME, int(depth)))
        for scheme in config.schemes:
            stat = by_key.get((scheme, int(depth)))
            if stat is None:
                continue
            options = config.scheme_options.get(scheme, {})
            if reference is not None:
                difference, error, verdict = grid.compare_to_reference(stat, reference, config.noise_sigmas)
                delta = _format_difference(difference, error, verdict, scheme == REFERENCE_SCHEME)
                if scheme != REFERENCE_SCHEME and verdict in ("better", "worse"):
                    notes.append(
                        f"depth {depth}: {scheme} is {verdict} than {REFERENCE_SCHEME} by "
                        f"{100 * abs(difference):.2f} points (> {config.noise_sigmas:g} standard errors)."
                    )
            else:
                delta = "n/a"
            rows.append([
                scheme,
                depth,
                f"{stat.params:,}",
                evaluations_per_forward(scheme, int(depth), options),
                f"{100 * stat.accuracy_mean:.2f} ± {100 * stat.accuracy_std:.2f}",
                stat.count,
                delta,
                f"{stat.train_loss_mean:.4f}",
                f"{1000 * stat.seconds_per_step:.1f}",
                f"{stat.seconds_to_first_step:.1f}",
            ])
    comparisons = sum(1 for row in rows if row[0] != REFERENCE_SCHEME and row[6] != "n/a")
    if not notes:
        notes.append(
            f"No scheme differs from {REFERENCE_SCHEME} by more than {config.noise_sigmas:g} standard errors "
            "at any depth: on this budget the schemes are within seed noise of each other."
        )
    else:
        flags_note = grid.chance_note(len(notes), comparisons, config.noise_sigmas)
        notes += [flags_note] if flags_note else []
    one_block = [int(d) for d in config.depths if config.model == "cifar_resnet" and blocks_per_stage(int(d)) == 1]
    schemes = {s: get_scheme(s, **dict(config.scheme_options.get(s, {}))) for s in config.schemes}
    multistep = [name for name, s in schemes.items() if s.num_past_states or s.num_past_derivatives]
    if one_block and multistep:
        notes.append(
            f"At depth {', '.join(map(str, one_block))} every stage has a single block, which a multistep scheme "
            f"starts with an Euler step: {', '.join(multistep)} compute the same network as euler there "
            "(their learnable knobs are unused)."
        )
    return header, rows, notes


# ------------------------------------------------------------------------------------------------
# Plots


def _by_scheme(stats: Sequence[grid.GroupStats]) -> dict[str, list[grid.GroupStats]]:
    grouped: dict[str, list[grid.GroupStats]] = {}
    for stat in stats:
        grouped.setdefault(stat.labels["scheme"], []).append(stat)
    return {k: sorted(v, key=lambda s: s.labels["depth"]) for k, v in grouped.items()}


def plot_accuracy(stats: Sequence[grid.GroupStats], x: str, path: pathlib.Path) -> None:
    """Test accuracy (mean ± std over seeds) against depth or parameter count, one line per scheme."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for scheme, group in _by_scheme(stats).items():
        xs = [s.labels["depth"] if x == "depth" else s.params for s in group]
        ax.errorbar(xs, [100 * s.accuracy_mean for s in group], yerr=[100 * s.accuracy_std for s in group],
                    marker="o", capsize=3, label=scheme)
    ax.set_xlabel("depth" if x == "depth" else "parameters")
    if x == "params":
        ax.set_xscale("log")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"test accuracy vs {'depth' if x == 'depth' else 'parameters'} (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_learning_curves(summaries: Sequence[Mapping[str, Any]], depth: int, path: pathlib.Path) -> None:
    """Test accuracy during training at one depth, mean over seeds, one line per scheme."""
    fig, ax = plt.subplots(figsize=(6, 4))
    curves: dict[str, list[np.ndarray]] = {}
    for summary in summaries:
        if summary["labels"]["depth"] == depth and summary["eval_curve"]:
            curves.setdefault(summary["labels"]["scheme"], []).append(np.asarray(summary["eval_curve"], float))
    for scheme, members in curves.items():
        length = min(len(m) for m in members)
        stacked = np.stack([m[:length] for m in members])
        ax.plot(stacked[0, :, 0], 100 * stacked[:, :, 1].mean(axis=0), marker=".", label=scheme)
    ax.set_xlabel("step")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"learning curves, depth {depth} (mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_learned_k(summaries: Sequence[Mapping[str, Any]], path: pathlib.Path) -> bool:
    """LM-ResNet's learned k_t per block (mean ± std over seeds), one line per depth."""
    per_depth: dict[int, list[np.ndarray]] = {}
    for summary in summaries:
        if "k" in summary.get("knobs", {}):
            per_depth.setdefault(summary["labels"]["depth"], []).append(np.asarray(summary["knobs"]["k"]))
    if not per_depth:
        return False
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for depth, values in sorted(per_depth.items()):
        stacked = np.stack(values)
        blocks = np.arange(stacked.shape[1])
        ax.errorbar(blocks, stacked.mean(axis=0), yerr=stacked.std(axis=0), marker="o", ms=3, capsize=2,
                    label=f"depth {depth}")
    ax.axhline(0.0, color="k", lw=0.5)
    ax.set_xlabel("block t (stages in order; the first block of each stage takes an Euler step)")
    ax.set_ylabel("learned k_t")
    ax.set_title("LM-ResNet: learned k_t per block")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------------------------
# Report


def write_report(
    config: ml_collections.ConfigDict,
    summaries: Sequence[Mapping[str, Any]],
    workdir: pathlib.Path,
    command: str,
) -> pathlib.Path:
    """Writes results.md, results.csv and plots/ from the cell summaries."""
    stats = grid.group_stats(summaries)
    header, rows, notes = table_rows(config, stats)
    plots = workdir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    plot_accuracy(stats, "depth", plots / "accuracy_vs_depth.png")
    plot_accuracy(stats, "params", plots / "accuracy_vs_params.png")
    deepest = max(int(d) for d in config.depths)
    plot_learning_curves(summaries, deepest, plots / "learning_curves.png")
    has_k = plot_learned_k(summaries, plots / "lm_k.png")
    grid.write_csv(workdir / "results.csv", header, rows)
    train = config.train
    budget = f"{train.num_train_steps} steps" if train.num_train_steps else f"{train.num_epochs:g} epochs"
    lines = [
        f"# Scheme comparison: {config.name}",
        "",
        f"- dataset: `{train.dataset}` ({train.train_split} / {train.eval_split}); budget {budget} of batch "
        f"{train.batch_size}; optimizer {train.optimizer.name} lr {train.optimizer.learning_rate:g} "
        f"({train.optimizer.schedule}), weight decay {train.optimizer.weight_decay:g}; augmentation "
        f"`{train.augment or 'none'}`; dtype {train.dtype}",
        f"- model: `{config.model}` {json.dumps(config.model_options.to_dict())}"
        + (f", per scheme {json.dumps(config.scheme_model_options.to_dict())}" if config.scheme_model_options else "")
        + f"; seeds {list(config.seeds)} "
        "(a seed sets the initialization and the data order; every scheme sees the same orders)",
        f"- hardware: {grid.hardware()}",
        f"- command: `{command}`",
        "",
        grid.markdown_table(header, rows),
        "",
        "Test accuracy is the final model's, mean ± sample standard deviation over seeds. "
        f"Δ is the difference to {REFERENCE_SCHEME} at the same depth in percentage points with its standard "
        f"error; it counts as a difference only beyond {config.noise_sigmas:g} standard errors. "
        "F evals / forward is nominal (evaluations per step x blocks). ms / step is the median over logged "
        "windows after the first; compile s is the time from the start of training to the first step "
        "(mostly compilation) of the seed that compiled.",
        "",
        "## Verdict",
        "",
        *[f"- {note}" for note in notes],
        "",
        "## Plots",
        "",
        "![accuracy vs depth](plots/accuracy_vs_depth.png)",
        "![accuracy vs parameters](plots/accuracy_vs_params.png)",
        "![learning curves](plots/learning_curves.png)",
    ]
    if has_k:
        lines.append("![learned k_t](plots/lm_k.png)")
    lines += [
        "",
        "Every cell is a complete run directory under `cells/` (config.json, metrics.jsonl, TensorBoard "
        "events, checkpoints, cell.json). Rerun one alone by deleting its cell.json and passing "
        "`--config.only='(\"<cell name>\",)'`.",
        "",
    ]
    report = workdir / "results.md"
    report.write_text("\n".join(lines))
    return report


def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, command: str = "") -> pathlib.Path:
    """Runs (or resumes) the comparison and writes the report; returns the path of results.md."""
    summaries = grid.run_experiment(
        config, workdir, cells(config), training_base(config), datasets=datasets_factory(config)
    )
    return write_report(config, summaries, pathlib.Path(workdir), command or "python -m experiments.compare_schemes")


def main(argv: Sequence[str]) -> None:
    grid.cli_main(argv, "experiments/configs/demo.py", run, "experiments.compare_schemes")


if __name__ == "__main__":
    main(sys.argv)
