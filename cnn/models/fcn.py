"""Fully convolutional networks (Long, Shelhamer & Darrell 2015): FCN-32s, FCN-16s, FCN-8s.

    model = cnn.models.create("fcn8s", num_classes=21)                 # the paper's VGG16 net
    scores = model.apply(variables, images, train=False)               # [b, h, w, 21], any h, w
    small = cnn.models.create("fcn8s", num_classes=4, widths=(16, 32, 64, 64, 64), fc_width=128,
                              fc6_kernel=3, fc6_padding=1, conv1_padding=1)   # CPU-sized

The classifier VGG16 becomes a dense predictor:

* the trunk is VGG16's 13 3x3 convolutions and five 2x2/2 max pools (`VGGTrunk`, parameters
  named as in `cnn.models.vgg.VGGFeatures`, so VGG16 weights carry over); pools round up
  (Caffe's ceil mode), so every input pixel lies under some pool window;
* fc6 (7x7x512 -> 4096) and fc7 (4096 -> 4096) are convolutions with 7x7 and 1x1 kernels
  (`vgg_to_fcn_params` reshapes a VGG classifier's Dense kernels with
  `cnn.ops.dense_to_conv_kernel`); `score_fr` (1x1, zero-initialized) scores every class at
  stride 32;
* transposed convolutions initialized to bilinear interpolation (`BilinearUpsample`) bring the
  scores back up. FCN-32s upsamples 32x at once. FCN-16s upsamples 2x, adds the scores of pool4
  (`score_pool4`, 1x1, zero-initialized), and upsamples 16x. FCN-8s also adds the pool3 scores
  (`score_pool3`) after another 2x and upsamples 8x. As in the paper ("the final layer
  deconvolutional filters are fixed to bilinear interpolation, while intermediate upsampling
  layers are initialized to bilinear upsampling, and then learned") and the reference Caffe
  nets (`lr_mult: 0` on the last Deconvolution), only the 2x upsamplings (`upscore2`,
  `upscore_pool4`) are parameters; the final one (`upscore`, `upscore16`, `upscore8`) is a fixed
  bilinear kernel (`learnable_final_upsampling=True` makes it a parameter too).

Crop and alignment. conv1_1 pads its input by `conv1_padding` = 100 pixels (the paper's value),
so that the 7x7 fc6 sees a non-empty map for any input and the upsampled scores cover the whole
image. Every map therefore sits at an offset to the image, and sums of maps of different strides
must be cropped to line up. `Grid` tracks, for each map, where its unit `i` lies on the input
(`start + jump * i`, in input pixel indices), through convolutions (`start += jump * ((d*(k-1))/2
- p)`, `jump *= s`) and transposed convolutions (`jump /= s`, `start += jump * (p - (k-1)/2)`).
Two maps of equal jump are aligned by cropping the one that starts earlier; the last map is
cropped to the image. For the paper's settings this gives exactly the offsets of the reference
Caffe models (`fcn_crop_offsets`): FCN-32s crops 19 from the 64x64/32 upsampling; FCN-16s crops
score_pool4 by 5 and the final map by 27; FCN-8s crops score_pool4 by 5, score_pool3 by 9 and
the final map by 31. With small inputs and `conv1_padding=1`, `fc6_kernel=3, fc6_padding=1`
(sizes kept up to the pools) the same rule crops the upsampled maps instead; either way the
output is `[batch, height, width, num_classes]` for every input size, odd ones included.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cnn import ops
from cnn.models.layers import check_image_input, check_input, kaiming_fan_out
from cnn.models.registry import register
from cnn.models.vgg import BLOCK_FEATURES, CONVS_PER_BLOCK

Dtype = Any
FCN_STRIDES = (32, 16, 8)


# ------------------------------------------------------------------------------------------------
# Where the units of a feature map sit on the input.


@dataclasses.dataclass(frozen=True)
class Grid:
    """The placement of a feature map's units on the input image (one spatial axis; both axes of
    square kernels move alike).

    Unit `i` of the map is centred on input pixel coordinate `start + jump * i`, where input pixel
    `u` is centred on `u` (so the input itself is `Grid(1, 0)`). Exact rationals: after a
    transposed convolution the jump is a fraction of the coarse map's.
    """

    jump: Fraction = Fraction(1)
    start: Fraction = Fraction(0)

    def __post_init__(self):
        # Exact arithmetic whatever was passed (ints, Fractions, or floats such as 3.5).
        object.__setattr__(self, "jump", Fraction(self.jump))
        object.__setattr__(self, "start", Fraction(self.start))
        if self.jump <= 0:
            raise ValueError(f"jump must be positive, got jump={self.jump}")

    def conv(self, kernel: int, stride: int = 1, padding: int = 0, dilation: int = 1) -> Grid:
        """After a convolution or pooling: output unit `i` is centred on input unit
        `stride * i - padding + dilation * (kernel - 1) / 2` of the layer's input."""
        offset = Fraction(dilation * (kernel - 1), 2) - padding
        return Grid(self.jump * stride, self.start + self.jump * offset)

    def transposed(self, kernel: int, stride: int, padding: int = 0) -> Grid:
        """After a transposed convolution (the adjoint of `conv(kernel, stride, padding)`)."""
        jump = self.jump / stride
        return Grid(jump, self.start + jump * (padding - Fraction(kernel - 1, 2)))

    def index_of(self, other: Grid) -> int:
        """The index of this map's unit that sits where `other`'s unit 0 sits (may be negative).

        Raises:
          ValueError: the jumps differ, or the maps are not aligned on a common lattice.
        """
        if self.jump != other.jump:
            raise ValueError(f"cannot align maps with jumps {self.jump} and {other.jump} input pixels")
        index = (other.start - self.start) / self.jump
        if index.denominator != 1:
            raise ValueError(
                f"maps starting at {self.start} and {other.start} (jump {self.jump}) do not share a lattice"
            )
        return int(index)


