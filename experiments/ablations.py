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

from cnn.ode.schemes import SchemeSpec  # noqa: E402
from experiments import grid, stats  # noqa: E402
from experiments.configs import base  # noqa: E402


def base_config() -> ml_collections.ConfigDict:
    """The fields of an ablation config (`experiments.configs.base.ablation`)."""
    return base.ablation()


def variant_model_options(name: str, variant: Mapping[str, Any], depth: int) -> dict[str, Any]:
    """The model options of variant `name`'s cells: depth, the scheme value's `scheme` (and
    `scheme_options`), then the variant's other model options (which may override the depth)."""
    unknown = sorted(set(variant) - {"knob", "scheme", "model_options"})
    if unknown:
        raise ValueError(f"config.variants.{name} has unknown fields {unknown}; expected knob, scheme, model_options")
    if "scheme" not in variant:
        raise ValueError(f"config.variants.{name} has no 'scheme': name one, e.g. 'euler' or "
                         "{'name': 'lm', 'constrain': True}")
    model_options = dict(variant.get("model_options", {}))
    moved = sorted({"scheme", "scheme_options"} & set(model_options))
    if moved:
        raise ValueError(f"config.variants.{name}.model_options sets {moved}: a scheme and its options are one value, "
                         f"config.variants.{name}.scheme (e.g. {{'name': 'euler', 'h': 0.5}})")
    return {"depth": depth, **SchemeSpec.parse(variant["scheme"]).model_options(), **model_options}


def cells(config: ml_collections.ConfigDict) -> list[grid.Cell]:
    """One cell per (variant, seed), seed-major. A variant is `{"knob": group label, "scheme":
    scheme value, "model_options": {...}}`: the scheme and its options as one value (a name or
    `{"name": "lm", "constrain": True}`, `cnn.ode.SchemeSpec`), other model options apart."""
    variants = config.variants.to_dict()
    if config.baseline not in variants:
        raise ValueError(f"config.baseline={config.baseline!r} is not a variant; variants: {list(variants)}")
    options_of = {name: variant_model_options(name, variant, int(config.depth)) for name, variant in variants.items()}
    result = []
    for seed in config.seeds:
        for name, variant in variants.items():
            result.append(
                grid.Cell(
                    name=f"{name}-s{seed}",
                    group=name,
                    overrides={"seed": int(seed), "model_options": options_of[name]},
                    labels={"variant": name, "knob": variant.get("knob", ""), "seed": int(seed)},
                )
            )
    return result


def table_rows(config, group_stats: Sequence[grid.GroupStats], summaries: Sequence[Mapping[str, Any]]):
    """Header, rows and notes: every variant against the baseline, paired by seed and
    Holm-corrected together (`experiments.stats.compare_to_reference`)."""
    header = ["knob", "variant", "params", "test acc % (mean ± std)", "seeds",
              f"Δ vs {config.baseline} pp (paired mean [95% CI])", "flag (Holm)", "MDD pp", "train loss", "ms / step"]
    accuracies: dict[str, dict[int, float]] = {}
    for summary in summaries:
        accuracies.setdefault(summary["group"], {})[int(summary["labels"]["seed"])] = summary["test_accuracy"]
    comparison = None
    if config.baseline in accuracies:
        comparison = stats.compare_to_reference(accuracies, config.baseline, alpha=float(config.alpha),
                                                power=float(config.power))
    by_candidate = {row.candidate: row for row in comparison.rows} if comparison else {}
    rows = []
    for stat in group_stats:
        name = stat.group
        row = by_candidate.get(name)
        if name == config.baseline:
            delta, flag, mdd = "baseline", "", ""
        elif row is None or row.difference is None or row.flag == "n/a":
            delta, flag, mdd = "n/a", "", ""
        else:
            d = row.difference
            delta, flag, mdd = f"{100 * d.mean:+.2f} [{100 * d.ci_low:+.2f}, {100 * d.ci_high:+.2f}]", row.flag, f"{100 * row.mdd:.2f}"
        rows.append([
            stat.labels["knob"], grid.scheme_label(name, [s for s in summaries if s["group"] == name]), f"{stat.params:,}",
            f"{100 * stat.accuracy_mean:.2f} ± {100 * stat.accuracy_std:.2f}", stat.count, delta, flag, mdd,
            f"{stat.train_loss_mean:.4f}", f"{1000 * stat.seconds_per_step:.1f}",
        ])
    notes = comparison.notes() if comparison else [f"No baseline cells ({config.baseline!r}): nothing compared."]
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
    group_stats = grid.group_stats(summaries)
    header, rows, notes = table_rows(config, group_stats, summaries)
    (workdir / "plots").mkdir(parents=True, exist_ok=True)
    plot_ablations(group_stats, workdir / "plots" / "ablations.png")
    grid.write_csv(workdir / "results.csv", header, rows)
    lines = [
        f"# Ablations: {config.name}",
        "",
        f"- {grid.training_header(summaries)}; model `{config.model}` depth {config.depth} "
        f"{json.dumps(config.model_options.to_dict())}; seeds {list(config.seeds)} (paired: a seed fixes the data "
        "order and the initial weights of every variant)",
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
        config, workdir, cells(config), grid.training_base(config), datasets=grid.datasets_factory(config),
    )
    return write_report(config, summaries, pathlib.Path(workdir), command or "python -m experiments.ablations")


def main(argv: Sequence[str]) -> None:
    grid.cli_main(argv, "experiments/configs/ablations.py", run, "experiments.ablations")


if __name__ == "__main__":
    main(sys.argv)
