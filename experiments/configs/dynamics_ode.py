"""Learned integrators for the pendulum (or Lotka-Volterra): one residual MLP per scheme.

    python -m experiments.dynamics_ode --config=experiments/configs/dynamics_ode.py --workdir=runs/dynamics_ode
    python -m experiments.dynamics_ode --config=experiments/configs/dynamics_ode.py --config.system=lotka_volterra
    python -m experiments.dynamics_ode --config=experiments/configs/dynamics_ode.py:tiny --workdir=runs/dyn_tiny

(`python -m experiments.dynamics` runs the same, dispatching on `config.experiment`.)
Pendulum initial states: |theta_0| <= 2, |omega_0| <= 0.5, so the energy stays below the
separatrix (E < 1): every trajectory swings, and the states along a rollout stay in the region
the training trajectories cover. `config.train` holds the `cnn.train.fit` fields (optimizer,
batch size, steps, model options; unset fields take `cnn.train.default_config()` values); the
script adds each entry of `config.schemes` (a name, or a name with the scheme's options) and `h = dt` to `config.train.model_options` per scheme.
`tiny` (seconds on a CPU; the tests use it): Euler and midpoint only, a smaller MLP, fewer steps.

Backward Euler is solved, not swept a fixed number of times: fixed-point sweeps until the relative
change `|z_{i+1} - z_i| / |z_{i+1}|` is at most 1e-6, at most 10 sweeps. At h = dt = 0.1 a sweep
shrinks the error about tenfold (measured on the trained pendulum field: relative residual 3e-4
after 3 sweeps, 3e-5 after 4, 2e-7 after 6), so the tolerance is met in about 6 sweeps; the former
3 fixed sweeps left a residual near the one-step RMSE (4e-4), i.e. a different scheme at the
accuracy the fit reaches.
"""

import ml_collections


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.name = "dynamics_ode"
    config.experiment = "ode"
    config.system = "pendulum"  # or "lotka_volterra"
    # Keyword arguments of cnn.data.synthetic.<system> (its defaults where unset).
    config.system_options = ml_collections.ConfigDict({
        "pendulum": {"max_angle": 2.0, "max_velocity": 0.5},
        "lotka_volterra": {"initial_range": (1.0, 2.5)},
    })
    config.dt = 0.1  # sampling interval = the scheme's step h
    config.num_train = 64
    config.train_steps_per_trajectory = 60
    config.num_test = 16
    config.rollout_steps = 200  # 20 time units, several pendulum periods
    config.refine = 4  # also roll out the learned F with step dt / refine (0: skip)
    config.data_seed = 0  # test trajectories use data_seed + 1

    # A scheme and its options are one value: a name, or {"name": ..., **options} (cnn.ode.SchemeSpec).
    config.schemes = ("euler", "midpoint", "heun", "rk4", "ab2", "leapfrog", "lm",
                      {"name": "backward_euler", "iterations": 10, "tolerance": 1e-6})  # solved (module docstring)
    config.start = "data"  # multistep history from the true past; or "euler" / "copy" (the scheme's start rule)
    config.train_horizon = 1  # steps per training window (1: teacher-forced one-step targets)

    # cnn.train.fit's fields.
    config.train = ml_collections.ConfigDict({
        "seed": 0,
        "model": "mlp_integrator",
        "model_options": {"hidden": (64, 64), "activation": "tanh"},
        "batch_size": 256,
        "num_train_steps": 3000,
        "optimizer": {"name": "adam", "learning_rate": 3e-3, "schedule": "cosine"},
        "parallelism": "single",  # a 2-D state: more devices would only add communication
        "log_every_steps": 10,
        "eval_every_steps": 500,  # rollout error on the test trajectories (and a checkpoint)
        "checkpoint": {"max_to_keep": 1},
        "progress": True,
        "plot": False,
    })

    if variant == "tiny":
        config.name = "dynamics_ode_tiny"
        config.schemes = ("euler", "midpoint")
        config.num_train = 32
        config.train_steps_per_trajectory = 40
        config.num_test = 8
        config.rollout_steps = 50
        config.system_options.pendulum.max_step = 1e-2  # generator's internal RK4 step: data still ~1e-8 accurate
        config.train.model_options.hidden = (32, 32)
        config.train.num_train_steps = 400
        config.train.batch_size = 128
        config.train.optimizer.learning_rate = 1e-2
        config.train.eval_every_steps = 200
        config.train.progress = False
    elif variant:
        raise ValueError(f"unknown dynamics_ode config variant {variant!r}; valid: '' (full), 'tiny'")
    return config


def get_tiny_config() -> ml_collections.ConfigDict:
    return get_config("tiny")
