"""SegNet (Badrinarayanan, Kendall & Cipolla 2017): an encoder-decoder that upsamples with the
encoder's max-pooling indices.

    model = cnn.models.create("segnet", num_classes=11)                          # VGG16-bn encoder
    small = cnn.models.create("segnet", num_classes=4, widths=(16, 32, 64), convs_per_block=(2, 2, 2))

Encoder: VGG16's 13 3x3 convolutions, each followed by BatchNorm and ReLU, in blocks ending in
2x2/2 max pooling that remembers where each maximum was (`cnn.ops.max_pool_with_argmax`).
Parameters are named as in `cnn.models.vgg.VGGFeatures(batch_norm=True)` (`conv{b}_{i}`,
`bn{b}_{i}`), so VGG16-bn weights load into the encoder.

Decoder: the mirror image. Each block first puts its input back at the positions the encoder's
matching pool took its maxima from (`cnn.ops.max_unpool`, zeros elsewhere: a sparse map), then
densifies it with 3x3 convolutions + BatchNorm + ReLU (`conv{b}_{i}_D`, numbered like the
reference Caffe model: `conv5_3_D` first). The last decoder block's first conv maps to the
classes (no BatchNorm or ReLU): `[batch, h, w, c] -> [batch, h, w, num_classes]`. No
upsampling weights are learned and no encoder maps are copied to the decoder, only indices.

Odd sizes: a pool over an odd side pads its last row/column with -inf (which never wins), so it
covers every pixel (`ceil(h / 2)` outputs), and its unpooling restores the exact pre-pool size.
Any input of at least 1x1 gives scores at the input resolution.

The pooling indices, the decoder maps about to be unpooled and the unpooled maps are recorded
with `sow` in the "intermediates" collection (`pool{b}_indices`, `unpool{b}_values`,
`unpool{b}`; apply with `mutable=["intermediates"]` to see them).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnn import ops
from cnn.models.layers import check_image_input, check_input, kaiming_fan_out
from cnn.models.registry import register
from cnn.models.vgg import BLOCK_FEATURES, CONVS_PER_BLOCK

Dtype = Any


def segnet_pool(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """2x2/2 max pooling with argmax that covers odd sides: `[b, h, w, c] -> [b, ceil(h/2), ceil(w/2), c]`.

    Returns `(values, indices)`; `indices` are flat positions `row * w + col` in `x`'s channel.
    """
    pads = tuple((0, n % 2) for n in x.shape[1:3])
    return ops.max_pool_with_argmax(x, 2, 2, padding=pads)


class SegNet(nn.Module):
    """SegNet: `[batch, h, w, c] -> [batch, h, w, num_classes]`.

    Attributes:
      num_classes: output classes (11 for CamVid in the paper).
      widths: channels of each encoder block (VGG16: 64, 128, 256, 512, 512).
      convs_per_block: 3x3 convs per block (VGG16: 2, 2, 3, 3, 3); the decoder mirrors them.
      bn_axis_name: pmap/shard axis over which BatchNorm averages statistics, if any.
    """

    num_classes: int = 21
    widths: Sequence[int] = BLOCK_FEATURES
    convs_per_block: Sequence[int] = CONVS_PER_BLOCK[16]
    bn_axis_name: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    canonical_input_shape: ClassVar[tuple[int, int, int]] = (360, 480, 3)  # CamVid

    def __post_init__(self):
        if len(self.widths) != len(self.convs_per_block) or not self.widths:
            raise ValueError(
                f"widths={tuple(self.widths)!r} and convs_per_block={tuple(self.convs_per_block)!r} must be "
                "non-empty and of equal length (one entry per block)"
            )
        if any(int(v) < 1 for v in (*self.widths, *self.convs_per_block)):
            raise ValueError(
                f"widths={tuple(self.widths)!r} and convs_per_block={tuple(self.convs_per_block)!r} must be >= 1"
            )
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        check_image_input(self, x, first_conv="conv1_1", model="segnet")
        check_input(x, model="segnet", min_size=1)

        def conv_bn_relu(x, features: int, name: str, bn_name: str):
            x = nn.Conv(
                features, (3, 3), padding=1, kernel_init=kaiming_fan_out, dtype=self.dtype,
                param_dtype=self.param_dtype, name=name,
            )(x)
            x = nn.BatchNorm(
                use_running_average=not train, momentum=0.9, epsilon=1e-5, axis_name=self.bn_axis_name,
                dtype=self.dtype, param_dtype=self.param_dtype, name=bn_name,
            )(x)
            return nn.relu(x)

        remembered = []  # (indices, pre-pool shape) per block
        for block, (width, count) in enumerate(zip(self.widths, self.convs_per_block), start=1):
            for i in range(1, count + 1):
                x = conv_bn_relu(x, int(width), f"conv{block}_{i}", f"bn{block}_{i}")
            shape = x.shape
            x, indices = segnet_pool(x)
            self.sow("intermediates", f"pool{block}_indices", indices)
            remembered.append((indices, shape))

        for block in range(len(self.widths), 0, -1):
            indices, shape = remembered[block - 1]
            self.sow("intermediates", f"unpool{block}_values", x)
            x = ops.max_unpool(x, indices, shape)
            self.sow("intermediates", f"unpool{block}", x)
            count = int(self.convs_per_block[block - 1])
            for i in range(count, 0, -1):
                if i > 1:
                    x = conv_bn_relu(x, int(self.widths[block - 1]), f"conv{block}_{i}_D", f"bn{block}_{i}_D")
                elif block > 1:
                    x = conv_bn_relu(x, int(self.widths[block - 2]), f"conv{block}_{i}_D", f"bn{block}_{i}_D")
                else:  # the classifier: scores, no BatchNorm or ReLU
                    x = nn.Conv(
                        self.num_classes, (3, 3), padding=1, kernel_init=kaiming_fan_out, dtype=self.dtype,
                        param_dtype=self.param_dtype, name=f"conv{block}_{i}_D",
                    )(x)
        return x


register("segnet")(SegNet)

__all__ = ["SegNet", "segnet_pool"]