def crop(x: jax.Array, offset: int, size: tuple[int, int]) -> jax.Array:
    """`x[:, offset:offset + size[0], offset:offset + size[1], :]` (checked: raises ValueError when
    the window leaves `x`)."""
    height, width = x.shape[1:3]
    if offset < 0 or offset + size[0] > height or offset + size[1] > width:
        raise ValueError(f"cannot crop {size} at offset {offset} from a {height}x{width} map")
    return x[:, offset : offset + size[0], offset : offset + size[1], :]


def align(a: jax.Array, grid_a: Grid, b: jax.Array, grid_b: Grid) -> tuple[jax.Array, jax.Array, Grid]:
    """Crops two maps of equal jump to their common extent, unit for unit.

    The map that starts earlier loses its leading units, then both are cut to the shorter
    length per axis. Returns `(a', b', grid)` with `a'[:, i, j]` and `b'[:, i, j]` at the same
    input position `grid.start + grid.jump * (i, j)`.
    """
    shift = grid_a.index_of(grid_b)  # a's index of b's unit 0
    if shift >= 0:
        a, grid = a[:, shift:, shift:], grid_b
    else:
        b, grid = b[:, -shift:, -shift:], grid_a
    height, width = min(a.shape[1], b.shape[1]), min(a.shape[2], b.shape[2])
    if height < 1 or width < 1:
        raise ValueError(f"maps on grids {grid_a} and {grid_b} do not overlap")
    return a[:, :height, :width], b[:, :height, :width], grid


def crop_to_input(scores: jax.Array, grid: Grid, size: tuple[int, int], *, model: str) -> jax.Array:
    """Crops stride-1 `scores` on `grid` to the `size = (height, width)` input pixels.

    Raises:
      ValueError: the scores do not cover the input (the message names `model`).
    """
    if grid.jump != 1:
        raise ValueError(f"{model}: the final scores have jump {grid.jump}, expected 1")
    offset = grid.index_of(Grid())
    height, width = scores.shape[1:3]
    if offset < 0 or offset + size[0] > height or offset + size[1] > width:
        raise ValueError(
            f"{model}: the upsampled scores ({height}x{width}, input pixel 0 at index {offset}) do not cover "
            f"the {size[0]}x{size[1]} input; increase conv1_padding or pad the input"
        )
    return crop(scores, offset, size)


# ------------------------------------------------------------------------------------------------
# Bilinear upsampling by a transposed convolution.


def bilinear_kernel_1d(size: int) -> np.ndarray:
    """The 1-D bilinear interpolation filter of length `size` (Caffe's "bilinear" filler):
    `1 - |t - c| / f` with `f = ceil(size / 2)` and `c` the filter's centre."""
    if size < 1:
        raise ValueError(f"size must be >= 1, got size={size}")
    factor = (size + 1) // 2
    centre = factor - 1 if size % 2 == 1 else factor - 0.5
    return 1.0 - np.abs(np.arange(size) - centre) / factor


