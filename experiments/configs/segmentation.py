"""Semantic segmentation on synthetic shapes: FCN-32s/16s/8s, SegNet, U-Net, dilated front end
(+ context module), all CPU-sized, trained alike.

    python -m experiments.segmentation --workdir runs/segmentation
    python -m experiments.segmentation --config experiments/configs/segmentation.py:tiny --workdir /tmp/seg
"""

import ml_collections

SHAPE_CLASSES = ("background", "circle", "square", "triangle")
MODEL_NAMES = ("fcn32s", "fcn16s", "fcn8s", "segnet", "unet", "dilated_frontend", "dilated_context")


def _model_options(widths, fc_width: int) -> dict:
    """Narrow, BatchNorm versions of the paper models for 32x32 images on a CPU."""
    trunk = {"widths": widths, "batch_norm": True, "dropout_rate": 0.0}
    fcn = {**trunk, "fc_width": fc_width, "fc6_kernel": 3, "fc6_padding": 1, "conv1_padding": 1}
    dilated = {**trunk, "fc_width": fc_width, "fc6_kernel": 3, "fc6_dilation": 4}
    return {
        "fcn32s": dict(fcn),
        "fcn16s": dict(fcn),
        "fcn8s": dict(fcn),
        # Three blocks: SegNet passes only pooling indices to its decoder, so its bottleneck must
        # carry all the content; five blocks leave 1x1 of a 32x32 image (and did not learn in 1,000
        # steps), three leave 4x4, about the paper's 1/32 of 360x480. Doubled widths, same reason.
        "segnet": {"widths": tuple(2 * w for w in widths[:3]), "convs_per_block": (2, 2, 3)},
        "unet": {"depth": 4, "width": widths[0], "batch_norm": True},
        "dilated_frontend": dict(dilated),
        "dilated_context": {**dilated, "context": "basic"},
    }


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    """The recorded run (`get_config()`), or `get_config("tiny")`: seconds, for tests and notebooks."""
    if variant == "tiny":
        return get_tiny_config()
    if variant:
        raise ValueError(f"unknown config variant {variant!r}; valid: '' (the recorded run), 'tiny'")
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.model_names = MODEL_NAMES
    config.models = ml_collections.ConfigDict(_model_options((8, 16, 32, 64, 64), fc_width=128))
    config.num_classes = len(SHAPE_CLASSES)
    config.class_names = SHAPE_CLASSES
    # cnn.data.load("shapes"): 2,048 train / 512 test 32x32 images, 1-3 non-overlapping circles,
    # squares and triangles on a noisy background, exact per-pixel masks.
    config.dataset = "shapes"
    config.train_split = "train"
    config.eval_split = "test"
    config.image_size = 32
    config.channels = 3
    config.normalize = ml_collections.ConfigDict({"mean": (), "std": ()})  # (): cnn.data.info's statistics

    config.batch_size = 32
    config.num_train_steps = 1000
    config.optimizer = ml_collections.ConfigDict({
        "name": "adam",
        "learning_rate": 2e-3,
        "schedule": "cosine",
        "warmup_steps": 100,
        "grad_clip_norm": 5.0,
        "weight_decay": 0.0,
    })
    config.loss = ml_collections.ConfigDict({"ignore_label": 255, "class_weighting": "none"})
    # Yu & Koltun train the front end first, then add the identity-initialized context module:
    # the context model starts from the trained front end's parameters (and trains as long again).
    config.initialize_from = ml_collections.ConfigDict({"dilated_context": "dilated_frontend"})
    config.augment = ml_collections.ConfigDict({"flip_horizontal": True, "flip_vertical": True, "max_shift": 0})
    config.eval_batch_size = 128
    config.parallelism = "auto"  # cnn.train.fit's: every local device
    config.log_every_steps = 50
    config.eval_every_steps = 250
    config.progress = True
    config.num_figure_images = 6
    return config


def get_tiny_config() -> ml_collections.ConfigDict:
    """Seconds-long: two narrow models, a few steps (runs end to end; does not learn much)."""
    config = get_config()
    config.model_names = ("fcn8s", "unet")
    config.models = ml_collections.ConfigDict(_model_options((4, 4, 8, 8, 8), fc_width=8))
    # As few layers as the models allow: XLA compile time, not the steps, is what a tiny run costs.
    config.models.fcn8s.convs_per_block = (1, 1, 1, 1, 1)
    config.models.unet.depth = 1
    config.train_split = "train[:64]"
    config.eval_split = "test[:32]"
    config.batch_size = 8
    config.num_train_steps = 3
    config.optimizer.warmup_steps = 1
    config.eval_batch_size = 32
    config.parallelism = "single"
    config.log_every_steps = 1
    config.eval_every_steps = 0
    config.progress = False
    config.num_figure_images = 2
    return config
