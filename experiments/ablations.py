"""Ablations of the ODE reading of ResNets: one knob at a time against a baseline.

Knobs (experiments/configs/ablations.py): the step size `h` of forward Euler; LM-ResNet's `k_t`
initialization, and learnable vs fixed `k`; tied vs untied weights (a time-invariant ODE vs the
usual ResNet); depth at a fixed parameter count (tied stages of increasing depth); stochastic
depth with and without LM. Every variant is trained on the same data order, optimizer and
budget as the baseline, over several seeds, and the report says which differences exceed the
seed noise.

Writes results.md / results.csv (knob, variant, parameters, test accuracy mean ± std, Δ vs the
baseline with its standard error and a noise verdict, ms / step), plots/ablations.png, and a
complete run directory per cell under cells/ (resumable like the scheme comparison).

    python -m experiments.ablations --config=experiments/configs/ablations.py --workdir=runs/ablations
"""

from __future__ import annotations

import json
import pathlib
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib
import ml_collections

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from experiments import compare_schemes, grid  # noqa: E402
from experiments.configs import base  # noqa: E402


def base_config() -> ml_collections.ConfigDict:
    """The fields of an ablation config (`experiments.configs.base.ablation`)."""
    return base.ablation()


def cells(config: ml_collections.ConfigDict) -> list[grid.Cell]:
    """One cell per (variant, seed), seed-major."""
    variants = config.variants.to_dict()
    if config.baseline not in variants:
        raise ValueError(f"config.baseline={config.baseline!r} is not a variant; variants: {list(variants)}")
    result = []
    for seed in config.seeds:
        for name, variant in variants.items():
            unknown = sorted(set(variant) - {"knob", "model_options"})
            if unknown:
                raise ValueError(f"config.variants.{name} has unknown fields {unknown}; expected knob, model_options")
            options = {"depth": int(config.depth), **dict(variant.get("model_options", {}))}
            result.append(
                grid.Cell(
                    name=f"{name}-s{seed}",
                    group=name,
                    overrides={"seed": int(seed), "model_options": options},
                    labels={"variant": name, "knob": variant.get("knob", ""), "seed": int(seed)},
                )
            )
    return result


def table_rows(config, stats: Sequence[grid.GroupStats]):
    header = ["knob", "variant", "params", "test acc % (mean ± std)", "seeds",
              f"Δ vs {config.baseline} (pp ± s.e.)", "train loss", "ms / step"]
    by_name = {s.group: s for s in stats}
    baseline = by_name.get(config.baseline)
    rows, notes = [], []
    for name, stat in by_name.items():
        if baseline is None:
            delta = "n/a"
        elif name == config.baseline:
            delta = "baseline"
        else:
            difference, error, verdict = grid.compare_to_reference(stat, baseline, config.noise_sigmas)
            delta = compare_schemes._format_difference(difference, error, verdict, False)
            if verdict in ("better", "worse"):
                notes.append(f"{name} is {verdict} than {config.baseline} by {100 * abs(difference):.2f} points.")
        rows.append([
            stat.labels["knob"], name, f"{stat.params:,}",
            f"{100 * stat.accuracy_mean:.2f} ± {100 * stat.accuracy_std:.2f}", stat.count, delta,
            f"{stat.train_loss_mean:.4f}", f"{1000 * stat.seconds_per_step:.1f}",
        ])
    if not notes:
        notes.append(
            f"No variant differs from {config.baseline} by more than {config.noise_sigmas:g} standard errors: "
            "on this budget every knob's effect is within seed noise."
        )
    else:
        comparisons = sum(1 for row in rows if row[5] not in ("baseline", "n/a"))
        flags_note = grid.chance_note(len(notes), comparisons, config.noise_sigmas)
        notes += [flags_note] if flags_note else []
    return header, rows, notes


def plot_ablations(stats: Sequence[grid.GroupStats], path: pathlib.Path) -> None:
    """Accuracy (mean ± std over seeds) per variant, coloured by knob."""
    knobs = list(dict.fromkeys(s.labels["knob"] for s in stats))
    colours = {knob: plt.cm.tab10(i % 10) for i, knob in enumerate(knobs)}
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(stats) + 1.5))
    positions = range(len(stats))[::-1]
    ax.barh(list(positions), [100 * s.accuracy_mean for s in stats], xerr=[100 * s.accuracy_std for s in stats],
            color=[colours[s.labels["knob"]] for s in stats], capsize=3)
    ax.set_yticks(list(positions), [s.group for s in stats], fontsize=8)
    low = min(100 * (s.accuracy_mean - s.accuracy_std) for s in stats)
    ax.set_xlim(max(0.0, low - 2.0), 100.0)
    ax.set_xlabel("test accuracy (%)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[k]) for k in knobs]
    ax.legend(handles, knobs, fontsize=7, loc="lower right")
    ax.set_title("ablations (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(config, summaries: Sequence[Mapping[str, Any]], workdir: pathlib.Path, command: str) -> pathlib.Path:
    stats = grid.group_stats(summaries)
    header, rows, notes = table_rows(config, stats)
    (workdir / "plots").mkdir(parents=True, exist_ok=True)
    plot_ablations(stats, workdir / "plots" / "ablations.png")
    grid.write_csv(workdir / "results.csv", header, rows)
    train = config.train
    budget = f"{train.num_train_steps} steps" if train.num_train_steps else f"{train.num_epochs:g} epochs"
    lines = [
        f"# Ablations: {config.name}",
        "",
        f"- dataset `{train.dataset}`, budget {budget} of batch {train.batch_size}, optimizer "
        f"{train.optimizer.name} lr {train.optimizer.learning_rate:g} ({train.optimizer.schedule}); "
        f"model `{config.model}` depth {config.depth} {json.dumps(config.model_options.to_dict())}; "
        f"seeds {list(config.seeds)}",
        f"- hardware: {grid.hardware()}",
        f"- command: `{command}`",
        "",
        grid.markdown_table(header, rows),
        "",
        "## Verdict",
        "",
        *[f"- {note}" for note in notes],
        "",
        "![ablations](plots/ablations.png)",
        "",
    ]
    report = workdir / "results.md"
    report.write_text("\n".join(lines))
    return report


def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, command: str = "") -> pathlib.Path:
    """Runs (or resumes) the ablations and writes the report; returns the path of results.md."""
    summaries = grid.run_experiment(
        config, workdir, cells(config), compare_schemes.training_base(config),
        datasets=compare_schemes.datasets_factory(config),
    )
    return write_report(config, summaries, pathlib.Path(workdir), command or "python -m experiments.ablations")


def main(argv: Sequence[str]) -> None:
    grid.cli_main(argv, "experiments/configs/ablations.py", run, "experiments.ablations")


if __name__ == "__main__":
    main(sys.argv)
