"""Learning dynamical systems with residual networks read as integrators: runs the ODE
(`experiments.dynamics_ode`) or the PDE (`experiments.dynamics_pde`) experiment, as
`config.experiment` says.

    python -m experiments.dynamics --config=experiments/configs/dynamics_ode.py --workdir=runs/dynamics_ode
    python -m experiments.dynamics --config=experiments/configs/dynamics_pde.py --workdir=runs/dynamics_pde
"""

from __future__ import annotations

import importlib
import os
import pathlib
import sys
from collections.abc import Sequence

import ml_collections

from experiments import grid

EXPERIMENTS = {"ode": "experiments.dynamics_ode", "pde": "experiments.dynamics_pde"}


def run(config: ml_collections.ConfigDict, workdir: str | os.PathLike, command: str = "") -> pathlib.Path:
    """Runs the experiment named by `config.experiment`; returns the path of its results.md.

    Raises:
      ValueError: `config.experiment` is not "ode" or "pde".
    """
    experiment = config.get("experiment")
    if experiment not in EXPERIMENTS:
        raise ValueError(f"config.experiment={experiment!r}; valid: {sorted(EXPERIMENTS)}")
    return importlib.import_module(EXPERIMENTS[experiment]).run(config, workdir, command=command)


def main(argv: Sequence[str]) -> None:
    # One training per scheme, nothing compiled twice: no compilation cache.
    grid.cli_main(argv, "experiments/configs/dynamics_ode.py", run, "experiments.dynamics", compilation_cache=False)


if __name__ == "__main__":
    main(sys.argv)
