"""GoogLeNet / Inception v1 (Szegedy et al. 2015) in torchvision's layout.

    stage         operation                                              output (224 input)
    conv1         7x7/2 conv (64), BN, ReLU                              112x112x64
    maxpool1      3x3/2 max (ceil mode)                                  56x56x64
    conv2, conv3  1x1 conv (64), 3x3 conv (192)                          56x56x192
    maxpool2      3x3/2 max (ceil mode)                                  28x28x192
    inception3a,b                                                        28x28x256, 28x28x480
    maxpool3      3x3/2 max (ceil mode)                                  14x14x480
    inception4a..e  (aux1 reads 4a, aux2 reads 4d)                       14x14x512 .. 14x14x832
    maxpool4      2x2/2 max (ceil mode)                                  7x7x832
    inception5a,b                                                        7x7x832, 7x7x1024
    global average pool, dropout 0.2, fc 1024 -> num_classes

An Inception module concatenates four branches along channels: a 1x1 conv; 1x1 reduce then
3x3; 1x1 reduce then a "5x5" branch; 3x3/1 max pool then 1x1 projection. Every conv is
conv (no bias) + BN (eps 1e-3) + ReLU ("BasicConv2d"). torchvision's "5x5" branch actually uses a
3x3 kernel; its parameter count 6,624,904 (1000 classes, no aux heads) depends on that, so
`branch3_kernel_size=3` is the default and 5 gives the paper's kernel.

The auxiliary heads (`aux_logits=True`; +6,379,984 params at 1000 classes, 13,004,888 in all)
are 4x4 adaptive average pool, 1x1 conv (128), fc 2048 -> 1024, ReLU, dropout 0.7, fc. As in
torchvision they only run when training: with `train=True` the model returns
`GoogLeNetOutput(logits, aux1, aux2)` (the paper weights the auxiliary losses by 0.3), with
`train=False` it returns the logits.
"""

from __future__ import annotations

from typing import Any, ClassVar, NamedTuple

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
)
from cnn.models.registry import register

Dtype = Any

_trunc_normal = nn.initializers.truncated_normal(0.01)  # torchvision's GoogLeNet init (std 0.01)

# name: (1x1, 3x3 reduce, 3x3, "5x5" reduce, "5x5", pool projection)
INCEPTION_CONFIGS = {
    "inception3a": (64, 96, 128, 16, 32, 32),
    "inception3b": (128, 128, 192, 32, 96, 64),
    "inception4a": (192, 96, 208, 16, 48, 64),
    "inception4b": (160, 112, 224, 24, 64, 64),
    "inception4c": (128, 128, 256, 24, 64, 64),
    "inception4d": (112, 144, 288, 32, 64, 64),
    "inception4e": (256, 160, 320, 32, 128, 128),
    "inception5a": (256, 160, 320, 32, 128, 128),
    "inception5b": (384, 192, 384, 48, 128, 128),
}


class GoogLeNetOutput(NamedTuple):
    """Training-time outputs with auxiliary heads, each `[batch, num_classes]`."""

    logits: jnp.ndarray
    aux1: jnp.ndarray
    aux2: jnp.ndarray


def googlenet_sizes(n: int) -> list[int]:
    """Side lengths after conv1 and the four max pools for an input side `n` (224 -> 112, 56, 28, 14, 7)."""
    sizes = [conv_output_size(n, 7, 2, 3)]
    for window in (3, 3, 3, 2):
        sizes.append(pool_output_size(sizes[-1], window, 2, ceil_mode=True))
    return sizes


GOOGLENET_MIN_INPUT = minimum_input_size(googlenet_sizes)


class BasicConv(nn.Module):
    """conv (no bias) + BatchNorm (eps 1e-3) + ReLU: `[b, h, w, c] -> [b, h', w', features]`."""

    features: int
    kernel_size: int = 1
    strides: int = 1
    padding: int = 0
    bn_axis_name: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        x = nn.Conv(
            self.features, (self.kernel_size, self.kernel_size), strides=self.strides, padding=self.padding,
            use_bias=False, kernel_init=_trunc_normal, dtype=self.dtype, param_dtype=self.param_dtype, name="conv",
        )(x)
        x = nn.BatchNorm(
            use_running_average=not train, momentum=0.9, epsilon=1e-3, axis_name=self.bn_axis_name,
            dtype=self.dtype, param_dtype=self.param_dtype, name="bn",
        )(x)
        return nn.relu(x)


class Inception(nn.Module):
    """Four parallel branches concatenated on channels: `[b,h,w,c] -> [b,h,w,sum of branch widths]`.

    Branch modules: `branch1`; `branch2_reduce`, `branch2_conv`; `branch3_reduce`, `branch3_conv`;
    `branch4_proj` (after a 3x3/1 max pool).
    """

    widths: tuple[int, int, int, int, int, int]
    branch3_kernel_size: int = 3
    bn_axis_name: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        ch1, ch3_reduce, ch3, ch5_reduce, ch5, pool_proj = self.widths
        conv = lambda features, name, kernel=1: BasicConv(  # noqa: E731
            features, kernel, padding=kernel // 2, bn_axis_name=self.bn_axis_name,
            dtype=self.dtype, param_dtype=self.param_dtype, name=name,
        )
        k5 = self.branch3_kernel_size
        branch1 = conv(ch1, "branch1")(x, train=train)
        branch2 = conv(ch3, "branch2_conv", 3)(conv(ch3_reduce, "branch2_reduce")(x, train=train), train=train)
        branch3 = conv(ch5, "branch3_conv", k5)(conv(ch5_reduce, "branch3_reduce")(x, train=train), train=train)
        branch4 = MaxPool(3, 1, padding=1, ceil_mode=True, name="branch4_pool")(x)
        branch4 = conv(pool_proj, "branch4_proj")(branch4, train=train)
        return jnp.concatenate([branch1, branch2, branch3, branch4], axis=-1)


