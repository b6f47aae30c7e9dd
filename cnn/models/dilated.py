"""Dilated convolutions for dense prediction (Yu & Koltun 2016): the front end and the context module.

    front = cnn.models.create("dilated_frontend", num_classes=21)               # VGG16-based
    joint = cnn.models.create("dilated_context", num_classes=21, context="large")
    module = ContextModule("basic")              # C -> C maps, identity at initialization

Front end. VGG16 adapted to dense prediction: the last two poolings (pool4, pool5) are removed
and the convolutions after them are dilated instead, conv5 by 2 and fc6 (a 7x7 convolution, VGG's
fc6 recast) by 4, so the receptive fields stay those of the classifier while the output keeps
stride 8. fc7 is 1x1, `final` (1x1, N(0, 0.001) init) scores the classes. The stride-8 scores are
upsampled 8x by a fixed bilinear transposed convolution (kernel 16, padding 4, as the reference
Caffe model's frozen deconvolution) and cropped to the input. The parameters are named like
VGG16's (`features/conv{b}_{i}`, `fc6`, `fc7`), so `cnn.models.fcn.vgg_to_fcn_params` moves a
VGG16 classifier's weights in (fc6's 7x7 kernel is used dilated). Deviation from the paper: its
front end drops the padding of the intermediate maps and reflection-pads the input instead;
here every convolution pads by its dilation (sizes kept), so any input size gives scores at its
resolution.

Context module (Table 1 of the paper): 7 layers of 3x3 convolutions with dilations 1, 1, 2, 4, 8,
16, 1, each followed by truncation max(., 0), then a 1x1 convolution, all padded to keep the
size. Receptive fields 3, 5, 9, 17, 33, 65, 67, 67. "basic" keeps C channels throughout; "large"
widens to 2C, 2C, 4C, 8C, 16C, 32C, 32C, then C. Identity initialization (Eq. 2-3): a layer
from `c_in` to `c_out = c_in` channels is the identity (centre tap, channel a to channel a); one
from `c_in` to `c_out != c_in` gives output `b` the weight `C / c_out` from every input `a` with
`floor(a C / c_in) == floor(b C / c_out)` (plus small noise elsewhere, which breaks the symmetry
between replicated channels; `noise_scale` times `C / c_out`). Biases start at 0. Because
truncation leaves non-negative maps unchanged and the channel replications average back
exactly, an untrained module returns any non-negative input unchanged (exactly in exact
arithmetic; floating point is exact for the basic variant, and for the large one on inputs whose
partial sums are representable). As in the reference model the module reads the front end's
class scores, whose negative entries the first truncation clips.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cnn.models.fcn import BilinearUpsample, Grid, VGGTrunk, crop_to_input, vgg_trunk_grids
from cnn.models.layers import check_image_input, check_input, kaiming_fan_out
from cnn.models.registry import register
from cnn.models.vgg import BLOCK_FEATURES, CONVS_PER_BLOCK

Dtype = Any

CONTEXT_DILATIONS = (1, 1, 2, 4, 8, 16, 1)
CONTEXT_VARIANTS = ("basic", "large")
LARGE_MULTIPLIERS = (2, 2, 4, 8, 16, 32, 32)
# Table 1 of Yu & Koltun (2016): the receptive field after each of the 8 layers.
CONTEXT_RECEPTIVE_FIELDS = (3, 5, 9, 17, 33, 65, 67, 67)
FRONTEND_POOLS = (True, True, True, False, False)
FRONTEND_DILATIONS = (1, 1, 1, 1, 2)


def context_channels(variant: str, channels: int, num_layers: int = len(CONTEXT_DILATIONS)) -> list[int]:
    """Output channels of the context module's 3x3 layers (the final 1x1 layer has `channels`)."""
    if variant not in CONTEXT_VARIANTS:
        raise ValueError(f"variant={variant!r} is not a context module variant; valid: {list(CONTEXT_VARIANTS)}")
    if variant == "basic":
        return [channels] * num_layers
    if num_layers > len(LARGE_MULTIPLIERS):
        raise ValueError(f"the large context module has at most {len(LARGE_MULTIPLIERS)} 3x3 layers, got {num_layers}")
    return [m * channels for m in LARGE_MULTIPLIERS[:num_layers]]


