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
- `Projection` is the shortcut S of a stage's first block when it changes shape (1x1 conv with
  stride + BN; torchvision's `downsample`).
- The stage applies the update rule. With `scheme=None` (default) it is `ResNetStage`, the
  torchvision parameter layout: `x_{t+1} = relu(S_t(x_t) + F_t(x_t))`, S the projection for
  block 0 when shapes change and the identity otherwise (`ResNetStage.update`).

Any discretization scheme (`cnn.ode.schemes`): `scheme="euler"`, `"lm"`, `"rk2"`/`"midpoint"`,
`"heun"`, `"rk4"`, `"ab2"`, `"leapfrog"`, `"backward_euler"`, `"two_step"`, ... builds every
stage as a `cnn.ode.ODEStage` stepping the same residual modules, each step followed by ReLU
(He et al.'s post-activation layout, `step_activation=nn.relu`):

    cnn.models.create("resnet50", scheme="lm")     # x_{t+1} = relu((1-k_t) x_t + k_t x_{t-1} + F_t(x_t))
    cnn.models.create("resnet50", scheme="euler")  # torchvision's ResNet-50, ODEStage layout
    cnn.models.create("resnet18", scheme="rk4", scheme_options={"h": 0.5}, scan=False)

- `scheme="euler"` (h = 1) is exactly torchvision's network: the same 25,557,032 parameters for
  ResNet-50 and, given the same weights (`cnn.models.convert` maps them), the same outputs and
  BatchNorm updates (to float rounding; scanned stages compile differently). Other schemes reuse the same weights in every `F` evaluation (RK stages), so
  their counts equal Euler's; schemes with learnable knobs add one scalar per knob per block
  (LM-ResNet: `sum(stage_sizes)` = 16 for ResNet-50).
- Transitions: the first block of stages 2-4 (and of stage 1 for bottlenecks, 64 -> 256 maps)
  changes shape; it is the stage's entry block with the `Projection` S as its shortcut. There
  Runge-Kutta schemes take `x_1 = relu(S(x_0) + h F_0(x_0))`. Multistep schemes follow
  `history_at_entry`: "restart" (default, as the LM-ResNet reference code) discards the
  incoming history and takes the start step (below) with S -- for `start="euler"` the same
  `relu(S(x_0) + h F_0(x_0))`, the history restarting as `(S(x_0), F_0(x_0))`; "project" maps the
  incoming past states and derivatives through S and applies the scheme's own formula.
- Start: the history is carried from stage to stage (as in `cifar_resnet`). A block with no past
  -- the network's first block, and with "restart" every transition block -- takes the step
  given by `start`: "euler" (default) `x_1 = x_0 + h F_0(x_0)`, or "copy" (the missing past is
  `x_0` itself; see `cnn.ode.schemes`), then ReLU. Stage 1 of ResNet-18/34 has no transition, so
  its block 0 is a plain (non-entry) step that starts the scheme.
- `tied`, `scan`, `remat`, `start`, `history_at_entry`, `per_evaluation_stats`: the ResNet's
  `stage` field, a `cnn.ode.StageOptions` (the factories also take them flat, `scan=False`);
  `final_survival` (stochastic depth, survival linear in depth over all `sum(stage_sizes)`
  blocks): see `ResNet` and `cnn.ode.stage`.

The residual and projection modules take `(features, strides, zero_init_last_bn, bn_axis_name,
dtype, param_dtype)` and are called as `module(x, train=...)`, so `functools.partial(
BottleneckResidual, features=64)` and `functools.partial(Projection, features=256, strides=2)`
plug into `ODEStage` (`block`, `entry_block`, `entry_shortcut`).

Parameter trees:
- `scheme=None`: `conv1`, `bn1`, `layer{1..4}/block{t}/{conv1,bn1,conv2,bn2[,conv3,bn3]}`,
  `layer{s}/shortcut/{conv,bn}`, `fc` -- one-to-one with torchvision's `layer{s}.{t}.conv1`,
  `layer{s}.0.downsample.{0,1}` (see `cnn.models.convert`).
- with a scheme: `layer{s}/entry/{block,shortcut}` (stages with a transition: torchvision's
  block 0 and downsample), then `layer{s}/blocks/block` (the remaining blocks stacked on a leading
  axis, `scan=True`) or `layer{s}/blocks_{i}/block` (`scan=False`), or `layer{s}/tied_block/block`
  (`tied=True`), and `layer{s}/knobs/<name>` `[num_blocks]` for schemes with knobs.
  `cnn.models.convert` reads torchvision weights into this layout (untied, scanned or not);
  `cnn.ode.stack_unrolled` / `unstack_scanned` convert between scanned and unrolled.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp

from cnn.models.layers import MaxPool, check_image_input, check_input, kaiming_fan_out, torch_linear_init
from cnn.models.registry import register
from cnn.ode.norm import EvaluationBatchNorm
from cnn.ode.schemes import Scheme, get_scheme
from cnn.ode.stage import ODEStage, StageOptions, fold_stage_options, linear_drop_path_rates
from cnn.ops.conv import conv_general_dilated

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
            conv_general_dilated=conv_general_dilated,  # fast gradients inside nn.scan on CPU
        )

    def norm(self, train: bool, name: str, zero_init: bool = False) -> EvaluationBatchNorm:
        # nn.BatchNorm itself unless called with `evaluation=k >= 1` (cnn.ode.norm)
        return EvaluationBatchNorm(
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
    def __call__(self, x: jnp.ndarray, *, train: bool, evaluation: int = 0) -> jnp.ndarray:
        """`evaluation`: which `F` evaluation of a scheme step this is (`cnn.ode.norm`)."""
        y = nn.relu(self.norm(train, "bn1")(self.conv(self.features, 3, self.strides, "conv1")(x), evaluation=evaluation))
        return self.norm(train, "bn2", self.zero_init_last_bn)(
            self.conv(self.features, 3, 1, "conv2")(y), evaluation=evaluation
        )


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
    def __call__(self, x: jnp.ndarray, *, train: bool, evaluation: int = 0) -> jnp.ndarray:
        """`evaluation`: which `F` evaluation of a scheme step this is (`cnn.ode.norm`)."""
        y = nn.relu(self.norm(train, "bn1")(self.conv(self.features, 1, 1, "conv1")(x), evaluation=evaluation))
        y = nn.relu(self.norm(train, "bn2")(self.conv(self.features, 3, self.strides, "conv2")(y), evaluation=evaluation))
        return self.norm(train, "bn3", self.zero_init_last_bn)(
            self.conv(self.features * self.expansion, 1, 1, "conv3")(y), evaluation=evaluation
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

    Stem: conv 7x7/2 (64) - BN - ReLU - max pool 3x3/2 (pad 1); four stages with strides 1, 2, 2,
    2 and widths 64, 128, 256, 512 (x4 for bottlenecks); global average pool; fc. The stages are
    `ResNetStage`s (`scheme=None`) or `cnn.ode.ODEStage`s stepped by `scheme` (module docstring).

    Attributes:
      depth: 18, 34, 50, 101 or 152 (basic blocks for 18/34, bottlenecks above).
      num_classes: output classes.
      zero_init_last_bn: zero-init the last BN scale of each residual branch (Goyal et al. 2017),
        so every block starts as the identity map.
      stage_sizes: override the blocks per stage (default from `depth`).
      bn_axis_name: pmap/shard axis over which BatchNorm averages its statistics, if any.
      dtype: computation dtype; param_dtype: parameter storage dtype.
      scheme: None (torchvision layout, `ResNetStage`), or a `cnn.ode.Scheme` / scheme name
        ("euler", "lm", "rk2", "rk4", "ab2", ...; `cnn.ode.available_schemes()`). Scheme options
        (`h`, `k_init`, ...) go through `create(..., scheme_options={...})` or `get_scheme`.
      stage: `cnn.ode.StageOptions` of the four stages (tied, scan, remat, start,
        history_at_entry, per_evaluation_stats; defaults: the LM-ResNet paper's). Without a
        scheme only `remat` (rematerialize each residual module) applies, `scan` is ignored and
        the others must keep their defaults. `imagenet_resnet` also takes them flat (`scan=False`).
      final_survival: with a scheme, stochastic depth: survival probability of the last block
        (1 = off), linear in depth over all `sum(stage_sizes)` blocks; rng stream "dropout".
    """

    depth: int = 50
    num_classes: int = 1000
    zero_init_last_bn: bool = False
    stage_sizes: Sequence[int] | None = None
    bn_axis_name: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    scheme: Scheme | str | None = None
    stage: StageOptions = StageOptions()
    final_survival: float = 1.0

    canonical_input_shape: ClassVar[tuple[int, int, int]] = (224, 224, 3)

    def __post_init__(self):
        if self.depth not in STAGE_SIZES:
            raise ValueError(f"depth={self.depth!r} is not an ImageNet ResNet depth; valid: {sorted(STAGE_SIZES)}")
        if self.stage_sizes is not None and (len(self.stage_sizes) != 4 or min(self.stage_sizes) < 1):
            raise ValueError(f"stage_sizes={self.stage_sizes!r} must be 4 positive block counts")
        if not isinstance(self.stage, StageOptions):
            raise ValueError(
                f"stage={self.stage!r}: expected a cnn.ode.StageOptions (imagenet_resnet converts a mapping)"
            )
        if self.scheme is None:
            # These options belong to ODEStage; silently ignoring them would train another network.
            defaults = StageOptions()
            ode_only = {name: (getattr(self.stage, name), getattr(defaults, name))
                        for name in ("tied", "start", "history_at_entry", "per_evaluation_stats")}
            ode_only["final_survival"] = (self.final_survival, 1.0)
            for option, (value, default) in ode_only.items():
                if value != default:
                    raise ValueError(
                        f"{option}={value!r} needs a discretization scheme; scheme=None builds the "
                        f"torchvision-layout ResNetStage. Pass scheme='euler' for the same network as ODE stages"
                    )
        else:
            get_scheme(self.scheme)  # unknown names raise here, at construction
            linear_drop_path_rates(sum(self.sizes), self.final_survival)  # validates final_survival
        super().__post_init__()

    @property
    def residual(self) -> type[nn.Module]:
        return BasicResidual if self.depth < 50 else BottleneckResidual

    @property
    def sizes(self) -> tuple[int, ...]:
        """Blocks per stage: `stage_sizes`, or the depth's standard sizes."""
        return tuple(self.stage_sizes) if self.stage_sizes is not None else STAGE_SIZES[self.depth]

    def transitions(self) -> tuple[bool, ...]:
        """Per stage, whether block 0 changes shape (has a `Projection` shortcut / an entry block)."""
        channels, out = 64, []
        for stage, features in enumerate(STAGE_FEATURES):
            width = features * self.residual.expansion
            out.append(stage > 0 or channels != width)
            channels = width
        return tuple(out)

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        check_image_input(self, x, first_conv="conv1", model=f"resnet{self.depth}")
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
        x = self._torchvision_stages(x, train) if self.scheme is None else self._ode_stages(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(
            self.num_classes, kernel_init=torch_linear_init, dtype=self.dtype, param_dtype=self.param_dtype,
            name="fc",
        )(x)

    def _torchvision_stages(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        for stage, (num_blocks, features) in enumerate(zip(self.sizes, STAGE_FEATURES)):
            x = ResNetStage(
                residual=self.residual, num_blocks=num_blocks, features=features, strides=1 if stage == 0 else 2,
                zero_init_last_bn=self.zero_init_last_bn, remat=self.stage.remat, bn_axis_name=self.bn_axis_name,
                dtype=self.dtype, param_dtype=self.param_dtype, name=f"layer{stage + 1}",
            )(x, train=train)
        return x

    def _ode_stages(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        scheme = get_scheme(self.scheme)
        sizes = self.sizes
        rates = linear_drop_path_rates(sum(sizes), self.final_survival) if self.final_survival < 1.0 else ()
        layers = dict(bn_axis_name=self.bn_axis_name, dtype=self.dtype, param_dtype=self.param_dtype)
        history, first_block = None, 0
        for stage, (num_blocks, features) in enumerate(zip(sizes, STAGE_FEATURES)):
            strides = 1 if stage == 0 else 2
            width = features * self.residual.expansion
            transition = strides != 1 or x.shape[-1] != width
            residual = functools.partial(
                self.residual, features=features, zero_init_last_bn=self.zero_init_last_bn, **layers
            )
            x, history = ODEStage(
                scheme=scheme,
                block=functools.partial(residual, strides=1),
                num_blocks=num_blocks,
                entry_block=functools.partial(residual, strides=strides) if transition else None,
                entry_shortcut=functools.partial(Projection, features=width, strides=strides, **layers)
                if transition else None,
                options=self.stage,
                drop_path_rates=tuple(rates[first_block : first_block + num_blocks]),
                step_activation=nn.relu,
                param_dtype=self.param_dtype,
                name=f"layer{stage + 1}",
            )(x, history, train=train)
            first_block += num_blocks
        return x


def _resolve_scheme(scheme: Scheme | str | None, scheme_options: Mapping[str, Any] | None) -> Scheme | None:
    """`get_scheme(scheme, **scheme_options)`, or None for the torchvision layout."""
    if scheme is None:
        if scheme_options:
            raise ValueError(
                f"scheme_options={dict(scheme_options)!r} given without a scheme; pass scheme='euler', 'lm', ..."
            )
        return None
    return get_scheme(scheme, **dict(scheme_options or {}))


@register("resnet")
def imagenet_resnet(
    *,
    depth: int = 50,
    scheme: Scheme | str | None = None,
    scheme_options: Mapping[str, Any] | None = None,
    **options: Any,
) -> ResNet:
    """Builds a `ResNet`; `scheme_options` go to `cnn.ode.get_scheme` (e.g. `{"h": 0.5}`,
    `{"k_init": (-0.1, 0.0), "constrain": True}`); other options are `ResNet` attributes, except
    that the `cnn.ode.StageOptions` fields may come flat (`scan=False`, `remat=True`) and `stage`
    may be a mapping (`fold_stage_options`)."""
    return ResNet(depth=depth, scheme=_resolve_scheme(scheme, scheme_options), **fold_stage_options(options))


def _resnet_constructor(depth: int):
    def make(**options: Any) -> ResNet:
        if "depth" in options:
            raise ValueError(
                f"depth={options['depth']!r}: this name fixes depth={depth}; use create('resnet', depth=...)"
            )
        return imagenet_resnet(depth=depth, **options)

    make.__name__ = make.__qualname__ = f"resnet{depth}"
    make.__doc__ = f"ResNet-{depth} (ImageNet, v1.5); options as `imagenet_resnet` / `ResNet`."
    return make


for _depth in STAGE_SIZES:
    register(f"resnet{_depth}")(_resnet_constructor(_depth))


__all__ = [
    "STAGE_FEATURES",
    "STAGE_SIZES",
    "BasicResidual",
    "BottleneckResidual",
    "Projection",
    "ResNet",
    "ResNetStage",
    "imagenet_resnet",
]