class InceptionAux(nn.Module):
    """Auxiliary classifier: `[b, h, w, c] -> [b, num_classes]` via 4x4 pool, 1x1 conv, two fcs."""

    num_classes: int = 1000
    dropout_rate: float = 0.7
    bn_axis_name: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        x = AdaptiveAvgPool((4, 4))(x)
        x = BasicConv(
            128, 1, bn_axis_name=self.bn_axis_name, dtype=self.dtype, param_dtype=self.param_dtype, name="conv"
        )(x, train=train)
        dense = lambda features, name: nn.Dense(  # noqa: E731
            features, kernel_init=_trunc_normal, dtype=self.dtype, param_dtype=self.param_dtype, name=name
        )
        x = nn.relu(dense(1024, "fc1")(flatten(x)))
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return dense(self.num_classes, "fc2")(x)


@register("googlenet", "inception_v1")
class GoogLeNet(nn.Module):
    """GoogLeNet: `[batch, h, w, 3] -> [batch, num_classes]` (224 canonical, any h, w >= 15).

    Attributes:
      num_classes: output classes.
      aux_logits: build the two auxiliary heads (run only when `train=True`, see module doc).
      branch3_kernel_size: kernel of the "5x5" branch (3 as in torchvision, 5 as in the paper).
      dropout_rate: dropout before the final fc.
      transform_input: re-normalize ImageNet-normalized input as torchvision does for its
        pretrained GoogLeNet (needed only with weights converted from torchvision).
      bn_axis_name: pmap/shard axis over which BatchNorm averages its statistics, if any.
      dtype: computation dtype; param_dtype: parameter storage dtype.
    """

    num_classes: int = 1000
    aux_logits: bool = False
    branch3_kernel_size: int = 3
    dropout_rate: float = 0.2
    transform_input: bool = False
    bn_axis_name: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    canonical_input_shape: ClassVar[tuple[int, int, int]] = (224, 224, 3)

    def __post_init__(self):
        if self.branch3_kernel_size not in (3, 5):
            raise ValueError(f"branch3_kernel_size={self.branch3_kernel_size!r} must be 3 (torchvision) or 5 (paper)")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray | GoogLeNetOutput:
        check_image_input(
            self, x, first_conv="conv1/conv", model="googlenet", channels=3 if self.transform_input else None
        )
        check_input(x, model="googlenet", min_size=GOOGLENET_MIN_INPUT)
        if self.transform_input:
            # torchvision: from ImageNet mean/std normalization to (x - 0.5) / 0.5 per channel.
            mean = jnp.array([0.485, 0.456, 0.406], x.dtype)
            std = jnp.array([0.229, 0.224, 0.225], x.dtype)
            x = (x * std + mean - 0.5) / 0.5
        common = dict(bn_axis_name=self.bn_axis_name, dtype=self.dtype, param_dtype=self.param_dtype)
        x = BasicConv(64, 7, strides=2, padding=3, name="conv1", **common)(x, train=train)
        x = MaxPool(3, 2, ceil_mode=True, name="maxpool1")(x)
        x = BasicConv(64, 1, name="conv2", **common)(x, train=train)
        x = BasicConv(192, 3, padding=1, name="conv3", **common)(x, train=train)
        x = MaxPool(3, 2, ceil_mode=True, name="maxpool2")(x)

        def inception(name: str, x: jnp.ndarray) -> jnp.ndarray:
            return Inception(INCEPTION_CONFIGS[name], self.branch3_kernel_size, name=name, **common)(x, train=train)

        # The aux heads also run at initialization so that their params exist for later training.
        run_aux = self.aux_logits and (train or self.is_initializing())
        x = inception("inception3b", inception("inception3a", x))
        x = MaxPool(3, 2, ceil_mode=True, name="maxpool3")(x)
        x = inception("inception4a", x)
        aux1 = InceptionAux(self.num_classes, name="aux1", **common)(x, train=train) if run_aux else None
        x = inception("inception4d", inception("inception4c", inception("inception4b", x)))
        aux2 = InceptionAux(self.num_classes, name="aux2", **common)(x, train=train) if run_aux else None
        x = inception("inception4e", x)
        x = MaxPool(2, 2, ceil_mode=True, name="maxpool4")(x)
        x = inception("inception5b", inception("inception5a", x))
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        logits = nn.Dense(
            self.num_classes, kernel_init=_trunc_normal, dtype=self.dtype, param_dtype=self.param_dtype, name="fc"
        )(x)
        if self.aux_logits and train:
            return GoogLeNetOutput(logits, aux1, aux2)
        return logits
