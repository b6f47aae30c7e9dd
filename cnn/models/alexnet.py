"""AlexNet in torchvision's single-tower layout (61,100,840 parameters at 1000 classes).

    layer          operation                               output (224 input)   torchvision name
    features/conv1 64 kernels 11x11, stride 4, pad 2, ReLU  55x55x64             features.0
    pool1          max 3x3, stride 2                        27x27x64
    features/conv2 192 kernels 5x5, pad 2, ReLU             27x27x192            features.3
    pool2          max 3x3, stride 2                        13x13x192
    features/conv3 384 kernels 3x3, pad 1, ReLU             13x13x384            features.6
    features/conv4 256 kernels 3x3, pad 1, ReLU             13x13x256            features.8
    features/conv5 256 kernels 3x3, pad 1, ReLU             13x13x256            features.10
    pool5          max 3x3, stride 2                        6x6x256
    avgpool        adaptive average to 6x6                  6x6x256
    classifier     dropout, fc6 9216->4096, ReLU,           num_classes          classifier.1/.4/.6
                   dropout, fc7 4096->4096, ReLU, fc8

The adaptive pooling makes any input of at least 63x63 valid (pool5 needs a 3x3 map).
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp

from cnn.models.layers import (
    AdaptiveAvgPool,
    MaxPool,
    check_image_input,
    check_input,
    conv_output_size,
    flatten,
    minimum_input_size,
    pool_output_size,
    torch_linear_init,
)
from cnn.models.registry import register

Dtype = Any

# (name, features, kernel, stride, padding, max-pool after)
ALEXNET_CONVS = (
    ("conv1", 64, 11, 4, 2, True),
    ("conv2", 192, 5, 1, 2, True),
    ("conv3", 384, 3, 1, 1, False),
    ("conv4", 256, 3, 1, 1, False),
    ("conv5", 256, 3, 1, 1, True),
)


def alexnet_sizes(n: int) -> list[int]:
    """Side lengths after every conv and pool of the trunk for an input side `n`."""
    sizes = []
    for _, _, kernel, stride, padding, pool in ALEXNET_CONVS:
        n = conv_output_size(n, kernel, stride, padding)
        sizes.append(n)
        if pool:
            n = pool_output_size(n, 3, 2)
            sizes.append(n)
    return sizes


ALEXNET_MIN_INPUT = minimum_input_size(alexnet_sizes)


class AlexNetFeatures(nn.Module):
    """The convolutional trunk: `[batch, h, w, 3] -> [batch, h', w', 256]` (6x6 at 224)."""

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        del train
        for index, (name, features, kernel, stride, padding, pool) in enumerate(ALEXNET_CONVS):
            x = nn.Conv(
                features, (kernel, kernel), strides=stride, padding=padding,
                dtype=self.dtype, param_dtype=self.param_dtype, name=name,
            )(x)
            x = nn.relu(x)
            if pool:
                x = MaxPool(3, 2, name=f"pool{index + 1}")(x)
        return x


class AlexNetClassifier(nn.Module):
    """`[batch, 6, 6, 256] -> [batch, num_classes]`: dropout, fc6, ReLU, dropout, fc7, ReLU, fc8.

    `hidden` is the width of fc6 and fc7 (4096 in AlexNet).
    """

    num_classes: int = 1000
    dropout_rate: float = 0.5
    hidden: int = 4096
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        dense = lambda features, name: nn.Dense(  # noqa: E731
            features, kernel_init=torch_linear_init, dtype=self.dtype, param_dtype=self.param_dtype, name=name
        )
        x = flatten(x)
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = nn.relu(dense(self.hidden, "fc6")(x))
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = nn.relu(dense(self.hidden, "fc7")(x))
        return dense(self.num_classes, "fc8")(x)


@register("alexnet")
class AlexNet(nn.Module):
    """AlexNet (torchvision layout): `[batch, h, w, 3] -> [batch, num_classes]`, h, w >= 63.

    Attributes:
      num_classes: output classes.
      dropout_rate: dropout before fc6 and fc7 (rng stream "dropout" when `train=True`).
      classifier_width: units of fc6 and fc7 (4096 as published; the count above assumes it).
      dtype: computation dtype; param_dtype: parameter storage dtype.
    """

    num_classes: int = 1000
    dropout_rate: float = 0.5
    classifier_width: int = 4096
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    canonical_input_shape: ClassVar[tuple[int, int, int]] = (224, 224, 3)

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        check_image_input(self, x, first_conv="features/conv1", model="alexnet")
        check_input(x, model="alexnet", min_size=ALEXNET_MIN_INPUT)
        x = AlexNetFeatures(self.dtype, self.param_dtype, name="features")(x, train=train)
        x = AdaptiveAvgPool((6, 6), name="avgpool")(x)
        return AlexNetClassifier(
            self.num_classes, self.dropout_rate, self.classifier_width, self.dtype, self.param_dtype,
            name="classifier",
        )(x, train=train)