def bilinear_kernel(size: int, channels: int, *, depthwise: bool = False) -> np.ndarray:
    """A transposed-conv kernel that upsamples each channel bilinearly, channels not mixed.

    Returns:
      `[size, size, channels, channels]` with the 2-D filter on the diagonal (a full kernel,
      learnable later), or `[size, size, 1, channels]` for a depthwise (grouped) one.
    """
    filter_2d = np.outer(bilinear_kernel_1d(size), bilinear_kernel_1d(size)).astype(np.float32)
    if depthwise:
        return np.repeat(filter_2d[:, :, None, None], channels, axis=3)
    kernel = np.zeros((size, size, channels, channels), np.float32)
    kernel[:, :, np.arange(channels), np.arange(channels)] = filter_2d[:, :, None]
    return kernel


def upsampling_kernel_size(factor: int) -> int:
    """`2 * factor - factor % 2`, the kernel of a stride-`factor` bilinear transposed conv."""
    return 2 * factor - factor % 2


class BilinearUpsample(nn.Module):
    """Upsampling by `factor` with a transposed convolution initialized to bilinear interpolation.

    `[batch, h, w, c] -> [batch, (h - 1) * factor + k - 2 * padding, ..., c]` with
    `k = upsampling_kernel_size(factor)` (64 for 32x, 4 for 2x). With `padding = factor // 2`
    (even factor) the output is exactly `factor` times larger and matches
    `jax.image.resize(x, ..., "bilinear")` (half-pixel centres) away from the border; FCN uses
    `padding=0` and crops (see `Grid`).

    Attributes:
      factor: the stride of the transposed convolution.
      padding: rows/columns removed on each side (the forward convolution's padding).
      learnable: a full `[k, k, c, c]` parameter `kernel` (initialized bilinear, no bias, as in
        FCN); otherwise a fixed bilinear kernel, each channel upsampled alone (Yu & Koltun's frozen
        upsampling).
    """

    factor: int
    padding: int = 0
    learnable: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def kernel_size(self) -> int:
        return upsampling_kernel_size(self.factor)

    def grid(self, grid: Grid) -> Grid:
        """The output's placement given the input's."""
        return grid.transposed(self.kernel_size, self.factor, self.padding)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.factor < 1:
            raise ValueError(f"factor must be >= 1, got factor={self.factor}")
        channels = x.shape[-1]
        size = self.kernel_size
        if self.learnable:
            kernel = self.param(
                "kernel",
                lambda key, shape, dtype: jnp.asarray(bilinear_kernel(size, channels), dtype),
                (size, size, channels, channels),
                self.param_dtype,
            )
            groups = 1
        else:
            # A constant, channel-diagonal kernel. (The depthwise form, `groups=channels`, computes
            # the same but XLA:CPU differentiates grouped input-dilated convolutions ~100x slower.)
            kernel = jnp.asarray(bilinear_kernel(size, channels))
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        return ops.conv_transpose2d(x, kernel, stride=self.factor, padding=self.padding)


# ------------------------------------------------------------------------------------------------
# The VGG trunk, with widths.


def trunk_layer_names(convs_per_block: Sequence[int]) -> list[str]:
    """conv1_1, relu1_1, ..., pool1, conv2_1, ... for a trunk with `convs_per_block`."""
    names = []
    for block, count in enumerate(convs_per_block, start=1):
        for i in range(1, count + 1):
            names += [f"conv{block}_{i}", f"relu{block}_{i}"]
        names.append(f"pool{block}")
    return names


class MaxPool2x2(nn.Module):
    """2x2/2 max pooling, `[b, h, w, c] -> [b, h', w', c]`: `h' = floor(h / 2)`, or `ceil(h / 2)`
    with `ceil_mode` (Caffe's rounding: an odd last row/column is pooled alone, padded with -inf)."""

    ceil_mode: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        pads = [(0, n % 2 if self.ceil_mode else 0) for n in x.shape[1:3]]
        return nn.max_pool(x, (2, 2), (2, 2), padding=pads)


