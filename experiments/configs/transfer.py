"""Transfer learning: pretrain on MNIST, transfer to Fashion-MNIST with 100 labels per class.

    python -m experiments.transfer --workdir runs/transfer --config.data_dir=/path/to/data
    python -m experiments.transfer --config experiments/configs/transfer.py:reverse   # Fashion -> MNIST

`data_dir` holds the original IDX files (`mnist/`, `fashion-mnist/`; default CNN_DATA_DIR or
~/.cache/cnn/data). The table of the recorded run is in experiments/transfer.py's docstring.
"""

import ml_collections


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    """The recorded run; `variant="reverse"` swaps source and target, `"tiny"` is `get_tiny_config()`."""
    if variant == "tiny":
        return get_tiny_config()
    config = ml_collections.ConfigDict()
    config.seeds = (0, 1, 2)  # target runs (subset draw, head init, order) repeated per seed
    config.data_dir = ""  # "" = the loader's default (CNN_DATA_DIR or ~/.cache/cnn/data)
    config.parallelism = "single"
    config.progress = True

    # The network: simple_cnn (conv-BN-ReLU stages, max pooling, global average pooling, dense).
    # Global average pooling makes its parameters independent of the image size.
    config.model = "simple_cnn"
    config.model_options = ml_collections.ConfigDict({"widths": (32, 64, 128), "depth": 1})

    # Where the pretrained trunk comes from: "" pretrains on `source` here; "run:<dir>" takes
    # the latest checkpoint of another cnn.train run of the same model; a .npz/.pt path is a
    # torchvision-layout state dict (set `model` to its family, e.g. "resnet18").
    config.pretrained = ""
    config.source = ml_collections.ConfigDict()
    config.source.dataset = "mnist"
    config.source.batch_size = 128
    config.source.num_train_steps = 1000
    config.source.optimizer = ml_collections.ConfigDict(
        {"name": "sgd", "learning_rate": 0.1, "momentum": 0.9, "weight_decay": 5e-4,
         "schedule": "cosine", "warmup_steps": 50}
    )

    config.target = ml_collections.ConfigDict()
    config.target.dataset = "fashion_mnist"
    config.target.labels_per_class = 100
    config.target.batch_size = 50
    config.target.num_train_steps = 400  # 20 epochs of the 1,000 labelled images
    config.target.optimizer = ml_collections.ConfigDict(
        {"name": "sgd", "learning_rate": 0.05, "momentum": 0.9, "weight_decay": 5e-4,
         "schedule": "cosine", "warmup_steps": 20}
    )

    config.modes = ("extraction", "finetune", "scratch")
    config.trunk_lr_fraction = 0.1  # fine-tuning: trunk learning rate = 0.1 x the head's
    config.cost_repeats = 20  # timed steps per mode (median reported)
    config.time_steps = True  # False: FLOPs of the unoptimized programs only, nothing compiled or timed

    if variant == "reverse":
        config.source.dataset, config.target.dataset = "fashion_mnist", "mnist"
    elif variant:
        raise ValueError(f"variant={variant!r} is not one of '', 'reverse', 'tiny'")
    return config


def get_tiny_config() -> ml_collections.ConfigDict:
    """Seconds on a CPU, embedded data only (digits -> Fashion-MNIST subset); for tests and notebooks."""
    config = get_config()
    config.seeds = (0,)
    config.progress = False
    config.model_options.widths = (8, 16)
    config.source.dataset = "digits"
    config.source.batch_size = 32
    config.source.num_train_steps = 20
    config.source.optimizer.warmup_steps = 2
    config.target.dataset = "fashion_mnist_small"
    config.target.labels_per_class = 10
    config.target.batch_size = 20
    config.target.num_train_steps = 10
    config.target.optimizer.warmup_steps = 2
    config.cost_repeats = 1
    config.time_steps = False
    return config