def identity_kernel(
    kernel_size: int, in_channels: int, out_channels: int, base_channels: int
) -> np.ndarray:
    """Yu & Koltun's identity initialization of one layer, `[k, k, in_channels, out_channels]`.

    Equal channel counts: the identity (Eq. 2). Otherwise (Eq. 3) output `b` reads every input `a`
    with `floor(a C / c_in) == floor(b C / c_out)` at the centre tap with weight `C / c_out`,
    where `C = base_channels` is the module's input width.
    """
    kernel = np.zeros((kernel_size, kernel_size, in_channels, out_channels), np.float64)
    centre = kernel_size // 2
    if in_channels == out_channels:
        kernel[centre, centre] = np.eye(in_channels)
        return kernel
    groups_in = (np.arange(in_channels) * base_channels) // in_channels
    groups_out = (np.arange(out_channels) * base_channels) // out_channels
    kernel[centre, centre] = (groups_in[:, None] == groups_out[None, :]) * (base_channels / out_channels)
    return kernel


def _identity_init(base_channels: int, noise_scale: float):
    def init(key: jax.Array, shape: Sequence[int], dtype: Any) -> jax.Array:
        kernel_size, _, in_channels, out_channels = shape
        kernel = jnp.asarray(identity_kernel(kernel_size, in_channels, out_channels, base_channels), dtype)
        if in_channels == out_channels or noise_scale == 0:
            return kernel
        noise = noise_scale * (base_channels / out_channels) * jax.random.normal(key, shape, dtype)
        return jnp.where(kernel != 0, kernel, noise)

    return init


