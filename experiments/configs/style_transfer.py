"""Neural style transfer (Gatys et al.) on scikit-image's bundled photographs.

    python -m experiments.style_transfer --workdir runs/style
    python -m experiments.style_transfer --workdir runs/style --config.weights=vgg19.npz   # pretrained
    python -m experiments.style_transfer --config experiments/configs/style_transfer.py:tiny

`weights`: "random" (default: no download possible here), a torchvision-layout VGG state dict
(.npz, or .pt with torch) of `vgg{depth}`, or "run:<dir>" for a VGG trained by `cnn.train`.
"""

import ml_collections


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    """The default run; `variant="tiny"` is `get_tiny_config()`."""
    if variant == "tiny":
        return get_tiny_config()
    if variant:
        raise ValueError(f"variant={variant!r} is not one of '', 'tiny'")
    config = ml_collections.ConfigDict()
    config.content_image = "chelsea"  # a name from cnn.tasks.style_transfer.EXAMPLE_IMAGES or a file path
    config.style_image = "hubble_deep_field"
    config.image_size = 192  # shorter side of the content image (and of the style image)
    config.weights = "random"
    config.depth = 19
    config.batch_norm = False
    config.pooling = "avg"  # Gatys et al. replace max pooling by average pooling for synthesis
    config.seed = 0
    # The paper's conv4_2 and conv1_1 ... conv5_1 are the rectified maps (Caffe's in-place ReLU).
    config.content_layer = "relu4_2"
    config.style_layers = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")
    # Weight of the style loss (content weight 1) in cnn.tasks.style_transfer's normalization. The
    # two terms' scales depend on the weights: 0.5 balances them for the random VGG-19 default.
    config.alpha = 0.5
    # Or the paper's alpha/beta (1e-3, 1e-4), converted for the image size; replaces alpha when set.
    config.content_style_ratio = ml_collections.config_dict.placeholder(float)
    # The paper's normalization: every filter scaled to mean activation 1 over the bundled images.
    config.rescale_weights = False
    config.tv_weight = 0.0
    config.init = "content"  # "content", "noise" (the paper) or "style"
    config.optimizers = ("lbfgs", "adam")  # each writes its own image and loss curve
    config.steps = 100
    config.learning_rate = 0.02  # Adam, pixel units ([0, 1] images)
    config.progress = True
    return config


def get_tiny_config() -> ml_collections.ConfigDict:
    """Seconds on a CPU: 32-pixel images, VGG-11, three layers, a few steps (for tests and notebooks)."""
    config = get_config()
    config.image_size = 32
    config.depth = 11
    config.content_layer = "relu3_1"
    config.style_layers = ("relu1_1", "relu2_1", "relu3_1")
    config.alpha = 0.2
    config.steps = 5
    config.init = "noise"
    config.progress = False
    return config
