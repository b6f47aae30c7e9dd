"""YOLO v1 (Redmon, Divvala, Girshick & Farhadi 2016, "You Only Look Once"), and a small variant.

The full network (the paper's Figure 3; 448x448x3 input, S = 7, B = 2, C = 20):

    layers            operation (all convs "same"-padded, leaky ReLU 0.1)          output
    conv1             7x7x64, stride 2                                             224x224x64
    pool1             max 2x2, stride 2                                            112x112x64
    conv2             3x3x192                                                      112x112x192
    pool2             max 2x2, stride 2                                            56x56x192
    conv3-6           1x1x128, 3x3x256, 1x1x256, 3x3x512                           56x56x512
    pool3             max 2x2, stride 2                                            28x28x512
    conv7-16          {1x1x256, 3x3x512} x 4, 1x1x512, 3x3x1024                    28x28x1024
    pool4             max 2x2, stride 2                                            14x14x1024
    conv17-22         {1x1x512, 3x3x1024} x 2, 3x3x1024, 3x3x1024 stride 2         7x7x1024
    conv23-24         3x3x1024, 3x3x1024                                           7x7x1024
    fc1               flatten (7*7*1024 = 50176) -> 4096, leaky ReLU 0.1, dropout 0.5
    fc2               4096 -> S*S*(B*5+C) = 1470, linear                           7x7x30

That is 24 convolutional and 2 fully connected layers; the 1x1 convolutions that alternate with
the 3x3 ones reduce the feature space (as in Lin et al.'s network in network / GoogLeNet).
Following the paper: leaky ReLU `max(x, 0.1 x)` after every layer but the last, which is linear;
dropout with rate 0.5 after the first fully connected layer (rng stream "dropout", active only
with `train=True`); no BatchNorm (`batch_norm=True` adds it after every convolution, as YOLO v2
later did). The paper pretrains the first 20 convolutions on ImageNet at 224x224 and doubles the
resolution for detection; here the network is trained from scratch.

Output layout. fc2 produces a vector of S*S*(B*5+C) numbers, reshaped row-major to
`[batch, S, S, B*5+C]`: element `((row * S + col) * (B*5+C) + k)` of the vector is channel `k` of
grid cell `(row, col)` (row = down the image, col = across). Within a cell, channels are

    [x_1, y_1, sqrt(w_1), sqrt(h_1), confidence_1, ..., x_B, y_B, sqrt(w_B), sqrt(h_B), confidence_B,
     Pr(class_1 | object), ..., Pr(class_C | object)]

with `x, y` the box centre relative to the cell (0..1 across it), `w, h` relative to the image,
and the network predicting the square roots of `w, h` directly, as the paper does so that the
squared error weighs small deviations in small boxes more. (Darknet's own file stores all cells'
class probabilities first, then the confidences, then the boxes; since fc2 is a dense layer the
two orders are the same model up to a permutation of its output units.) `cnn.tasks.detection`
encodes targets, computes the loss and decodes boxes in this layout.

`yolo_v1_tiny` keeps the design (7x7/2 stem, leaky ReLU 0.1, 3x3 convs alternating with 1x1
reductions, 2x2 pools, two fully connected layers, dropout after the first) at a size that trains
on a CPU in minutes: nine convolutions of 16..128 maps, like the paper's Fast YOLO, and a 256-unit
hidden layer. The fully connected head
makes the output S x S for any input size (fc1's kernel shape depends on the input size).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp

from cnn.models.layers import check_image_input, check_input, flatten
from cnn.models.registry import register

Dtype = Any
POOL = "pool"

# (features, kernel, stride) per convolution, POOL for a 2x2/2 max pool: the paper's Figure 3.
YOLO_V1_LAYERS: tuple[Any, ...] = (
    (64, 7, 2), POOL,
    (192, 3, 1), POOL,
    (128, 1, 1), (256, 3, 1), (256, 1, 1), (512, 3, 1), POOL,
    *((256, 1, 1), (512, 3, 1)) * 4, (512, 1, 1), (1024, 3, 1), POOL,
    *((512, 1, 1), (1024, 3, 1)) * 2, (1024, 3, 1), (1024, 3, 2),
    (1024, 3, 1), (1024, 3, 1),
)
# The CPU variant, after the paper's Fast YOLO (9 convolutional layers): the full network's
# 7x7/2 stem and 1x1 reductions, 16..128 maps, 4 halvings (a 64x64 input reaches the head as
# 4x4x128). The strided 7x7 stem matters on CPUs too: a stride-1 3x3 first layer at full
# resolution costs more in the backward pass than all the rest of this network.
YOLO_V1_TINY_LAYERS: tuple[Any, ...] = (
    (16, 7, 2), POOL,
    (32, 3, 1), POOL,
    (64, 3, 1), (32, 1, 1), (64, 3, 1), POOL,
    (128, 3, 1), (64, 1, 1), (128, 3, 1), (128, 3, 1),
)

# He initialization for the leaky-ReLU convolutions (the paper does not state its init).
_conv_init = nn.initializers.variance_scaling(2.0, "fan_in", "truncated_normal")


def _downsampling(layers: Sequence[Any]) -> int:
    factor = 1
    for layer in layers:
        factor *= 2 if layer == POOL else layer[2]
    return factor


class YOLOv1(nn.Module):
    """YOLO v1: images `[batch, height, width, channels]` -> `[batch, S, S, B*5 + C]`.

    Attributes:
      num_classes: C, the object classes (20 for PASCAL VOC).
      grid_size: S, the grid is S x S cells.
      boxes_per_cell: B, boxes predicted per cell.
      layers: the convolutional trunk, `(features, kernel, stride)` per conv or `POOL`
        (default: the paper's 24 convolutions, `YOLO_V1_LAYERS`).
      hidden_units: width of the first fully connected layer (4096 in the paper).
      dropout_rate: dropout after the first fully connected layer (0.5 in the paper).
      negative_slope: the leaky ReLU's slope for x < 0 (0.1 in the paper).
      batch_norm: BatchNorm after every convolution (not in the paper; adds `batch_stats`).
      dtype: computation dtype; param_dtype: parameter storage dtype.
    """

    num_classes: int = 20
    grid_size: int = 7
    boxes_per_cell: int = 2
    layers: tuple[Any, ...] = YOLO_V1_LAYERS
    hidden_units: int = 4096
    dropout_rate: float = 0.5
    negative_slope: float = 0.1
    batch_norm: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    canonical_input_shape: ClassVar[tuple[int, int, int]] = (448, 448, 3)

    @property
    def cell_channels(self) -> int:
        """B*5 + C: the channels of one grid cell's prediction."""
        return self.boxes_per_cell * 5 + self.num_classes

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        check_image_input(self, x, first_conv="conv1", model="yolo_v1")
        for name, value in (("num_classes", self.num_classes), ("grid_size", self.grid_size),
                            ("boxes_per_cell", self.boxes_per_cell)):
            if int(value) < 1:
                raise ValueError(f"yolo_v1: {name}={value!r} must be a positive integer")
        check_input(x, model="yolo_v1", min_size=_downsampling(self.layers),
                    why="every pool and strided convolution halves the side")
        activation = lambda y: nn.leaky_relu(y, self.negative_slope)  # noqa: E731
        conv_index = pool_index = 0
        for layer in self.layers:
            if layer == POOL:
                pool_index += 1
                x = nn.max_pool(x, (2, 2), (2, 2))
                continue
            conv_index += 1
            features, kernel, stride = layer
            x = nn.Conv(
                features, (kernel, kernel), strides=stride, padding=kernel // 2,
                use_bias=not self.batch_norm, kernel_init=_conv_init,
                dtype=self.dtype, param_dtype=self.param_dtype, name=f"conv{conv_index}",
            )(x)
            if self.batch_norm:
                x = nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype,
                                 param_dtype=self.param_dtype, name=f"bn{conv_index}")(x)
            x = activation(x)
        x = flatten(x)
        x = nn.Dense(self.hidden_units, dtype=self.dtype, param_dtype=self.param_dtype, name="fc1")(x)
        x = activation(x)
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        s = self.grid_size
        x = nn.Dense(s * s * self.cell_channels, dtype=self.dtype, param_dtype=self.param_dtype, name="fc2")(x)
        # Row-major: cell (row, col) owns the contiguous slice [(row*S + col) * (B*5+C), ... + B*5+C).
        return x.reshape(x.shape[0], s, s, self.cell_channels)


