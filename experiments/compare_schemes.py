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

Each entry of `config.schemes` is a scheme and its options as one value: a name (`"lm"`) or a
mapping (`{"name": "backward_euler", "iterations": 20, "tolerance": 1e-3}`, optionally with a
`"label"` naming its cells and rows; `cnn.ode.SchemeSpec`).

Finished cells are skipped, an interrupted cell resumes from its checkpoint, so rerunning the
same command continues an interrupted comparison. One cell alone:
`--config.only='("lm-d20-s0",)'`.

    python -m experiments.compare_schemes --config=experiments/configs/demo.py --workdir=runs/demo
    python -m experiments.compare_schemes --config=experiments/configs/fashion_mnist.py --workdir=runs/fmnist
"""

from __future__ import annotations

import json
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
from cnn.ode.schemes import SchemeSpec  # noqa: E402
from cnn.ode.stage import fold_stage_options  # noqa: E402
from experiments import grid, stats  # noqa: E402
from experiments.configs import base  # noqa: E402

REFERENCE_SCHEME = "euler"


def base_config() -> ml_collections.ConfigDict:
    """Fields every scheme-comparison config sets (`experiments.configs.base.scheme_comparison`)."""
    return base.scheme_comparison()


specs = grid.config_scheme_specs  # {label: SchemeSpec} of config.schemes


def scheme_model_options(config: ml_collections.ConfigDict, label: str,
                         by_label: Mapping[str, SchemeSpec] | None = None) -> dict[str, Any]:
    """The model options of scheme `label`'s cells on top of `config.model_options`: its scheme
    and scheme options, then `config.scheme_model_options[label]` (e.g. a preactivation layout).
    `by_label`: `specs(config)` when the caller has it."""
    spec = (by_label or specs(config))[label]
    return {**spec.model_options(), **dict(config.scheme_model_options.get(label, {}))}


def cells(config: ml_collections.ConfigDict) -> list[grid.Cell]:
    """One cell per (scheme, depth, seed), seed-major: an interrupted or time-limited run has
    every (scheme, depth) for the first seeds rather than all seeds of the first schemes. A cell
    and its table row are named by the scheme's label."""
    by_label = specs(config)  # fails early on bad names and options
    for depth in config.depths:
        blocks_per_stage(depth)
    identical = identical_cells(config)  # computed as Euler's network: not trained
    result = []
    for seed in config.seeds:
        for depth in config.depths:
            for label in by_label:
                if (label, int(depth)) in identical:
                    continue
                model_options = {"depth": int(depth), **scheme_model_options(config, label, by_label)}
                result.append(
                    grid.Cell(
                        name=f"{label}-d{depth}-s{seed}",
                        group=f"{label}-d{depth}",
                        overrides={"seed": int(seed), "model_options": model_options},
                        labels={"scheme": label, "depth": int(depth), "seed": int(seed)},
                    )
                )
    return result


training_base = grid.training_base  # shared with the ablations
datasets_factory = grid.datasets_factory


# ------------------------------------------------------------------------------------------------
# Table


def evaluations_per_forward(config: ml_collections.ConfigDict, scheme: str, depth: int) -> int:
    """Residual-function evaluations of one forward pass of the network a cell trains, counted
    from the calls the network makes (`cnn.ode.stage.count_f_evaluations`, traced, not run):
    a Runge-Kutta scheme takes a one-evaluation Euler step at each shape-changing block, and an
    implicit step counts its maximum sweeps (all are computed)."""
    from cnn import models
    from cnn.ode.stage import count_f_evaluations

    options = {**training_base(config).model_options.to_dict(), "depth": int(depth),
               **scheme_model_options(config, scheme)}
    return count_f_evaluations(models.create(config.model, **options), (1, 32, 32, 3))


