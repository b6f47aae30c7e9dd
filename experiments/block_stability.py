"""Where the trained residual blocks sit against their scheme's stability region.

For each named cell of a finished scheme comparison (or ablation), loads its final checkpoint
(for a cell trained in an ensemble pack, its member of the pack's checkpoint),
runs the network on the first test images and estimates, block by block, the leading
eigenvalues of the Jacobian dF_t/dx at the state the block's step sees (`cnn.ode.analysis.
block_spectra`, Arnoldi); `h lambda` is then drawn over the block's stability region (LM with its
learned `k_t`, an Euler start step with Euler's disc). Writes `plots/stability_<cell>.png` per
cell and `stability.md` (per block: step rule, leading |h lambda|, fraction of examples inside)
into the comparison's run directory.

    CNN_DATA_DIR=../shared/data python -m experiments.block_stability \
        --workdir=runs/fashion_mnist_study --cells euler-d26-s0 lm-d26-s0 midpoint-d26-s0

The reading: a forward step of a ResNet is a stable ODE step only where `h lambda` lies in the
region; a block outside amplifies some perturbation direction at every step. Nothing here is
trained; the estimate uses `--examples` test images (each example its own Jacobian).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from cnn import models
from cnn.data import load
from cnn.ode import analysis
from cnn.tasks.transfer import load_run_variables
from cnn.train import ensemble
from cnn.train.loop import task_from_config
from experiments import grid


def cell_variables(cell_dir: pathlib.Path) -> tuple[Any, dict]:
    """The cell's final variables and its (single-run) config. A cell trained in an ensemble
    pack (`cell.json`'s `trained_in`, no checkpoints of its own) is its member of the pack's
    final checkpoint, found by its seed."""
    summary_path = cell_dir / "cell.json"
    pack = json.loads(summary_path.read_text()).get("trained_in") if summary_path.exists() else None
    if not pack or (cell_dir / "checkpoints").is_dir():
        return load_run_variables(cell_dir)
    stacked, pack_config = load_run_variables(cell_dir.parent.parent / pack)
    stored = json.loads((cell_dir / "config.json").read_text())
    seeds = [int(seed) for seed in pack_config["ensemble"]["seeds"]]
    if int(stored["seed"]) not in seeds:
        raise ValueError(f"cell {cell_dir.name}: seed {stored['seed']} is not a member of {pack} (seeds {seeds})")
    return ensemble.member(stacked, seeds.index(int(stored["seed"]))), stored


def cell_model_and_images(stored: Mapping[str, Any], examples: int) -> tuple[Any, jax.Array]:
    """The network a cell's stored config builds, and its first `examples` evaluation images as
    the network sees them (the task's preparation applied)."""
    import ml_collections

    config = ml_collections.ConfigDict(stored)
    options = {"num_classes": int(config.num_classes), **config.model_options.to_dict()}
    model = models.create(config.model, **{k: tuple(v) if isinstance(v, list) else v for k, v in options.items()})
    batch = next(iter(load(config.dataset, config.eval_split, examples, shuffle=False, drop_remainder=False,
                           data_dir=config.get("data_dir") or None)))
    prepared = task_from_config(config).prepare({key: jax.numpy.asarray(value) for key, value in batch.items()})
    return model, prepared["image"]


def cell_spectra(cell_dir: pathlib.Path, examples: int, num_steps: int) -> tuple[list[analysis.BlockSpectrum], dict]:
    """The block spectra of the cell's final model on its first `examples` test images."""
    variables, stored = cell_variables(cell_dir)
    model, images = cell_model_and_images(stored, examples)
    spectra = analysis.block_spectra(model, variables, images, num_steps=num_steps, key=jax.random.key(0))
    return spectra, stored


def block_rows(cell: str, spectra: Sequence[analysis.BlockSpectrum]) -> list[list[Any]]:
    """Table rows: cell, block, step rule, median leading |h lambda|, fraction of examples inside."""
    rows = []
    for spectrum in spectra:
        if spectrum.transition:
            continue
        leading = np.abs(spectrum.leading_h_lambda)
        rows.append([cell, spectrum.name, spectrum.step, f"{np.median(leading):.2f}",
                     f"{spectrum.fraction_inside:.2f}"])
    return rows


def main(argv: Sequence[str] | None = None) -> pathlib.Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="a finished compare_schemes / ablations run directory")
    parser.add_argument("--cells", nargs="+", required=True, help="cell names under <workdir>/cells/")
    parser.add_argument("--examples", type=int, default=16, help="test images (one Jacobian each)")
    parser.add_argument("--num-steps", type=int, default=20, help="Arnoldi steps per block")
    args = parser.parse_args(argv)
    workdir = pathlib.Path(args.workdir)
    missing = [cell for cell in args.cells if not (workdir / "cells" / cell / "cell.json").exists()]
    if missing:
        raise SystemExit(f"--cells {missing}: no finished cell of that name under {workdir / 'cells'}")
    if args.examples < 1 or args.num_steps < 1:
        raise SystemExit(f"--examples={args.examples} and --num-steps={args.num_steps} must be >= 1")
    plots = workdir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    rows, summary = [], []
    for cell in args.cells:
        spectra, stored = cell_spectra(workdir / "cells" / cell, args.examples, args.num_steps)
        inside = analysis.plot_spectra_vs_stability(spectra, plots / f"stability_{cell}.png",
                                                    title=f"{cell}: h lambda of dF/dx vs the stability region")
        rows += block_rows(cell, spectra)
        summary.append([cell, f"{inside:.2f}", sum(not s.transition for s in spectra)])
    lines = [
        f"# Trained blocks vs their stability regions: {workdir.name}",
        "",
        f"- cells: {', '.join(args.cells)}; {args.examples} test images, {args.num_steps} Arnoldi steps per block",
        f"- hardware: {grid.hardware()}",
        f"- command: `python -m experiments.block_stability {' '.join(sys.argv[1:] if argv is None else argv)}`",
        "",
        grid.markdown_table(["cell", "blocks inside (fraction)", "blocks"], summary),
        "",
        "A block is inside when the leading h lambda of at least half of the examples lies in its step's "
        "stability region (spectral radius of the step's linear map <= 1).",
        "",
        grid.markdown_table(["cell", "block", "step rule", "median leading abs(h lambda)", "examples inside"], rows),
        "",
    ] + [f"![{cell}](plots/stability_{cell}.png)" for cell in args.cells]
    report = workdir / "stability.md"
    report.write_text("\n".join(lines) + "\n")
    (workdir / "stability.json").write_text(json.dumps({"summary": summary, "blocks": rows}, indent=2) + "\n")
    print(report.read_text())
    return report


if __name__ == "__main__":
    main()