def vgg_trunk_grids(
    convs_per_block: Sequence[int],
    grid: Grid = Grid(),
    *,
    pools: Sequence[bool] | None = None,
    dilations: Sequence[int] | None = None,
) -> dict[str, Grid]:
    """The `Grid` of every named map of a `VGGTrunk` (3x3 convs padded by their dilation, 2x2/2
    pools), given the input's `grid`. Pool rounding does not move units, only adds them."""
    pools = (True,) * len(convs_per_block) if pools is None else pools
    dilations = (1,) * len(convs_per_block) if dilations is None else dilations
    grids = {}
    for block, count in enumerate(convs_per_block, start=1):
        dilation = int(dilations[block - 1])
        for i in range(1, count + 1):
            grid = grid.conv(3, 1, dilation, dilation)
            grids[f"conv{block}_{i}"] = grids[f"relu{block}_{i}"] = grid
        if pools[block - 1]:
            grid = grid.conv(2, 2)
        grids[f"pool{block}"] = grid
    return grids


class VGGTrunk(nn.Module):
    """A VGG-style trunk with chosen widths: blocks of 3x3 convs (+BN) + ReLU, each ending in an
    optional 2x2/2 max pool.

    `cnn.models.vgg.VGGFeatures` with two additions the segmentation nets need: per-block
    `widths` (narrow trunks train on a CPU) and Caffe's ceil-mode pooling (FCN). With the
    defaults (VGG16 widths, floor pooling) its parameter tree and outputs are VGGFeatures' for
    depth 16, so converted VGG16 weights load unchanged (tested).

    Attributes:
      widths: output channels of each block's convs.
      convs_per_block: 3x3 convs in each block (VGG16: 2, 2, 3, 3, 3).
      pools: whether each block ends in a 2x2/2 max pool.
      dilations: the dilation of each block's convs (padding = dilation keeps sizes).
      ceil_mode: pools round their output size up (pad the last window with -inf).
      batch_norm: BatchNorm after each conv (params `bn{block}_{i}`).
    """

    widths: Sequence[int] = BLOCK_FEATURES
    convs_per_block: Sequence[int] = CONVS_PER_BLOCK[16]
    pools: Sequence[bool] = (True, True, True, True, True)
    dilations: Sequence[int] = (1, 1, 1, 1, 1)
    ceil_mode: bool = False
    batch_norm: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self):
        blocks = len(self.widths)
        for argument in ("convs_per_block", "pools", "dilations"):
            value = getattr(self, argument)
            if len(value) != blocks:
                raise ValueError(f"{argument}={tuple(value)!r} must have one entry per block ({blocks}, as widths)")
        if any(int(w) < 1 for w in self.widths) or any(int(c) < 1 for c in self.convs_per_block):
            raise ValueError(
                f"widths={tuple(self.widths)!r} and convs_per_block={tuple(self.convs_per_block)!r} must be >= 1"
            )
        if any(int(d) < 1 for d in self.dilations):
            raise ValueError(f"dilations={tuple(self.dilations)!r} must all be >= 1")
        super().__post_init__()

    def grids(self, grid: Grid = Grid()) -> dict[str, Grid]:
        """The placement of every named map, given the input's `grid`."""
        return vgg_trunk_grids(self.convs_per_block, grid, pools=self.pools, dilations=self.dilations)

    @nn.compact
    def __call__(
        self, x: jax.Array, *, train: bool, outputs: Sequence[str] | None = None
    ) -> jax.Array | dict[str, jax.Array]:
        """Runs the trunk on `[batch, height, width, channels]`.

        Args:
          train: BatchNorm uses (and updates) batch statistics.
          outputs: names from `trunk_layer_names(convs_per_block)`; if given, returns
            `{name: map}` and stops after the last requested one.

        Returns:
          The last map `[batch, h', w', widths[-1]]`, or the dict of requested maps.
        """
        names = trunk_layer_names(self.convs_per_block)
        wanted = None if outputs is None else set(outputs)
        if wanted is not None and wanted - set(names):
            raise ValueError(f"outputs={sorted(wanted - set(names))!r} are not layers of the trunk; valid: {names}")
        found: dict[str, jax.Array] = {}

        def keep(name: str, value: jax.Array) -> bool:
            if wanted is not None and name in wanted:
                found[name] = value
            return wanted is not None and len(found) == len(wanted)

        for block, (width, count) in enumerate(zip(self.widths, self.convs_per_block), start=1):
            dilation = int(self.dilations[block - 1])
            for i in range(1, count + 1):
                x = nn.Conv(
                    int(width), (3, 3), padding=dilation, kernel_dilation=dilation, kernel_init=kaiming_fan_out,
                    dtype=self.dtype, param_dtype=self.param_dtype, name=f"conv{block}_{i}",
                )(x)
                if self.batch_norm:
                    x = nn.BatchNorm(
                        use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype,
                        param_dtype=self.param_dtype, name=f"bn{block}_{i}",
                    )(x)
                if keep(f"conv{block}_{i}", x):
                    return found
                x = nn.relu(x)
                if keep(f"relu{block}_{i}", x):
                    return found
            if self.pools[block - 1]:
                x = MaxPool2x2(ceil_mode=self.ceil_mode, name=f"pool{block}")(x)
            if keep(f"pool{block}", x):
                return found
        return x if wanted is None else found


