"""ImageNet ResNets 18/34/50/101/152 (He et al. 2016), v1.5 as in torchvision.

    model      block        blocks per stage   params (1000 classes)
    resnet18   basic        2, 2, 2, 2         11,689,512
    resnet34   basic        3, 4, 6, 3         21,797,672
    resnet50   bottleneck   3, 4, 6, 3         25,557,032
    resnet101  bottleneck   3, 4, 23, 3        44,549,160
    resnet152  bottleneck   3, 8, 36, 3        60,192,808

(`count_params` counts `params` only; BatchNorm running statistics live in `batch_stats`, as in
torchvision's `parameters()`.) "v1.5": a bottleneck block downsamples in its 3x3 conv, not in
its first 1x1 conv.

Structure, written for reading a ResNet as an ODE discretization:

- A residual module (`BasicResidual`, `BottleneckResidual`) computes only the residual branch
  `F(x)` = conv-BN-ReLU-...-conv-BN, with no addition and no final ReLU.
- `Projection` is the shortcut of a stage's first block when it changes shape (1x1 conv with
  stride + BN; torchvision's `downsample`).
- `ResNetStage` owns the residual modules `block0 .. block{n-1}` and the optional `shortcut`,
  and applies the update rule `x_{t+1} = relu(shortcut(x_t) + F_t(x_t))`, where `shortcut` is
  the projection for block 0 (when shapes change) and the identity otherwise. The update lives
  in `ResNetStage.update`, the one place a different discretization scheme replaces.

The residual and projection modules take `(features, strides, zero_init_last_bn, bn_axis_name,
dtype, param_dtype)` and are called as `module(x, train=...)`, so `functools.partial(
BottleneckResidual, features=64)` and `functools.partial(Projection, features=256, strides=2)`
plug into a generic residual stage such as `cnn.ode`'s `ODEStage` (`block`, `entry_block`,
`entry_shortcut`).

Parameter tree: `conv1`, `bn1`, `layer{1..4}/block{t}/{conv1,bn1,conv2,bn2[,conv3,bn3]}`,
`layer{s}/shortcut/{conv,bn}`, `fc` -- one-to-one with torchvision's `layer{s}.{t}.conv1`,
`layer{s}.0.downsample.{0,1}` (see `cnn.models.convert`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp

from cnn.models.layers import MaxPool, check_input, kaiming_fan_out, torch_linear_init
from cnn.models.registry import register

Dtype = Any

STAGE_SIZES = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
STAGE_FEATURES = (64, 128, 256, 512)


class _ConvBN(nn.Module):
    """Helpers shared by the residual modules: bias-free conv and torch-matching BatchNorm."""

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    bn_axis_name: str | None = None

    def conv(self, features: int, kernel: int, strides: int, name: str) -> nn.Conv:
        return nn.Conv(
            features, (kernel, kernel), strides=strides, padding=kernel // 2, use_bias=False,
            kernel_init=kaiming_fan_out, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
        )

    def norm(self, train: bool, name: str, zero_init: bool = False) -> nn.BatchNorm:
        return nn.BatchNorm(
            use_running_average=not train, momentum=0.9, epsilon=1e-5, axis_name=self.bn_axis_name,
            scale_init=nn.initializers.zeros if zero_init else nn.initializers.ones,
            dtype=self.dtype, param_dtype=self.param_dtype, name=name,
        )


class BasicResidual(_ConvBN):
    """`F(x)` of a basic block: conv3x3(stride)-BN-ReLU-conv3x3-BN, `[b,h,w,c] -> [b,h/s,w/s,features]`.

    Attributes:
      features: output maps (the block's output width; `expansion` = 1).
      strides: stride of the first conv (2 in the first block of stages 2-4).
      zero_init_last_bn: initialize the last BN's scale to 0 so that `F = 0` at init.
    """

    features: int = 64
    strides: int = 1
    zero_init_last_bn: bool = False

    expansion: ClassVar[int] = 1

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        y = nn.relu(self.norm(train, "bn1")(self.conv(self.features, 3, self.strides, "conv1")(x)))
        return self.norm(train, "bn2", self.zero_init_last_bn)(self.conv(self.features, 3, 1, "conv2")(y))


class BottleneckResidual(_ConvBN):
    """`F(x)` of a bottleneck block (v1.5): conv1x1-BN-ReLU-conv3x3(stride)-BN-ReLU-conv1x1-BN.

    `[b, h, w, c] -> [b, h/s, w/s, 4*features]`.

    Attributes:
      features: width of the inner 1x1/3x3 convs; the output has `expansion * features` = 4x maps.
      strides: stride of the 3x3 conv.
      zero_init_last_bn: initialize the last BN's scale to 0 so that `F = 0` at init.
    """

    features: int = 64
    strides: int = 1
    zero_init_last_bn: bool = False

    expansion: ClassVar[int] = 4

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        y = nn.relu(self.norm(train, "bn1")(self.conv(self.features, 1, 1, "conv1")(x)))
        y = nn.relu(self.norm(train, "bn2")(self.conv(self.features, 3, self.strides, "conv2")(y)))
        return self.norm(train, "bn3", self.zero_init_last_bn)(
            self.conv(self.features * self.expansion, 1, 1, "conv3")(y)
        )


class Projection(_ConvBN):
    """Shortcut that changes shape: 1x1 conv with stride + BN, `[b,h,w,c] -> [b,h/s,w/s,features]`."""

    features: int = 64
    strides: int = 1

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        return self.norm(train, "bn")(self.conv(self.features, 1, self.strides, "conv")(x))


def _remat_residual(residual_cls: type[nn.Module]) -> type[nn.Module]:
    """`nn.remat` of a residual module; `train` becomes a static positional argument for jax.checkpoint."""

    class Positional(residual_cls):
        def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:  # type: ignore[override]
            return super().__call__(x, train=train)

    Positional.__name__ = Positional.__qualname__ = residual_cls.__name__
    return nn.remat(Positional, static_argnums=(2,))


class ResNetStage(nn.Module):
    """A stage of residual blocks: `x_{t+1} = relu(shortcut(x_t) + F_t(x_t))`, t = 0..num_blocks-1.

    Block 0 may change shape (stride `strides`, width `expansion * features`); its shortcut is then
    a `Projection` (named "shortcut"), otherwise the identity. Blocks 1.. keep the shape and use
    the identity shortcut, so they are the steps of a residual ODE stage.

    Attributes:
      residual: the residual-module class (`BasicResidual` or `BottleneckResidual`).
      num_blocks: number of residual modules, named `block0 .. block{num_blocks-1}`.
      features: the residual modules' `features`.
      strides: stride of block 0.
      zero_init_last_bn: passed to every residual module.
      remat: recompute each residual module's activations in the backward pass (less memory).
      bn_axis_name, dtype, param_dtype: passed through.
    """

    residual: type[nn.Module] = BasicResidual
    num_blocks: int = 2
    features: int = 64
    strides: int = 1
    zero_init_last_bn: bool = False
    remat: bool = False
    bn_axis_name: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def update(self, x: jnp.ndarray, shortcut: jnp.ndarray, residual: jnp.ndarray) -> jnp.ndarray:
        """The update rule of one block: forward Euler with step 1 followed by ReLU.

        Args:
          x: the block input `x_t` (unused by this rule; other schemes need it).
          shortcut: `shortcut(x_t)`, equal to `x_t` except in a shape-changing block 0.
          residual: `F_t(x_t)`.
        """
        del x
        return nn.relu(shortcut + residual)

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        residual_cls = _remat_residual(self.residual) if self.remat else self.residual
        out_features = self.features * self.residual.expansion
        for t in range(self.num_blocks):
            strides = self.strides if t == 0 else 1
            f = residual_cls(
                features=self.features, strides=strides, zero_init_last_bn=self.zero_init_last_bn,
                bn_axis_name=self.bn_axis_name, dtype=self.dtype, param_dtype=self.param_dtype, name=f"block{t}",
            )
            fx = f(x, train) if self.remat else f(x, train=train)
            if t == 0 and (strides != 1 or x.shape[-1] != out_features):
                shortcut = Projection(
                    features=out_features, strides=strides, bn_axis_name=self.bn_axis_name,
                    dtype=self.dtype, param_dtype=self.param_dtype, name="shortcut",
                )(x, train=train)
            else:
                shortcut = x
            x = self.update(x, shortcut, fx)
        return x


class ResNet(nn.Module):
    """ImageNet ResNet: `[batch, h, w, 3] -> [batch, num_classes]` (224 canonical; any h, w >= 1).

    Stem: conv 7x7/2 (64) - BN - ReLU - max pool 3x3/2 (pad 1); four `ResNetStage`s with strides
    1, 2, 2, 2 and widths 64, 128, 256, 512 (x4 for bottlenecks); global average pool; fc.

    Attributes:
      depth: 18, 34, 50, 101 or 152 (basic blocks for 18/34, bottlenecks above).
      num_classes: output classes.
      zero_init_last_bn: zero-init the last BN scale of each residual branch (Goyal et al. 2017),
        so every block starts as the identity map.
      remat: rematerialize residual modules to save activation memory.
      stage_sizes: override the blocks per stage (default from `depth`).
      bn_axis_name: pmap/shard axis over which BatchNorm averages its statistics, if any.
      dtype: computation dtype; param_dtype: parameter storage dtype.
    """

    depth: int = 50
    num_classes: int = 1000
    zero_init_last_bn: bool = False
    remat: bool = False
    stage_sizes: Sequence[int] | None = None
    bn_axis_name: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    canonical_input_shape: ClassVar[tuple[int, int, int]] = (224, 224, 3)

    def __post_init__(self):
        if self.depth not in STAGE_SIZES:
            raise ValueError(f"depth={self.depth!r} is not an ImageNet ResNet depth; valid: {sorted(STAGE_SIZES)}")
        if self.stage_sizes is not None and (len(self.stage_sizes) != 4 or min(self.stage_sizes) < 1):
            raise ValueError(f"stage_sizes={self.stage_sizes!r} must be 4 positive block counts")
        super().__post_init__()

    @property
    def residual(self) -> type[nn.Module]:
        return BasicResidual if self.depth < 50 else BottleneckResidual

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        check_input(x, model=f"resnet{self.depth}", min_size=1)
        x = nn.Conv(
            64, (7, 7), strides=2, padding=3, use_bias=False, kernel_init=kaiming_fan_out,
            dtype=self.dtype, param_dtype=self.param_dtype, name="conv1",
        )(x)
        x = nn.relu(
            nn.BatchNorm(
                use_running_average=not train, momentum=0.9, epsilon=1e-5, axis_name=self.bn_axis_name,
                dtype=self.dtype, param_dtype=self.param_dtype, name="bn1",
            )(x)
        )
        x = MaxPool(3, 2, padding=1, name="maxpool")(x)
        sizes = tuple(self.stage_sizes) if self.stage_sizes is not None else STAGE_SIZES[self.depth]
        for stage, (num_blocks, features) in enumerate(zip(sizes, STAGE_FEATURES)):
            x = ResNetStage(
                residual=self.residual, num_blocks=num_blocks, features=features, strides=1 if stage == 0 else 2,
                zero_init_last_bn=self.zero_init_last_bn, remat=self.remat, bn_axis_name=self.bn_axis_name,
                dtype=self.dtype, param_dtype=self.param_dtype, name=f"layer{stage + 1}",
            )(x, train=train)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(
            self.num_classes, kernel_init=torch_linear_init, dtype=self.dtype, param_dtype=self.param_dtype,
            name="fc",
        )(x)


def _resnet_constructor(depth: int):
    def make(**options: Any) -> ResNet:
        return ResNet(depth=depth, **options)

    make.__name__ = make.__qualname__ = f"resnet{depth}"
    make.__doc__ = f"ResNet-{depth} (ImageNet, v1.5); options as `ResNet`."
    return make


for _depth in STAGE_SIZES:
    register(f"resnet{_depth}")(_resnet_constructor(_depth))
register("resnet")(ResNet)