def identical_cells(config: ml_collections.ConfigDict) -> set[tuple[str, int]]:
    """`(scheme, depth)` cells whose network is exactly the Euler cell's at that depth (the
    schemes' own step rules decide: `experiments.stats.computes_euler_network`), e.g. multistep
    schemes at one block per stage. They are not trained and are reported as identical. Empty
    when Euler is not among the schemes or the model is not the CIFAR ResNet."""
    by_label = specs(config)
    if REFERENCE_SCHEME not in by_label or config.model != "cifar_resnet":
        return set()
    reference_options = dict(config.scheme_model_options.get(REFERENCE_SCHEME, {}))
    found = set()
    for label, spec in by_label.items():
        options = dict(config.scheme_model_options.get(label, {}))
        if label == REFERENCE_SCHEME or options != reference_options:
            continue
        stage = fold_stage_options({**config.model_options.to_dict(), **options})["stage"]
        for depth in config.depths:
            if stats.computes_euler_network(
                spec.name, dict(spec.options), blocks_per_stage(int(depth)),
                start=stage.start, history_at_entry=stage.history_at_entry,
            ):
                found.add((label, int(depth)))
    return found


def paired_comparisons(config: ml_collections.ConfigDict, summaries: Sequence[Mapping[str, Any]]) -> stats.PairedComparison:
    """Every scheme against Euler at the same depth, and LM at depth d against Euler at twice
    the blocks (depth 2d - 2, the LM-ResNet paper's claim) where both were trained: paired by
    seed, Holm-corrected together (`experiments.stats.compare_paired`)."""
    accuracies: dict[tuple[str, int], dict[int, float]] = {}
    for summary in summaries:
        labels = summary["labels"]
        accuracies.setdefault((labels["scheme"], int(labels["depth"])), {})[int(labels["seed"])] = summary["test_accuracy"]
    identical = identical_cells(config)
    by_label = specs(config)
    comparisons = []
    for depth in map(int, config.depths):
        for label in by_label:
            key = (label, depth)
            if label != REFERENCE_SCHEME and (key in accuracies or key in identical):
                comparisons.append((key, (REFERENCE_SCHEME, depth)))
    for depth in map(int, config.depths):
        deeper = (REFERENCE_SCHEME, 2 * depth - 2)
        for label, spec in by_label.items():
            if spec.name == "lm" and (label, depth) in accuracies and deeper in accuracies:
                comparisons.append(((label, depth), deeper))
    comparisons = [(a, b) for a, b in comparisons if b in accuracies]
    return stats.compare_paired(accuracies, comparisons, identical=identical, alpha=float(config.alpha),
                                power=float(config.power))


def _label(key: tuple[str, int]) -> str:
    return f"{key[0]}-d{key[1]}"


