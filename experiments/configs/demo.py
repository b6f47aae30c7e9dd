"""`make demo`: Euler, LM-ResNet and RK2 (midpoint) CIFAR-style ResNets on the embedded
Fashion-MNIST subset, 5 paired seeds, under 10 minutes on a 2-core CPU.

Why this data: on the 8x8 digits every network reached 98-99%, one test image was 0.28 points
and no difference could show. The embedded Fashion-MNIST subset (5,000 train / 1,000 test real
images, committed) is harder (a depth-20 ResNet reaches about 82% after two epochs here) and its
test split is three times larger; average-pooled to 14x14 on device (`input_pool=2`), a 5-member
ensemble of ResNet-20 takes about 1.5 minutes for two epochs on 2 cores.

Design: depths 8 and 20 (1 and 3 blocks per stage), seeds 0-4 paired across schemes (a seed
fixes the data order and the initial block weights), the 5 seeds of a cell trained as one
ensemble program. LM at depth 8 is Euler's network (one block per stage starts with an Euler
step) and is reported as identical, not trained. Two epochs are not a plateau: the demo shows
the protocol and its power on a small budget; the study configs train to convergence.

    python -m experiments.compare_schemes --config=experiments/configs/demo.py --workdir=runs/demo
"""

from experiments.configs.base import scheme_comparison as base_config


def get_config():
    config = base_config()
    config.name = "demo"
    config.schemes = ("euler", "lm", "midpoint")
    config.depths = (8, 20)
    config.seeds = (0, 1, 2, 3, 4)
    config.model_options = {"width": 16}

    train = config.train
    train.dataset = "fashion_mnist_small"
    train.input_pool = 2  # 28x28 -> 14x14, on device
    train.num_classes = 10
    train.batch_size = 64
    train.num_epochs = 2.0  # 78 steps per epoch
    train.optimizer.name = "sgd"
    train.optimizer.learning_rate = 0.05
    train.optimizer.momentum = 0.9
    train.optimizer.weight_decay = 5e-4
    train.optimizer.schedule = "cosine"
    train.optimizer.warmup_steps = 20
    train.log_every_steps = 26
    train.eval_every_steps = 78  # every epoch
    train.checkpoint.every_steps = -1  # with every evaluation
    train.checkpoint.max_to_keep = 1
    train.checkpoint.best_metric = ""
    return config
