"""VGG 11/13/16/19 (Simonyan & Zisserman 2015), with or without BatchNorm, torchvision layout.

    model   conv layers per block   params (1000 classes, no BN)   with BN
    vgg11   1, 1, 2, 2, 2           132,863,336                    132,868,840
    vgg13   2, 2, 2, 2, 2           133,047,848                    133,053,736
    vgg16   2, 2, 3, 3, 3           138,357,544                    138,365,992
    vgg19   2, 2, 4, 4, 4           143,667,240                    143,678,248

The network is split as torchvision splits it, so later work can reuse the parts:

- `VGGFeatures` (params under "features"): the convolutional trunk, 3x3 convs (pad 1) + ReLU in
  five blocks of 64, 128, 256, 512, 512 maps, each block ending in a 2x2/2 pool. Its layers are
  named `conv{block}_{i}` (after BatchNorm when `batch_norm=True`, before ReLU),
  `relu{block}_{i}` (after it) and `pool{block}`; `features(x, train=..., outputs=("relu4_2",
  "pool3"))` returns those maps by name, for style transfer, FCN skips (pool3, pool4) and feature
  extraction. Gatys et al.'s "conv4_2" and "conv1_1 ... conv5_1" are the ReLU outputs here
  (`relu4_2`, `relu1_1 ... relu5_1`): their Caffe VGG applies ReLU in place, so the blob named
  conv4_2 holds the rectified map, and their code reads those.
- an adaptive average pool to 7x7 (torchvision's `avgpool`), which lets any input of at least
  32x32 (with all five pools) reach the classifier;
- `VGGClassifier` (params under "classifier"): fc6 (7*7*512 -> 4096), ReLU, dropout, fc7
  (4096 -> 4096), ReLU, dropout, fc8 (-> num_classes). fc6 reads the 7x7x512 map flattened in
  NHWC (h, w, c) order, so `fc6.kernel.reshape(7, 7, 512, 4096)` is the equivalent 7x7
  convolution kernel (FCN / OverFeat), and `cnn.models.convert` permutes torchvision's (c, h, w)
  flattening into this order.

For a dilated front end (Yu & Koltun) the trunk accepts per-block `pools` and `dilations`; the
parameter tree does not change, so weights carry over.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp

from cnn.models.layers import AdaptiveAvgPool, AvgPool, MaxPool, check_image_input, check_input, flatten, kaiming_fan_out
from cnn.models.registry import register

Dtype = Any

BLOCK_FEATURES = (64, 128, 256, 512, 512)
CONVS_PER_BLOCK = {11: (1, 1, 2, 2, 2), 13: (2, 2, 2, 2, 2), 16: (2, 2, 3, 3, 3), 19: (2, 2, 4, 4, 4)}
_linear_init = nn.initializers.normal(0.01)  # torchvision's VGG init for Linear layers


def _check_depth(depth: int) -> None:
    if depth not in CONVS_PER_BLOCK:
        raise ValueError(f"depth={depth!r} is not a VGG depth; valid depths are {sorted(CONVS_PER_BLOCK)}")


def vgg_layer_names(depth: int = 16) -> list[str]:
    """The trunk's named maps in forward order: conv1_1, relu1_1, ..., pool1, conv2_1, ..., pool5."""
    _check_depth(depth)
    names = []
    for block, count in enumerate(CONVS_PER_BLOCK[depth], start=1):
        for i in range(1, count + 1):
            names += [f"conv{block}_{i}", f"relu{block}_{i}"]
        names.append(f"pool{block}")
    return names


