"""The LM-ResNet paper's CIFAR-10 recipe (Lu, Zhong, Li, Dong, ICML 2018, table 1), for users
who have CIFAR-10 (this project's machines do not: see README).

He et al.'s CIFAR ResNets (post-activation, option-A shortcuts) under forward Euler against
LM-ResNets (pre-activation blocks and projection shortcuts, as in the paper's reference code
github.com/2prime/LM-ResNet) at depths 20/32/44/56/110; SGD with momentum 0.9, weight decay
1e-4, batch 128, learning rate 0.1 divided by 10 at 32k and 48k of 64k iterations (He et al.'s
schedule, about epochs 82 and 123 of 164 on the 50,000 training images), the standard pad-4 /
random-crop / flip augmentation.

Targets (CIFAR-10 test error %, the paper's table):
    depth      20     32     44     56
    ResNet     8.75   7.51   7.17   6.97
    LM-ResNet  8.33   7.18   6.66   6.31

    CNN_DATA_DIR=/path/with/cifar-10-python.tar.gz python -m experiments.compare_schemes \
        --config=experiments/configs/cifar10_lm_resnet.py --workdir=runs/cifar10_lm_resnet
"""

from experiments.configs.base import scheme_comparison as base_config

PAPER_TEST_ERROR = {
    "euler": {20: 8.75, 32: 7.51, 44: 7.17, 56: 6.97},
    "lm": {20: 8.33, 32: 7.18, 44: 6.66, 56: 6.31},
}


def get_config():
    config = base_config()
    config.name = "cifar10_lm_resnet"
    config.schemes = ("euler", "lm")
    config.depths = (20, 32, 44, 56, 110)
    config.seeds = (0,)
    config.model_options = {"width": 16, "shortcut": "A"}
    config.scheme_model_options = {"lm": {"preactivation": True, "shortcut": "B"}}
    config.data_in_memory = True

    train = config.train
    train.dataset = "cifar10"
    train.num_classes = 10
    train.batch_size = 128
    train.num_train_steps = 64_000
    train.augment = "cifar_standard"
    train.optimizer.name = "sgd"
    train.optimizer.learning_rate = 0.1
    train.optimizer.momentum = 0.9
    train.optimizer.weight_decay = 1e-4
    train.optimizer.schedule = "piecewise"
    train.optimizer.decay_steps = (32_000, 48_000)
    train.optimizer.decay_factor = 0.1
    train.eval_every_steps = 0  # every epoch
    train.log_every_steps = 100
    train.checkpoint.every_steps = -1
    train.checkpoint.max_to_keep = 2
    return config
