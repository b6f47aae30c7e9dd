"""`make demo`: six discretization schemes of CIFAR-style ResNets on the embedded 8x8 digits.

Depths 8, 14 and 20 (n = 1, 2, 3 blocks per stage), three seeds each, 8 epochs: about six
minutes on a 2-core CPU (the second and third seeds load the first's compiled programs from the
run directory's compilation cache). Digits is small (1,438 train / 359 test images), so one test
image is 0.28 points of accuracy: the report states which differences exceed the seed noise. At
depth 8 each stage has one block, so the multistep schemes (lm, ab2, leapfrog) are Euler there.

    python -m experiments.compare_schemes --config=experiments/configs/demo.py --workdir=runs/demo
"""

from experiments.configs.base import scheme_comparison as base_config


def get_config():
    config = base_config()
    config.name = "demo"
    config.schemes = ("euler", "lm", "midpoint", "ab2", "leapfrog", "backward_euler")
    config.scheme_options = {"backward_euler": {"iterations": 2}}
    config.depths = (8, 14, 20)
    config.seeds = (0, 1, 2)
    config.model_options = {"width": 16}

    train = config.train
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
    train.checkpoint.every_steps = -1  # with every evaluation
    train.checkpoint.max_to_keep = 1
    train.checkpoint.best_metric = ""
    return config
