"""LeCun's object-recognition ConvNet as drawn in the lecture, and LeNet-5 (LeCun et al. 1998).

LeCun ConvNet (`create("lecun_convnet")`), input `[batch, 83, 83, 1]`:

    layer   operation                                  output      weights                    biases
    conv1   64 kernels 9x9 on the 1 input map          64@75x75    64*9*9        =     5,184      64
    pool1   10x10 pooling, stride 5                    64@14x14    -                               -
    conv2   256 kernels 9x9, sparse: one kernel and    256@6x6     256*9*9       =    20,736     256
            one input map per output map
            (connections="table": 16 input maps each)              (256*16*9*9   =   331,776)
            (connections="full": every input map)                  (256*64*9*9   = 1,327,104)
    pool2   6x6 pooling, stride 4                      256@1x1     -                               -
    fc      fully connected 256 -> 101                 101         256*101       =    25,856     101

    weights: sparse 51,776, table 362,816, full 1,358,144; with biases (use_bias=True): 52,197,
    363,237 and 1,358,565.

The lecture's slide prints the classifier's weight count as "60916"; that is an arithmetic slip,
256 x 101 = 25,856. Side lengths follow `floor((n + 2p - f) / s) + 1`: 83 -> 75 -> 14 -> 6 -> 1.

Connection tables of conv2. `connections="sparse"` (default) is the table that gives the slide's
20,736 weights: output map `j` reads input map `floor(j / 4)` only (each of the 64 input maps
feeds 4 output maps), a grouped convolution with 64 groups, 64 times smaller than the full layer.
LeCun's original network (the 83x83 Caltech-101 net; Jarrett, Kavukcuoglu, Ranzato & LeCun 2009)
connects each of the 256 output maps to a random subset of 16 of the 64 input maps: 4,096 9x9
kernels, 331,776 weights. `connections="table"` builds such a table (`lecun_connection_table`: drawn
once from a fixed seed, balanced so that every input map feeds 64 output maps). So LeCun's table
makes the second layer 4 times smaller than the full one (1,327,104 weights), not 64 times; what
kept the nets of the lecture small is mainly weight sharing and pooling: conv2's 331,776 weights
compute 256 maps of 6x6 from 64 maps of 14x14, which a fully connected layer would need
64*14*14 * 256*6*6 = 115,605,504 weights for.

LeNet-5 (`create("lenet5")`), input `[batch, 32, 32, 1]` (MNIST digits padded by 2 pixels):

    layer   operation                                  output      parameters
    c1      6 kernels 5x5                              6@28x28     6*25 + 6          =    156
    s2      2x2 average subsampling                    6@14x14     -
    c3      16 kernels 5x5 over all 6 maps (full)      16@10x10    16*6*25 + 16      =  2,416
    s4      2x2 average subsampling                    16@5x5      -
    c5      120 kernels 5x5 over all 16 maps           120@1x1     120*16*25 + 120   = 48,120
    f6      fully connected 120 -> 84                  84          84*120 + 84       = 10,164
    output  fully connected 84 -> 10                   10          10*84 + 10        =    850
                                                                   total               61,706

The 1998 paper's C3 used a partial connection table, trainable subsampling coefficients and an
RBF output layer; the 61,706 count is the common modern form (full C3, parameter-free pooling,
linear output), which is what this module builds.

Both nets end in a fully connected layer that reads a 1x1 map, so they accept only the input sizes
that reduce to 1x1 there (83 to 102 for the LeCun ConvNet, 32 to 35 for LeNet-5).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from cnn.models.layers import AvgPool, MaxPool, check_image_input, check_input, conv_output_size, flatten, pool_output_size
from cnn.models.registry import register

Dtype = Any

_ACTIVATIONS: dict[str, Callable[[jnp.ndarray], jnp.ndarray]] = {"relu": nn.relu, "tanh": jnp.tanh}


def _check_choice(argument: str, value: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"{argument}={value!r} is not one of {sorted(choices)}")


def _valid_range(sizes_of: Callable[[int], list[int]], limit: int = 1024) -> tuple[int, int]:
    """The input sides for which every layer output is >= 1 and the last one is exactly 1."""
    valid = [n for n in range(1, limit) if min(sizes_of(n)) >= 1 and sizes_of(n)[-1] == 1]
    return valid[0], valid[-1]


def lecun_convnet_sizes(n: int) -> list[int]:
    """Side lengths after conv1, pool1, conv2, pool2 for an input side `n` (83 -> 75, 14, 6, 1)."""
    conv1 = conv_output_size(n, 9)
    pool1 = pool_output_size(conv1, 10, 5)
    conv2 = conv_output_size(pool1, 9)
    pool2 = pool_output_size(conv2, 6, 4)
    return [conv1, pool1, conv2, pool2]


def lenet5_sizes(n: int) -> list[int]:
    """Side lengths after c1, s2, c3, s4, c5 for an input side `n` (32 -> 28, 14, 10, 5, 1)."""
    c1 = conv_output_size(n, 5)
    s2 = pool_output_size(c1, 2, 2)
    c3 = conv_output_size(s2, 5)
    s4 = pool_output_size(c3, 2, 2)
    c5 = conv_output_size(s4, 5)
    return [c1, s2, c3, s4, c5]


def lecun_connection_table(inputs: int = 64, outputs: int = 256, fan_in: int = 16, seed: int = 0) -> np.ndarray:
    """A random connection table in the manner of LeCun's: `[outputs, fan_in]` input-map indices.

    Output map `j` reads the `fan_in` distinct input maps `table[j]`. Drawn from `seed` and
    balanced: each run of `inputs // fan_in` consecutive output maps splits one random
    permutation of the inputs, so every input map feeds `outputs * fan_in / inputs` output maps
    (64 for the default 64 -> 256 maps with 16 inputs each, Jarrett et al. 2009).

    Raises:
      ValueError: `fan_in` does not divide `inputs`, or `inputs // fan_in` does not divide `outputs`.
    """
    if not (1 <= fan_in <= inputs and inputs % fan_in == 0 and outputs % (inputs // fan_in) == 0):
        raise ValueError(
            f"fan_in={fan_in} must divide inputs={inputs}, and inputs // fan_in must divide outputs={outputs}"
        )
    generator = np.random.default_rng(seed)
    per_permutation = inputs // fan_in
    rows = [
        np.sort(part)
        for _ in range(outputs // per_permutation)
        for part in generator.permutation(inputs).reshape(per_permutation, fan_in)
    ]
    return np.stack(rows).astype(np.int32)


LECUN_CONVNET_INPUT_RANGE = _valid_range(lecun_convnet_sizes)
LENET5_INPUT_RANGE = _valid_range(lenet5_sizes)


@register("lecun_convnet")
class LeCunConvNet(nn.Module):
    """The lecture's 83x83 object-recognition ConvNet: `[batch, 83, 83, c] -> [batch, num_classes]`.

    Attributes:
      num_classes: output classes (101, Caltech-101, in the lecture).
      connections: "sparse" (one input map and 9x9 kernel per conv2 output map: the slide's
        20,736 weights), "table" (LeCun's: 16 input maps per output map, `lecun_connection_table`)
        or "full".
      use_bias: add a bias per output map/unit (the lecture's counts are weights only).
      activation: "relu" or "tanh", applied after each convolution.
      pooling: "max" or "avg".
      dtype: computation dtype (float32 or bfloat16); param_dtype: parameter storage dtype.
    """

    num_classes: int = 101
    connections: str = "sparse"
    use_bias: bool = True
    activation: str = "relu"
    pooling: str = "max"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    canonical_input_shape: ClassVar[tuple[int, int, int]] = (83, 83, 1)

    def __post_init__(self):
        _check_choice("connections", self.connections, {"sparse", "table", "full"})
        _check_choice("activation", self.activation, set(_ACTIVATIONS))
        _check_choice("pooling", self.pooling, {"max", "avg"})
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        check_image_input(self, x, first_conv="conv1", model="lecun_convnet")
        del train  # no dropout or batch norm
        low, high = LECUN_CONVNET_INPUT_RANGE
        check_input(x, model="lecun_convnet", min_size=low, max_size=high, why="fc must read a 1x1 map")
        act = _ACTIVATIONS[self.activation]
        pool = MaxPool if self.pooling == "max" else AvgPool
        conv = lambda features, groups, name: nn.Conv(  # noqa: E731
            features, (9, 9), padding="VALID", feature_group_count=groups, use_bias=self.use_bias,
            dtype=self.dtype, param_dtype=self.param_dtype, name=name,
        )
        x = act(conv(64, 1, "conv1")(x))
        x = pool(10, 5, name="pool1")(x)
        if self.connections == "table":
            # Each output map's 16 input maps side by side, then one group per output map.
            table = lecun_connection_table(x.shape[-1], 256, 16)
            x = act(conv(256, 256, "conv2")(x[..., table.reshape(-1)]))
        else:
            # Sparse: 64 groups of 1 input map -> 4 output maps; output map j reads input map j // 4.
            groups = x.shape[-1] if self.connections == "sparse" else 1
            x = act(conv(256, groups, "conv2")(x))
        x = pool(6, 4, name="pool2")(x)
        return nn.Dense(
            self.num_classes, use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype, name="fc"
        )(flatten(x))


@register("lenet5", "lenet")
class LeNet5(nn.Module):
    """LeNet-5 with full C3 connections (61,706 parameters): `[batch, 32, 32, c] -> [batch, num_classes]`.

    Attributes:
      num_classes: output classes (10 digits).
      activation: "tanh" (as in 1998) or "relu".
      dtype: computation dtype; param_dtype: parameter storage dtype.
    """

    num_classes: int = 10
    activation: str = "tanh"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    canonical_input_shape: ClassVar[tuple[int, int, int]] = (32, 32, 1)

    def __post_init__(self):
        _check_choice("activation", self.activation, set(_ACTIVATIONS))
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        check_image_input(self, x, first_conv="c1", model="lenet5")
        del train
        low, high = LENET5_INPUT_RANGE
        check_input(x, model="lenet5", min_size=low, max_size=high, why="c5 must reduce the map to 1x1")
        act = _ACTIVATIONS[self.activation]
        conv = lambda features, name: nn.Conv(  # noqa: E731
            features, (5, 5), padding="VALID", dtype=self.dtype, param_dtype=self.param_dtype, name=name
        )
        dense = lambda features, name: nn.Dense(  # noqa: E731
            features, dtype=self.dtype, param_dtype=self.param_dtype, name=name
        )
        x = AvgPool(2, 2, name="s2")(act(conv(6, "c1")(x)))
        x = AvgPool(2, 2, name="s4")(act(conv(16, "c3")(x)))
        x = flatten(act(conv(120, "c5")(x)))
        x = act(dense(84, "f6")(x))
        return dense(self.num_classes, "output")(x)
