"""Ablations on the embedded digits (CPU, tens of minutes): each knob of the ODE reading of a
CIFAR ResNet-20 against forward Euler with h = 1 (He et al.'s ResNet).

    python -m experiments.ablations --config=experiments/configs/ablations.py --workdir=runs/ablations
"""

from experiments.configs.base import ablation as base_config


def digits_training(train):
    """The recorded ablations' training: the embedded 8x8 digits, 8 epochs of batch 64, SGD with
    momentum, cosine schedule (what `make demo` trained on before it moved to Fashion-MNIST)."""
    train.dataset = "digits"
    train.num_classes = 10
    train.batch_size = 64
    train.num_epochs = 8.0
    train.optimizer.name = "sgd"
    train.optimizer.learning_rate = 0.05
    train.optimizer.momentum = 0.9
    train.optimizer.weight_decay = 5e-4
    train.optimizer.schedule = "cosine"
    train.optimizer.warmup_epochs = 1.0
    train.log_every_steps = 50
    train.eval_every_steps = 44  # two epochs of 22 steps
    train.checkpoint.every_steps = -1
    train.checkpoint.max_to_keep = 1
    train.checkpoint.best_metric = ""
    return train


def get_config():
    config = base_config()
    config.name = "ablations_digits"
    config.depth = 20
    config.seeds = (0, 1, 2)
    config.model_options = {"width": 16}
    digits_training(config.train)
    config.baseline = "euler"
    config.variants = {
        "euler": {"knob": "baseline", "scheme": "euler"},
        # Step size: h < 1 shrinks each residual update (a finer time grid on T = h * blocks).
        "euler_h_half": {"knob": "step size h", "scheme": {"name": "euler", "h": 0.5}},
        "euler_h_quarter": {"knob": "step size h", "scheme": {"name": "euler", "h": 0.25}},
        # LM-ResNet: k_t initialization and whether it is learned.
        "lm": {"knob": "k_t", "scheme": "lm"},
        "lm_init_0": {"knob": "k_t", "scheme": {"name": "lm", "k_init": (0.0, 0.0)}},
        "lm_init_pos": {"knob": "k_t", "scheme": {"name": "lm", "k_init": (0.25, 0.35)}},
        "lm_constrained": {
            "knob": "k_t",
            "scheme": {"name": "lm", "constrain": True, "k_bounds": (-1.0, 1.0)},
        },
        "lm_fixed_neg": {"knob": "k_t fixed", "scheme": {"name": "lm_fixed", "k": -0.05}},
        "lm_fixed_pos": {"knob": "k_t fixed", "scheme": {"name": "lm_fixed", "k": 0.3}},
        # Tied weights: one residual function per stage (a time-invariant vector field).
        "euler_tied": {"knob": "tied weights", "scheme": "euler", "model_options": {"tied": True}},
        "lm_tied": {"knob": "tied weights", "scheme": "lm", "model_options": {"tied": True}},
        # Depth at a fixed parameter count: with n >= 2 blocks per stage a tied stage holds one
        # entry block and one shared block, so depths 14, 20 and 32 have the same parameters.
        "euler_tied_d14": {"knob": "depth, fixed params", "scheme": "euler", "model_options": {"tied": True, "depth": 14}},
        "euler_tied_d32": {"knob": "depth, fixed params", "scheme": "euler", "model_options": {"tied": True, "depth": 32}},
        # Stochastic depth (survival linear in depth down to 0.5), with and without LM.
        "euler_stochastic": {"knob": "stochastic depth", "scheme": "euler", "model_options": {"final_survival": 0.5}},
        "lm_stochastic": {"knob": "stochastic depth", "scheme": "lm", "model_options": {"final_survival": 0.5}},
    }
    return config
