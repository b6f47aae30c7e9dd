"""What the two dynamics experiments (`dynamics_ode`, `dynamics_pde`) share: the `cnn.train.fit`
config of one scheme, config checks, the final training loss, number formatting, the loss plot
and the report files."""

from __future__ import annotations

import json
import math
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib
import ml_collections
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from cnn.models.dynamics import START_MODES  # noqa: E402
from cnn.ode.schemes import SchemeSpec  # noqa: E402
from experiments import grid  # noqa: E402


specs = grid.config_scheme_specs  # {label: SchemeSpec} of config.schemes (h is the experiment's dt)


def model_scheme_options(spec: SchemeSpec) -> dict[str, Any]:
    """The integrator's scheme keywords for `spec` (`scheme_options` always present, as the
    recorded run directories' config.json files have it)."""
    return {"scheme": spec.name, "scheme_options": dict(spec.options)}


def validate(config: ml_collections.ConfigDict, experiment: str) -> None:
    """Checks what both experiments read, before anything is generated or compiled.

    Raises:
      ValueError: naming the field, the value and what is valid.
    """
    if "train" not in config:
        raise ValueError("config.train is missing: the cnn.train.fit fields (optimizer, batch_size, ...)")
    if config.get("experiment") != experiment:
        raise ValueError(f"config.experiment={config.get('experiment')!r}; this script runs {experiment!r}")
    specs(config)  # fails early on bad names and options
    if config.start not in START_MODES:
        raise ValueError(f"config.start={config.start!r}; valid: {list(START_MODES)}")
    if int(config.train_horizon) < 1:
        raise ValueError(f"config.train_horizon={config.train_horizon}: must be >= 1")


def fit_config(config: ml_collections.ConfigDict, dataset: str, **model_options: Any) -> ml_collections.ConfigDict:
    """The `cnn.train.fit` config of one scheme: `config.train` with `model_options` added."""
    train = ml_collections.ConfigDict(config.train.to_dict())
    train.dataset = dataset  # a record only: the data come from the experiment's own factory
    given = train.model_options.to_dict() if "model_options" in train else {}
    train.model_options = ml_collections.ConfigDict({**given, **model_options})
    return train


def final_loss(history: Sequence[Mapping[str, Any]], total_steps: int) -> float:
    """The training loss at the end: mean of the logged window means over the last 5% of steps
    (at least the last logged window)."""
    losses = [(r["step"], r["train/loss"]) for r in history if "train/loss" in r]
    last = [loss for step, loss in losses if step > total_steps - total_steps // 20] or [losses[-1][1]]
    return float(np.mean(last))


def loss_curve(history: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """`(steps, losses)` of the logged training windows."""
    records = [(r["step"], r["train/loss"]) for r in history if "train/loss" in r]
    return np.array([s for s, _ in records]), np.array([v for _, v in records], np.float64)


def fmt(value: float, digits: int = 3) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return "diverged" if value == math.inf else "undefined"
    return f"{value:.{digits}e}"


def jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Mapping):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def plot_losses(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], path: pathlib.Path) -> str:
    """Training loss (logged window means) per run; returns the file name."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, (steps, values) in curves.items():
        ax.semilogy(steps, values, lw=1, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (MSE of predicted states)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def write_outputs(
    workdir: pathlib.Path, body: list[str], plots: Sequence[str], table: tuple[Sequence[str], Sequence[Sequence[Any]]],
    payload: Mapping[str, Any],
) -> pathlib.Path:
    """results.md (`body` and the plots), results.csv (`table`), results.json (`payload`)."""
    lines = body + ["", "## Plots", ""] + [f"![{name}](plots/{name})" for name in plots] + [""]
    report = workdir / "results.md"
    report.write_text("\n".join(lines))
    grid.write_csv(workdir / "results.csv", *table)
    (workdir / "results.json").write_text(json.dumps(jsonable(dict(payload)), indent=2) + "\n")
    return report


def start_run(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> pathlib.Path:
    """Creates the run directory and writes the experiment's config.json."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
    (workdir / "plots").mkdir(exist_ok=True)
    return workdir