class VGGFeatures(nn.Module):
    """VGG's convolutional trunk: `[batch, h, w, c] -> [batch, h/32, w/32, 512]` (all pools on).

    Attributes:
      depth: 11, 13, 16 or 19.
      batch_norm: BatchNorm after each conv (torchvision's `vgg*_bn`), params `bn{block}_{i}`.
      pooling: "max" (VGG) or "avg" (Gatys et al. suggest average pooling for style transfer).
      pools: per block, whether it ends in a 2x2/2 pool (drop the last two for a dilated front end).
      dilations: per block, the dilation of its 3x3 convs (padding equals dilation, sizes kept).
      bn_axis_name: pmap/shard axis over which BatchNorm averages its statistics, if any.
      dtype: computation dtype; param_dtype: parameter storage dtype.
    """

    depth: int = 16
    batch_norm: bool = False
    pooling: str = "max"
    pools: Sequence[bool] = (True, True, True, True, True)
    dilations: Sequence[int] = (1, 1, 1, 1, 1)
    bn_axis_name: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self):
        _check_depth(self.depth)
        if self.pooling not in ("max", "avg"):
            raise ValueError(f"pooling={self.pooling!r} is not one of ['avg', 'max']")
        for argument, value in (("pools", self.pools), ("dilations", self.dilations)):
            if len(value) != 5:
                raise ValueError(f"{argument}={value!r} must have one entry per block (5)")
        if any(d < 1 for d in self.dilations):
            raise ValueError(f"dilations={self.dilations!r} must all be >= 1")
        super().__post_init__()

    @property
    def min_input_size(self) -> int:
        """The smallest height/width that leaves a non-empty map after the pools."""
        return 2 ** sum(bool(p) for p in self.pools)

    @nn.compact
    def __call__(
        self, x: jnp.ndarray, *, train: bool, outputs: Sequence[str] | None = None
    ) -> jnp.ndarray | dict[str, jnp.ndarray]:
        """Runs the trunk.

        Args:
          x: `[batch, height, width, channels]`, height and width >= `min_input_size`.
          train: BatchNorm uses batch statistics (and updates `batch_stats`) when True.
          outputs: names from `vgg_layer_names(depth)`; if given, returns `{name: map}` and stops
            after the last requested layer (later layers are not run, nor created at init).

        Returns:
          The last block's output `[batch, h', w', 512]`, or the dict of requested maps.
        """
        check_image_input(self, x, first_conv="conv1_1", model=f"vgg{self.depth} features")
        check_input(x, model=f"vgg{self.depth} features", min_size=self.min_input_size)
        wanted = None if outputs is None else list(outputs)
        if wanted is not None:
            unknown = sorted(set(wanted) - set(vgg_layer_names(self.depth)))
            if unknown:
                raise ValueError(
                    f"outputs={unknown!r} are not layers of vgg{self.depth}; valid names: "
                    f"{', '.join(vgg_layer_names(self.depth))}"
                )
        found: dict[str, jnp.ndarray] = {}

        def keep(name: str, value: jnp.ndarray) -> bool:
            """Records a requested map; True once every requested map is recorded."""
            if wanted is not None and name in wanted:
                found[name] = value
            return wanted is not None and len(found) == len(set(wanted))

        pool_cls = MaxPool if self.pooling == "max" else AvgPool
        for block, (features, count) in enumerate(zip(BLOCK_FEATURES, CONVS_PER_BLOCK[self.depth]), start=1):
            dilation = int(self.dilations[block - 1])
            for i in range(1, count + 1):
                x = nn.Conv(
                    features, (3, 3), padding=dilation, kernel_dilation=dilation,
                    kernel_init=kaiming_fan_out, dtype=self.dtype, param_dtype=self.param_dtype,
                    name=f"conv{block}_{i}",
                )(x)
                if self.batch_norm:
                    x = nn.BatchNorm(
                        use_running_average=not train, momentum=0.9, epsilon=1e-5,
                        axis_name=self.bn_axis_name, dtype=self.dtype, param_dtype=self.param_dtype,
                        name=f"bn{block}_{i}",
                    )(x)
                if keep(f"conv{block}_{i}", x):
                    return found
                x = nn.relu(x)
                if keep(f"relu{block}_{i}", x):
                    return found
            if self.pools[block - 1]:
                x = pool_cls(2, 2, name=f"pool{block}")(x)
            if keep(f"pool{block}", x):
                return found
        return x if wanted is None else found


class VGGClassifier(nn.Module):
    """`[batch, 7, 7, 512] -> [batch, num_classes]`: fc6, ReLU, dropout, fc7, ReLU, dropout, fc8.

    `hidden` is the width of fc6 and fc7 (4096 in VGG).
    """

    num_classes: int = 1000
    dropout_rate: float = 0.5
    hidden: int = 4096
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        dense = lambda features, name: nn.Dense(  # noqa: E731
            features, kernel_init=_linear_init, dtype=self.dtype, param_dtype=self.param_dtype, name=name
        )
        x = flatten(x)
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(nn.relu(dense(self.hidden, "fc6")(x)))
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(nn.relu(dense(self.hidden, "fc7")(x)))
        return dense(self.num_classes, "fc8")(x)


class VGG(nn.Module):
    """VGG classifier: `[batch, h, w, 3] -> [batch, num_classes]`, h, w >= 32 (224 canonical).

    Attributes:
      depth: 11, 13, 16 or 19.
      batch_norm: the `_bn` variant.
      num_classes: output classes.
      dropout_rate: dropout after fc6 and fc7 (rng stream "dropout" when `train=True`).
      classifier_width: units of fc6 and fc7 (4096 in the paper; smaller heads, e.g. 512, suit
        small datasets and transfer learning; the parameter count above assumes 4096).
      bn_axis_name: pmap/shard axis for BatchNorm statistics, if any.
      dtype: computation dtype; param_dtype: parameter storage dtype.
    """

    depth: int = 16
    batch_norm: bool = False
    num_classes: int = 1000
    dropout_rate: float = 0.5
    classifier_width: int = 4096
    bn_axis_name: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    canonical_input_shape: ClassVar[tuple[int, int, int]] = (224, 224, 3)

    def __post_init__(self):
        _check_depth(self.depth)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        check_image_input(self, x, first_conv="features/conv1_1", model=f"vgg{self.depth}")
        check_input(x, model=f"vgg{self.depth}", min_size=32)
        x = VGGFeatures(
            self.depth, self.batch_norm, bn_axis_name=self.bn_axis_name,
            dtype=self.dtype, param_dtype=self.param_dtype, name="features",
        )(x, train=train)
        x = AdaptiveAvgPool((7, 7), name="avgpool")(x)
        return VGGClassifier(
            self.num_classes, self.dropout_rate, self.classifier_width, dtype=self.dtype,
            param_dtype=self.param_dtype, name="classifier",
        )(x, train=train)


def _vgg_constructor(depth: int, batch_norm: bool):
    def make(**options: Any) -> VGG:
        return VGG(depth=depth, batch_norm=batch_norm, **options)

    make.__name__ = make.__qualname__ = f"vgg{depth}{'_bn' if batch_norm else ''}"
    make.__doc__ = f"VGG-{depth}{' with BatchNorm' if batch_norm else ''}; options as `VGG`."
    return make


for _depth in CONVS_PER_BLOCK:
    register(f"vgg{_depth}")(_vgg_constructor(_depth, False))
    register(f"vgg{_depth}_bn")(_vgg_constructor(_depth, True))
register("vgg")(VGG)