# ------------------------------------------------------------------------------------------------
# FCN.


@dataclasses.dataclass(frozen=True)
class FCNLayout:
    """The crops of an FCN for one input size: what `FCN` computes, as numbers.

    Attributes:
      crops: `{map name: offset}` of every crop taken, in order (names as in the Caffe models:
        "score_pool4", "score_pool3" for skips, "upscore2"/"upscore_pool4" when the upsampled
        map is the one cropped, and "final" for the crop to the image).
      grids: the `Grid` of every map.
    """

    crops: Mapping[str, int]
    grids: Mapping[str, Grid]


class FCN(nn.Module):
    """FCN-32s / 16s / 8s: `[batch, h, w, c] -> [batch, h, w, num_classes]` per-pixel scores.

    Attributes:
      num_classes: output classes (21 for PASCAL VOC).
      stride: 32, 16 or 8: the finest skip used (FCN-32s has none, 16s adds pool4, 8s pool3).
      widths, convs_per_block: the trunk (VGG16 by default).
      fc_width: channels of fc6 and fc7 (4096).
      fc6_kernel, fc6_padding: fc6's kernel (7, VGG's 7x7 pool5 window) and padding (0).
      conv1_padding: zero padding of conv1_1 (100 in the paper; 1 keeps sizes, for small inputs).
      dropout_rate: dropout after fc6 and fc7 (rng stream "dropout").
      batch_norm: BatchNorm in the trunk (not in the paper; helps training from scratch).
      learnable_upsampling: the 2x transposed convs before each skip (`upscore2`,
        `upscore_pool4`) are parameters (bilinear-initialized), as in the paper; False fixes them.
      learnable_final_upsampling: the final transposed conv to stride 1 is a parameter too (the
        paper and the reference nets keep it fixed bilinear: False).
    """

    num_classes: int = 21
    stride: int = 8
    widths: Sequence[int] = BLOCK_FEATURES
    convs_per_block: Sequence[int] = CONVS_PER_BLOCK[16]
    fc_width: int = 4096
    fc6_kernel: int = 7
    fc6_padding: int = 0
    conv1_padding: int = 100
    dropout_rate: float = 0.5
    batch_norm: bool = False
    learnable_upsampling: bool = True
    learnable_final_upsampling: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    canonical_input_shape: ClassVar[tuple[int, int, int]] = (500, 500, 3)  # the largest VOC image side

    def __post_init__(self):
        if self.stride not in FCN_STRIDES:
            raise ValueError(f"stride={self.stride!r} is not an FCN stride; valid: {list(FCN_STRIDES)}")
        if len(self.widths) != 5:
            raise ValueError(f"widths={tuple(self.widths)!r} must have 5 entries (pool3, pool4, pool5 are used)")
        if self.conv1_padding < 0 or self.fc6_padding < 0 or self.fc6_kernel < 1:
            raise ValueError(
                f"need conv1_padding >= 0, fc6_padding >= 0, fc6_kernel >= 1; got conv1_padding="
                f"{self.conv1_padding}, fc6_padding={self.fc6_padding}, fc6_kernel={self.fc6_kernel}"
            )
        super().__post_init__()

    @property
    def registry_name(self) -> str:
        """The registered name ("fcn8s", ...), quoted in error messages."""
        return f"fcn{self.stride}s"

    def _trunk(self) -> VGGTrunk:
        return VGGTrunk(
            self.widths, self.convs_per_block, ceil_mode=True, batch_norm=self.batch_norm,
            dtype=self.dtype, param_dtype=self.param_dtype, name="features",
        )

    def _upsample(self, factor: int, name: str, *, learnable: bool) -> BilinearUpsample:
        return BilinearUpsample(factor, learnable=learnable, dtype=self.dtype, param_dtype=self.param_dtype, name=name)

    def layout(self) -> FCNLayout:
        """The crops and grids of this FCN (the same for every input size; no computation).

        For the paper's FCN-8s the crops are `{"score_pool4": 5, "score_pool3": 9, "final": 31}`.
        """
        trunk_grids = vgg_trunk_grids(self.convs_per_block, Grid().conv(1, 1, self.conv1_padding - 1))
        grid = trunk_grids["pool5"].conv(self.fc6_kernel, 1, self.fc6_padding)
        grids, crops = {"score_fr": grid}, {}
        for skip, up_name in _skips(self.stride):
            grid = grid.transposed(upsampling_kernel_size(2), 2)
            grids[up_name] = grid
            shift = grid.index_of(trunk_grids[skip])  # the upsampled map's index of the skip's unit 0
            crops[up_name if shift >= 0 else f"score_{skip}"] = abs(shift)
            grid = grid if shift < 0 else trunk_grids[skip]
            grids[f"fuse_{skip}"] = grid
        grid = grid.transposed(upsampling_kernel_size(self.stride), self.stride)
        grids["final"] = grid
        crops["final"] = grid.index_of(Grid())
        return FCNLayout(crops, grids)

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        check_image_input(self, x, first_conv="features/conv1_1")
        # conv1_1 (3x3) needs a side of at least 3 after its padding.
        check_input(x, model=self.registry_name, min_size=max(1, 3 - 2 * self.conv1_padding))
        input_shape = tuple(x.shape)
        height, width = x.shape[1:3]
        # conv1_1's padding p: pad by p - 1 here, conv1_1 pads 1 more (zeros either way).
        extra = self.conv1_padding - 1
        x = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (extra, extra, 0), (extra, extra, 0), (0, 0, 0)))
        grids = vgg_trunk_grids(self.convs_per_block, Grid().conv(1, 1, extra))
        wanted = {32: ("pool5",), 16: ("pool4", "pool5"), 8: ("pool3", "pool4", "pool5")}[self.stride]
        maps = self._trunk()(x, train=train, outputs=wanted)

        def conv(features: int, kernel: int, padding: int, name: str, init=kaiming_fan_out):
            return nn.Conv(
                features, (kernel, kernel), padding=padding, kernel_init=init, dtype=self.dtype,
                param_dtype=self.param_dtype, name=name,
            )

        pool5_hw = maps["pool5"].shape[1:3]
        if min(pool5_hw) + 2 * self.fc6_padding < self.fc6_kernel:
            raise ValueError(
                f"{self.registry_name}: input x of shape {input_shape} leaves a {pool5_hw[0]}x{pool5_hw[1]} "
                f"pool5 map, too small for fc6 (fc6_kernel={self.fc6_kernel}, fc6_padding={self.fc6_padding}); increase "
                f"conv1_padding (the paper's 100 fits every input) or fc6_padding"
            )
        dropout = nn.Dropout(self.dropout_rate, deterministic=not train)
        h = dropout(nn.relu(conv(self.fc_width, self.fc6_kernel, self.fc6_padding, "fc6")(maps["pool5"])))
        h = dropout(nn.relu(conv(self.fc_width, 1, 0, "fc7")(h)))
        # The paper zero-initializes the class scoring layers (random init was no better).
        scores = conv(self.num_classes, 1, 0, "score_fr", nn.initializers.zeros)(h)
        grid = grids["pool5"].conv(self.fc6_kernel, 1, self.fc6_padding)
        for skip, up_name in _skips(self.stride):
            up = self._upsample(2, up_name, learnable=self.learnable_upsampling)
            scores, grid = up(scores), up.grid(grid)
            skip_scores = conv(self.num_classes, 1, 0, f"score_{skip}", nn.initializers.zeros)(maps[skip])
            scores, skip_scores, grid = align(scores, grid, skip_scores, grids[skip])
            scores = scores + skip_scores
        final = self._upsample(
            self.stride, {32: "upscore", 16: "upscore16", 8: "upscore8"}[self.stride],
            learnable=self.learnable_final_upsampling,
        )
        scores, grid = final(scores), final.grid(grid)
        return crop_to_input(scores, grid, (height, width), model=self.registry_name)