def table_rows(
    config: ml_collections.ConfigDict, group_stats: Sequence[grid.GroupStats], summaries: Sequence[Mapping[str, Any]]
) -> tuple[list[str], list[list[Any]], list[str], stats.PairedComparison]:
    """Header, rows and notes of the results table (rows ordered by depth, then scheme), and the
    paired comparisons behind its Δ column."""
    header = [
        "scheme", "depth", "params", "F evals / forward", "test acc % (mean ± std)", "seeds",
        f"Δ vs {REFERENCE_SCHEME} pp (paired mean [95% CI])", "flag (Holm)", "train loss", "ms / step", "compile s",
    ]
    by_key = {(s.labels["scheme"], s.labels["depth"]): s for s in group_stats}
    comparison = paired_comparisons(config, summaries)
    by_pair = {(row.candidate, row.reference): row for row in comparison.rows}
    identical = identical_cells(config)
    rows = []
    for depth in map(int, config.depths):
        for scheme in specs(config):
            key = (scheme, depth)
            stat = by_key.get((REFERENCE_SCHEME, depth) if key in identical else key)
            if stat is None:
                continue
            row = by_pair.get((key, (REFERENCE_SCHEME, depth)))
            if scheme == REFERENCE_SCHEME:
                delta, flag = "reference", ""
            elif key in identical:
                delta, flag = "0 (same network as euler)", "identical"
            elif row is None or row.difference is None or row.flag == "n/a":
                delta, flag = "n/a", ""
            else:
                d = row.difference
                delta, flag = f"{100 * d.mean:+.2f} [{100 * d.ci_low:+.2f}, {100 * d.ci_high:+.2f}]", row.flag
            rows.append([
                grid.scheme_label(scheme, [s for s in summaries
                                           if (s["labels"]["scheme"], int(s["labels"]["depth"])) == key]),
                depth,
                f"{stat.params:,}",
                evaluations_per_forward(config, scheme, depth),
                f"{100 * stat.accuracy_mean:.2f} ± {100 * stat.accuracy_std:.2f}",
                "= euler" if key in identical else stat.count,
                delta,
                flag,
                f"{stat.train_loss_mean:.4f}",
                f"{1000 * stat.seconds_per_step:.1f}",
                f"{stat.seconds_to_first_step:.1f}",
            ])
    notes = comparison.notes(label=_label)
    return header, rows, notes, comparison


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
    group_stats = grid.group_stats(summaries)
    header, rows, notes, comparison = table_rows(config, group_stats, summaries)
    paired_header, paired_rows = comparison.table(label=_label)
    plots = workdir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    plot_accuracy(group_stats, "depth", plots / "accuracy_vs_depth.png")
    plot_accuracy(group_stats, "params", plots / "accuracy_vs_params.png")
    deepest = max(int(d) for d in config.depths)
    plot_learning_curves(summaries, deepest, plots / "learning_curves.png")
    has_k = plot_learned_k(summaries, plots / "lm_k.png")
    grid.write_csv(workdir / "results.csv", header, rows)
    lines = [
        f"# Scheme comparison: {config.name}",
        "",
        f"- {grid.training_header(summaries)}",
        f"- model: `{config.model}` {json.dumps(config.model_options.to_dict())}"
        + (f", per scheme {json.dumps(config.scheme_model_options.to_dict())}" if config.scheme_model_options else "")
        + f"; seeds {list(config.seeds)} "
        "(a seed sets the initialization and the data order; every scheme sees the same orders)",
        f"- hardware: {grid.hardware()}",
        f"- command: `{command}`",
        "",
        grid.markdown_table(header, rows),
        "",
        "Test accuracy is the final model's, mean ± sample standard deviation over seeds. Δ is the mean of "
        f"the per-seed differences to {REFERENCE_SCHEME} at the same depth (a seed fixes the data order and the "
        "initial block weights for every scheme), in percentage points, with its 95% t interval; a flag means "
        f"Holm's correction over every comparison of the report rejects at family-wise level {config.alpha:g}. "
        "Cells that compute the Euler network exactly are not trained (`= euler`). "
        "F evals / forward counts the residual-function calls of one forward pass of the network (an Euler "
        "step at each shape-changing block; an implicit step's maximum sweeps); an implicit scheme's row gives its sweeps "
        "and the largest relative residual |z_(i+1) - z_i| / |z_(i+1)| its solve reached (eval mode, first test batch) "
        "when the tolerance was not met or none was set. ms / step is the median over logged "
        "windows after the first (per seed: an ensemble's step time divided by its members); compile s is the "
        "time from the start of training to the first step (mostly compilation).",
        "",
        "## Paired comparisons",
        "",
        grid.markdown_table(paired_header, paired_rows),
        "",
        "MDD: the smallest true paired difference this many seeds detect with the stated power at the "
        "Bonferroni level alpha / m (a guaranteed bound under Holm), from the observed spread of the differences.",
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
        "Every cell has its config.json and cell.json under `cells/`; cells trained together as an ensemble "
        "of seeds have their run directory (metrics.jsonl, TensorBoard events, checkpoints) under `packs/`. "
        "A rerun with another config is refused; `--config.train.on_mismatch=restart` redoes changed cells.",
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
