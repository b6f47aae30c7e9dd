"""U-Net (Ronneberger, Fischer & Brox 2015): a contracting and an expanding path joined by
concatenated skip connections.

    model = cnn.models.create("unet", num_classes=2)                           # paper: depth 4, width 64
    small = cnn.models.create("unet", num_classes=4, depth=3, width=16)
    paper = cnn.models.create("unet", num_classes=2, padding="valid", pad_input=False)  # 572 -> 388

Level `l = 0..depth` has `width * 2**l` channels and two 3x3 convolutions + ReLU (+ BatchNorm
with `batch_norm=True`); the contracting path goes down a level with 2x2/2 max pooling, the
expanding path up with a 2x2/2 transposed convolution ("up-conv") that halves the channels,
then concatenates the contracting path's map of that level (`[up, skip]` on the channel axis)
before its two convolutions. A final 1x1 convolution gives the class scores.

Sizes (`padding`):

* "same" (default): the 3x3 convolutions pad by 1 and keep sizes. The pools need sides
  divisible by `2**depth`, so with `pad_input=True` the input is zero-padded at the bottom and
  right up to the next multiple, and the scores are cropped back to the input's `h x w`: any
  input size works, odd ones included.
* "valid" (the paper): unpadded convolutions shrink every map by 2 per conv, so the contracting
  path's map is larger than the expanding path's at the same level and is center-cropped before
  concatenation (the crop is the `Grid` alignment of `cnn.models.fcn.align`). The output is
  `unet_valid_output_size(n) = n - margin` (572 -> 388 for depth 4). With `pad_input=True` the
  input is mirrored by `margin / 2` pixels on top/left (the paper's overlap-tile strategy:
  missing context is extrapolated by mirroring) and on bottom/right up to the smallest size
  whose pools all see even sides, then the scores are cropped to `h x w`. With
  `pad_input=False` the input must be a valid tile size (`unet_valid_input_sizes`) and the
  output is the smaller, centred tile.
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnn.models.fcn import Grid, align, crop
from cnn.models.layers import check_image_input, check_input
from cnn.models.registry import register

Dtype = Any
PADDINGS = ("same", "valid")


def unet_valid_output_size(size: int, depth: int = 4) -> int | None:
    """Output side of a valid-padding U-Net on an input side `size`, or None when a pool would
    see an odd side (or a map vanishes). 572 -> 388 for depth 4 (the paper's Fig. 1)."""
    n = size
    for _ in range(depth):
        n -= 4
        if n < 2 or n % 2:
            return None
        n //= 2
    n -= 4
    if n < 1:
        return None
    for _ in range(depth):
        n = 2 * n - 4
        if n < 1:
            return None
    return n


def unet_valid_margin(depth: int = 4) -> int:
    """`input - output` of a valid-padding U-Net (the same for every valid size): 184 for depth 4."""
    size = next(n for n in range(1, 10 * 2**depth * 4) if unet_valid_output_size(n, depth) is not None)
    return size - unet_valid_output_size(size, depth)


def unet_valid_input_sizes(depth: int = 4, limit: int = 1024) -> list[int]:
    """The valid input sides up to `limit` (every `2**depth`-th size from the smallest)."""
    return [n for n in range(1, limit + 1) if unet_valid_output_size(n, depth) is not None]


class UNet(nn.Module):
    """U-Net: `[batch, h, w, c] -> [batch, h, w, num_classes]` (see the module docstring).

    Attributes:
      num_classes: output classes (2 in the paper: cell / border).
      depth: number of 2x2 poolings (4 in the paper).
      width: channels of the first level (64); level `l` has `width * 2**l`.
      padding: "same" or "valid" (the paper's unpadded convolutions).
      pad_input: pad the input (zeros for "same", mirroring for "valid") so that any size works
        and the scores come back at the input resolution.
      batch_norm: BatchNorm after every 3x3 conv (not in the paper).
      dropout_rate: dropout at the end of the contracting path (the paper uses it; rng "dropout").
      bn_axis_name: pmap/shard axis for BatchNorm statistics, if any.
    """

    num_classes: int = 2
    depth: int = 4
    width: int = 64
    padding: str = "same"
    pad_input: bool = True
    batch_norm: bool = False
    dropout_rate: float = 0.0
    bn_axis_name: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    canonical_input_shape: ClassVar[tuple[int, int, int]] = (572, 572, 1)

    def __post_init__(self):
        if self.padding not in PADDINGS:
            raise ValueError(f"padding={self.padding!r} is not one of {list(PADDINGS)}")
        if self.depth < 0 or self.width < 1:
            raise ValueError(f"need depth >= 0 and width >= 1, got depth={self.depth}, width={self.width}")
        super().__post_init__()

    def _pad(self, x: jax.Array) -> tuple[jax.Array, Grid]:
        """The padded input and its `Grid` on the original input (its pixel 0 is original pixel `start`)."""
        height, width = x.shape[1:3]
        if self.padding == "same":
            multiple = 2**self.depth
            extra = [(-n) % multiple for n in (height, width)]
            x = jnp.pad(x, ((0, 0), (0, extra[0]), (0, extra[1]), (0, 0)))
            return x, Grid()
        margin = unet_valid_margin(self.depth)
        before = margin // 2
        sides = []
        for n in (height, width):
            size = n + margin
            while unet_valid_output_size(size, self.depth) is None:
                size += 1
            sides.append((before, size - n - before))
        x = jnp.pad(x, ((0, 0), *sides, (0, 0)), mode="symmetric")
        return x, Grid(start=-before)

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        check_image_input(self, x, first_conv="down0_conv1", model="unet")
        check_input(x, model="unet", min_size=1)
        height, width = x.shape[1:3]
        input_grid = Grid()
        if self.pad_input:
            x, input_grid = self._pad(x)
        elif self.padding == "same" and (height % 2**self.depth or width % 2**self.depth):
            raise ValueError(
                f"unet: input x of shape {tuple(x.shape)} needs sides divisible by 2**depth = {2**self.depth} "
                "when pad_input=False"
            )
        elif self.padding == "valid":
            for n in (height, width):
                if unet_valid_output_size(n, self.depth) is None:
                    raise ValueError(
                        f"unet: input x of shape {tuple(x.shape)} has a side {n} that is not a valid tile size "
                        f"for depth={self.depth} (valid: {unet_valid_input_sizes(self.depth, 600)[:8]}, ...); "
                        "use pad_input=True"
                    )
        pad = 1 if self.padding == "same" else 0

        def double_conv(x, grid, features: int, name: str):
            for i in (1, 2):
                x = nn.Conv(
                    features, (3, 3), padding=pad, dtype=self.dtype, param_dtype=self.param_dtype,
                    kernel_init=nn.initializers.variance_scaling(2.0, "fan_in", "normal"),  # He et al., as the paper
                    name=f"{name}_conv{i}",
                )(x)
                if self.batch_norm:
                    x = nn.BatchNorm(
                        use_running_average=not train, momentum=0.9, epsilon=1e-5, axis_name=self.bn_axis_name,
                        dtype=self.dtype, param_dtype=self.param_dtype, name=f"{name}_bn{i}",
                    )(x)
                x = nn.relu(x)
                grid = grid.conv(3, 1, pad)
            return x, grid

        grid = input_grid  # placements are in the original input's pixel coordinates
        skips = []
        for level in range(self.depth):
            x, grid = double_conv(x, grid, self.width * 2**level, f"down{level}")
            skips.append((x, grid))
            x = nn.max_pool(x, (2, 2), (2, 2))
            grid = grid.conv(2, 2)
        x, grid = double_conv(x, grid, self.width * 2**self.depth, "bottom")
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        for level in range(self.depth - 1, -1, -1):
            x = nn.ConvTranspose(
                self.width * 2**level, (2, 2), strides=(2, 2), padding="VALID", dtype=self.dtype,
                param_dtype=self.param_dtype, name=f"up{level}_upconv",
            )(x)
            grid = grid.transposed(2, 2)
            skip, skip_grid = skips[level]
            x, skip, grid = align(x, grid, skip, skip_grid)
            x, grid = double_conv(jnp.concatenate([x, skip], axis=-1), grid, self.width * 2**level, f"up{level}")
        scores = nn.Conv(self.num_classes, (1, 1), dtype=self.dtype, param_dtype=self.param_dtype, name="classifier")(x)
        if not self.pad_input:
            return scores
        offset = grid.index_of(Grid())
        return crop(scores, offset, (height, width))


register("unet")(UNet)

__all__ = ["PADDINGS", "UNet", "unet_valid_input_sizes", "unet_valid_margin", "unet_valid_output_size"]