def _skips(stride: int) -> list[tuple[str, str]]:
    """(skip map, name of the 2x upsampling before it) for each skip of FCN-`stride`s, coarse to fine."""
    return [("pool4", "upscore2"), ("pool3", "upscore_pool4")][: {32: 0, 16: 1, 8: 2}[stride]]


def fcn_crop_offsets(stride: int = 8, **options: Any) -> dict[str, int]:
    """The crop offsets of an FCN (paper settings unless `options` say otherwise).

    Example: `fcn_crop_offsets(8) == {"score_pool4": 5, "score_pool3": 9, "final": 31}`, the
    offsets of the reference Caffe voc-fcn8s model.
    """
    return dict(FCN(stride=stride, **options).layout().crops)


def vgg_to_fcn_params(
    vgg_params: Mapping[str, Any], fcn_params: Mapping[str, Any], *, include_classifier: bool = False
) -> dict[str, Any]:
    """Turns a VGG classifier's parameters into an FCN's (or a dilated front end's).

    Copies the trunk (`features`), reshapes fc6's Dense kernel `[k*k*c, n]` (reading the
    flattened `k x k x c` map in h, w, c order) into a `k x k` conv kernel and fc7's into a 1x1
    kernel (`cnn.ops.dense_to_conv_kernel`). With `include_classifier`, fc8 becomes `score_fr`
    (same classes needed); otherwise the FCN keeps its own score layers and upsampling.

    Args:
      vgg_params: `{"features": ..., "classifier": {"fc6", "fc7", "fc8"}}` (a `cnn.models.vgg.VGG`,
        e.g. converted from torchvision by `cnn.models.convert.from_torchvision`).
      fcn_params: the target model's params (for shapes and the layers VGG lacks).

    Returns:
      A new params dict for the FCN.

    Raises:
      ValueError: a shape does not match (names the layer and both shapes).
    """
    params = jax.tree_util.tree_map(lambda v: v, dict(fcn_params))
    features = vgg_params["features"]
    if jax.tree_util.tree_structure(features) != jax.tree_util.tree_structure(params["features"]):
        raise ValueError("vgg_params['features'] and fcn_params['features'] have different layers")
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(features), jax.tree_util.tree_leaves(params["features"])
    ):
        if a.shape != b.shape:
            raise ValueError(f"features{jax.tree_util.keystr(path)}: VGG shape {a.shape} != FCN shape {b.shape}")
    params["features"] = features
    classifier = vgg_params["classifier"]
    pairs = [("fc6", "fc6"), ("fc7", "fc7")] + ([("fc8", "score_fr")] if include_classifier else [])
    for source, target in pairs:
        like = params[target]["kernel"]
        kernel = classifier[source]["kernel"]
        if kernel.ndim != 2 or kernel.shape[1] != like.shape[3] or kernel.shape[0] != int(np.prod(like.shape[:3])):
            raise ValueError(
                f"classifier/{source}/kernel {tuple(kernel.shape)} cannot become {target}/kernel {tuple(like.shape)}"
            )
        params[target] = {
            "kernel": ops.dense_to_conv_kernel(jnp.asarray(kernel), like.shape[:3]),
            "bias": jnp.asarray(classifier[source]["bias"]),
        }
    return params


def _fcn_constructor(stride: int):
    def make(**options: Any) -> FCN:
        if options.get("stride", stride) != stride:
            raise ValueError(
                f"fcn{stride}s has stride={stride}, got stride={options['stride']!r}; valid FCNs: "
                + ", ".join(f"fcn{s}s" for s in FCN_STRIDES)
            )
        return FCN(**{**options, "stride": stride})

    make.__name__ = make.__qualname__ = f"fcn{stride}s"
    make.__doc__ = f"FCN-{stride}s on the VGG16 trunk (Long et al. 2015); options as `FCN`."
    return make


for _stride in FCN_STRIDES:
    register(f"fcn{_stride}s")(_fcn_constructor(_stride))

__all__ = [
    "FCN",
    "FCNLayout",
    "FCN_STRIDES",
    "MaxPool2x2",
    "BilinearUpsample",
    "Grid",
    "VGGTrunk",
    "align",
    "bilinear_kernel",
    "bilinear_kernel_1d",
    "crop",
    "crop_to_input",
    "fcn_crop_offsets",
    "trunk_layer_names",
    "upsampling_kernel_size",
    "vgg_to_fcn_params",
    "vgg_trunk_grids",
]
