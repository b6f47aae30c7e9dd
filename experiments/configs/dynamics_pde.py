"""Learning the heat equation's stencil: one 3x3 conv kernel stepped by forward Euler (and RK2).

    python -m experiments.dynamics_pde --config=experiments/configs/dynamics_pde.py --workdir=runs/dynamics_pde
    python -m experiments.dynamics_pde --config=experiments/configs/dynamics_pde.py:tiny --workdir=runs/dyn_pde_tiny

(`python -m experiments.dynamics` runs the same, dispatching on `config.experiment`.)
Snapshots are taken every dt = courant * dx^2 / kappa, exactly one explicit 5-point step, so
forward Euler's kernel should be r [[0,1,0],[1,-4,1],[0,1,0]] with r = courant (0.2 here).
White-noise initial fields identify all nine entries; smooth ones (the generator's low modes)
do not (see results.md). `config.train` holds the `cnn.train.fit` fields; the script adds the
scheme and the boundary to `config.train.model_options`. `tiny`: 16x16 grid, Euler on white
noise only, a few hundred steps.
"""

import ml_collections


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.name = "dynamics_pde"
    config.experiment = "pde"
    config.pde = ml_collections.ConfigDict({
        "grid_size": 32,
        "boundary": "periodic",  # or "dirichlet" (zero padding)
        "diffusivity": 0.01,
        "courant": 0.2,  # kappa dt / dx^2; <= 0.225 keeps one generator step per snapshot
        "num_train": 16,
        "num_test": 4,
        "num_steps": 8,
        "initial_fields": ("white_noise", "smooth"),
    })
    config.data_seed = 0
    config.schemes = ("euler", "midpoint")  # names, or {"name": ..., **options} (cnn.ode.SchemeSpec)
    config.start = "data"
    config.train_horizon = 1

    # cnn.train.fit's fields.
    config.train = ml_collections.ConfigDict({
        "seed": 0,
        "model": "stencil_integrator",
        "batch_size": 128,  # all 16 x 8 training pairs
        "num_train_steps": 600,
        "optimizer": {"name": "adam", "learning_rate": 3e-2, "schedule": "cosine"},
        "parallelism": "single",
        "log_every_steps": 10,
        "eval_every_steps": 200,
        "checkpoint": {"max_to_keep": 1},
        "progress": True,
        "plot": False,
    })

    if variant == "tiny":
        config.name = "dynamics_pde_tiny"
        config.pde.grid_size = 16
        config.pde.num_train = 8
        config.pde.num_test = 2
        config.pde.num_steps = 4
        config.pde.initial_fields = ("white_noise",)
        config.schemes = ("euler",)
        config.train.num_train_steps = 300
        config.train.batch_size = 32
        config.train.eval_every_steps = 100
        config.train.progress = False
    elif variant:
        raise ValueError(f"unknown dynamics_pde config variant {variant!r}; valid: '' (full), 'tiny'")
    return config


def get_tiny_config() -> ml_collections.ConfigDict:
    return get_config("tiny")