@register("yolo_v1")
def yolo_v1(
    *,
    num_classes: int = 20,
    grid_size: int = 7,
    boxes_per_cell: int = 2,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    **options: Any,
) -> YOLOv1:
    """The paper's network: 448x448x3 -> 7x7x30 at the defaults (24 conv + 2 FC layers)."""
    return YOLOv1(num_classes=num_classes, grid_size=grid_size, boxes_per_cell=boxes_per_cell,
                  dtype=dtype, param_dtype=param_dtype, **options)


@register("yolo_v1_tiny")
def yolo_v1_tiny(
    *,
    num_classes: int = 20,
    grid_size: int = 7,
    boxes_per_cell: int = 2,
    hidden_units: int = 256,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    **options: Any,
) -> YOLOv1:
    """The CPU variant: 9 conv (16-128 maps) + 2 FC (256 hidden) layers, any input side >= 16."""
    options.setdefault("layers", YOLO_V1_TINY_LAYERS)
    return YOLOv1(num_classes=num_classes, grid_size=grid_size, boxes_per_cell=boxes_per_cell,
                  hidden_units=hidden_units, dtype=dtype, param_dtype=param_dtype, **options)


__all__ = ["POOL", "YOLOv1", "YOLO_V1_LAYERS", "YOLO_V1_TINY_LAYERS", "yolo_v1", "yolo_v1_tiny"]
