"""Euler vs LM-ResNet on the full Fashion-MNIST, depths 20/32/44/56, 3 seeds: a few minutes on
one GPU (the LM-ResNet claim tested where real data exists on these machines; CIFAR-10 does not).

    CNN_DATA_DIR=../shared/data python -m experiments.compare_schemes \
        --config=experiments/configs/fashion_mnist_gpu.py --workdir=runs/fashion_mnist_gpu
"""

from experiments.configs.base import scheme_comparison as base_config


def get_config():
    config = base_config()
    config.name = "fashion_mnist_gpu"
    config.schemes = ("euler", "lm")
    config.depths = (20, 32, 44, 56)
    config.seeds = (0, 1, 2)
    config.model_options = {"width": 16}
    config.data_in_memory = True  # the raw IDX files straight into RAM: the GPU is not starved

    train = config.train
    train.dataset = "fashion_mnist"
    train.num_classes = 10
    train.batch_size = 256
    train.num_epochs = 2.0
    train.dtype = "bfloat16"
    train.deterministic = False  # determinism costs speed and is not needed for the comparison
    train.augment = "random_flip"
    train.optimizer.name = "sgd"
    train.optimizer.learning_rate = 0.1
    train.optimizer.momentum = 0.9
    train.optimizer.weight_decay = 1e-4
    train.optimizer.schedule = "cosine"
    train.optimizer.warmup_epochs = 0.2
    train.log_every_steps = 50
    train.eval_every_steps = 0  # once per epoch
    train.checkpoint.every_steps = 0  # final checkpoint only
    train.checkpoint.max_to_keep = 1
    train.checkpoint.best_metric = ""
    return config