class ContextModule(nn.Module):
    """The context module: `[batch, h, w, C] -> [batch, h, w, C]`, multi-scale context by
    exponentially growing dilations (see the module docstring).

    Attributes:
      variant: "basic" (C channels) or "large" (up to 32C).
      dilations: dilations of the 3x3 layers (the paper's 1, 1, 2, 4, 8, 16, 1).
      identity_init: the paper's identity initialization (otherwise He-normal kernels).
      noise_scale: std of the symmetry-breaking noise of the widening layers, in units of
        `C / c_out` (large variant; 0 for an exact identity).
    """

    variant: str = "basic"
    dilations: Sequence[int] = CONTEXT_DILATIONS
    identity_init: bool = True
    noise_scale: float = 0.01
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self):
        context_channels(self.variant, 1, len(self.dilations))  # validates the variant and length
        if any(int(d) < 1 for d in self.dilations):
            raise ValueError(f"dilations={tuple(self.dilations)!r} must all be >= 1")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Layers `ctx_conv1..7` (3x3, dilated, truncated) and `ctx_final` (1x1)."""
        channels = x.shape[-1]
        init = _identity_init(channels, self.noise_scale) if self.identity_init else kaiming_fan_out
        for index, (dilation, features) in enumerate(
            zip(self.dilations, context_channels(self.variant, channels, len(self.dilations))), start=1
        ):
            x = nn.Conv(
                features, (3, 3), padding=int(dilation), kernel_dilation=int(dilation), kernel_init=init,
                dtype=self.dtype, param_dtype=self.param_dtype, name=f"ctx_conv{index}",
            )(x)
            x = nn.relu(x)
        return nn.Conv(
            channels, (1, 1), kernel_init=init, dtype=self.dtype, param_dtype=self.param_dtype, name="ctx_final"
        )(x)


class DilatedNet(nn.Module):
    """The dilated front end, optionally followed by the context module:
    `[batch, h, w, c] -> [batch, h, w, num_classes]`.

    Attributes:
      num_classes: output classes.
      widths, convs_per_block: the VGG trunk (VGG16 by default).
      fc_width: channels of fc6 and fc7 (4096).
      fc6_kernel, fc6_dilation: fc6's kernel (7) and dilation (4); padded to keep the size.
      dropout_rate: dropout after fc6 and fc7 (rng stream "dropout").
      batch_norm: BatchNorm in the trunk (not in the paper; helps training from scratch).
      context: None (front end only), "basic" or "large".
      context_noise_scale: `ContextModule.noise_scale`.
    """

    num_classes: int = 21
    widths: Sequence[int] = BLOCK_FEATURES
    convs_per_block: Sequence[int] = CONVS_PER_BLOCK[16]
    fc_width: int = 4096
    fc6_kernel: int = 7
    fc6_dilation: int = 4
    dropout_rate: float = 0.5
    batch_norm: bool = False
    context: str | None = None
    context_noise_scale: float = 0.01
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    canonical_input_shape: ClassVar[tuple[int, int, int]] = (500, 500, 3)
    output_stride: ClassVar[int] = 8

    def __post_init__(self):
        if len(self.widths) != 5 or len(self.convs_per_block) != 5:
            raise ValueError(
                f"widths={tuple(self.widths)!r} and convs_per_block={tuple(self.convs_per_block)!r} need 5 blocks"
            )
        if self.fc6_kernel < 1 or self.fc6_kernel % 2 == 0:
            raise ValueError(f"fc6_kernel={self.fc6_kernel} must be odd (a padded, size-keeping convolution)")
        if self.context is not None and self.context not in CONTEXT_VARIANTS:
            raise ValueError(f"context={self.context!r} must be None or one of {list(CONTEXT_VARIANTS)}")
        super().__post_init__()

    @property
    def registry_name(self) -> str:
        """The registered name, quoted in error messages."""
        return "dilated_frontend" if self.context is None else f"dilated_context ({self.context})"

    def score_grid(self) -> Grid:
        """Where the stride-8 scores sit on the input (unit `i` at `3.5 + 8 i`)."""
        return vgg_trunk_grids(self.convs_per_block, pools=FRONTEND_POOLS, dilations=FRONTEND_DILATIONS)["pool5"]

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        check_image_input(self, x, first_conv="features/conv1_1")
        check_input(x, model=self.registry_name, min_size=1)
        height, width = x.shape[1:3]
        x = VGGTrunk(
            self.widths, self.convs_per_block, pools=FRONTEND_POOLS, dilations=FRONTEND_DILATIONS, ceil_mode=True,
            batch_norm=self.batch_norm, dtype=self.dtype, param_dtype=self.param_dtype, name="features",
        )(x, train=train)

        def conv(features: int, kernel: int, dilation: int, name: str, **kwargs):
            return nn.Conv(
                features, (kernel, kernel), padding=dilation * (kernel - 1) // 2, kernel_dilation=dilation,
                dtype=self.dtype, param_dtype=self.param_dtype, name=name, **kwargs,
            )

        dropout = nn.Dropout(self.dropout_rate, deterministic=not train)
        fc6 = conv(self.fc_width, self.fc6_kernel, self.fc6_dilation, "fc6", kernel_init=kaiming_fan_out)
        x = dropout(nn.relu(fc6(x)))
        x = dropout(nn.relu(conv(self.fc_width, 1, 1, "fc7", kernel_init=kaiming_fan_out)(x)))
        x = conv(self.num_classes, 1, 1, "final", kernel_init=nn.initializers.normal(0.001))(x)
        if self.context is not None:
            x = ContextModule(
                self.context, noise_scale=self.context_noise_scale, dtype=self.dtype, param_dtype=self.param_dtype,
                name="context",
            )(x)
        upsample = BilinearUpsample(
            self.output_stride, padding=self.output_stride // 2, learnable=False, dtype=self.dtype, name="upsample"
        )
        scores = upsample(x)
        return crop_to_input(scores, upsample.grid(self.score_grid()), (height, width), model=self.registry_name)


@register("dilated_frontend")
def dilated_frontend(**options: Any) -> DilatedNet:
    """The dilated VGG16 front end (Yu & Koltun 2016); options as `DilatedNet`."""
    return DilatedNet(**{"context": None, **options})


@register("dilated_context")
def dilated_context(**options: Any) -> DilatedNet:
    """Front end + context module ("basic" unless `context="large"`); options as `DilatedNet`."""
    return DilatedNet(**{"context": "basic", **options})


__all__ = [
    "CONTEXT_DILATIONS",
    "CONTEXT_RECEPTIVE_FIELDS",
    "CONTEXT_VARIANTS",
    "ContextModule",
    "DilatedNet",
    "context_channels",
    "dilated_context",
    "dilated_frontend",
    "identity_kernel",
]
