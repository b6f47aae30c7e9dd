"""CIFAR ResNets (He et al. 2016, section 4.2), with any ODE discretization scheme.

Depth `6n + 2`: a 3x3 conv with 16 maps, three stages of `n` residual blocks with 16, 32, 64
maps on 32x32, 16x16, 8x8 (the first block of stages 2 and 3 has stride 2), global average
pooling and a dense classifier. Parameters (10 classes, option A):

    depth     20        32        44        56        110         1202
    params    269,722   464,154   658,586   853,018   1,727,962   19,421,274
              (the paper's 0.27M, 0.46M, 0.66M, 0.85M, 1.7M, 19.4M)

Shortcuts where the shape changes: option "A" is the parameter-free identity that subsamples
with the stride and zero-pads the new channels (half on each side, as in the widely used
PyTorch reproduction); option "B" is a strided 1x1 projection (+ BN), only at those two
transitions. Everywhere else the shortcut is the identity.

Read as an ODE: each residual module (`CifarResidual`) computes only `F(x)`; the stages are
`cnn.ode.ODEStage`s that apply the scheme, so

    cnn.models.create("cifar_resnet", depth=56, scheme="lm", num_classes=10)

is the LM-ResNet 56 `x_{t+1} = (1 - k_t) x_t + k_t x_{t-1} + F_t(x_t)` (one extra scalar per
block) and `scheme="euler"` (default) is He et al.'s network. Two block layouts:

- `preactivation=False` (He et al. 2016, default): `F = BN(conv(relu(BN(conv(x)))))`, stem
  conv-BN-ReLU, and each step is followed by ReLU (`step_activation`), as in the paper:
  `x_{t+1} = relu(x_t + F(x_t))`.
- `preactivation=True` (He et al. 2016b, and the LM-ResNet reference code): `F =
  conv(relu(BN(conv(relu(BN(x))))))`, stem conv only, a final BN-ReLU before pooling, and no
  activation between steps -- each stage is then exactly the scheme applied to `F`. With option
  "B" the projection is BN-ReLU-conv1x1 (the reference code's `Downsample`).

Names registered: "cifar_resnet" (any depth), "resnet{d}" / "cifar_resnet{d}" for d in 20, 32,
44, 56, 110, 1202 (He et al.'s networks), and "lm_resnet{d}" (scheme "lm" with the reference
code's pre-activation blocks and projection shortcuts).
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from cnn.models.layers import check_image_input, kaiming_fan_out
from cnn.models.registry import register
from cnn.ode.norm import EvaluationBatchNorm
from cnn.ode.schemes import Scheme, get_scheme
from cnn.ode.stage import ODEStage, StageOptions, fold_stage_options, linear_drop_path_rates
from cnn.ops.conv import conv_general_dilated

Dtype = Any
SHORTCUTS = ("A", "B")
DEPTHS = (20, 32, 44, 56, 110, 1202)


def blocks_per_stage(depth: int) -> int:
    """`n` for depth `6n + 2`; raises ValueError naming `depth` otherwise."""
    try:
        depth = operator.index(depth)
    except TypeError:
        raise ValueError(f"depth={depth!r}: must be an integer 6n+2") from None
    if depth < 8 or (depth - 2) % 6 != 0:
        raise ValueError(f"depth={depth!r}: a CIFAR ResNet has depth 6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, 110, ...)")
    return (depth - 2) // 6


class _Layers(nn.Module):
    """Bias-free convs (He init, fan-out) and BatchNorm (momentum 0.9, eps 1e-5) with shared dtypes."""

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    bn_axis_name: str | None = None

    def conv(self, features: int, kernel: int, strides: int, name: str) -> nn.Conv:
        return nn.Conv(
            features, (kernel, kernel), strides=strides, padding=kernel // 2 if kernel > 1 else 0,
            use_bias=False, kernel_init=kaiming_fan_out, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
            conv_general_dilated=conv_general_dilated,  # fast gradients inside nn.scan on CPU
        )

    def norm(self, train: bool, name: str) -> EvaluationBatchNorm:
        # nn.BatchNorm itself unless called with `evaluation=k >= 1` (cnn.ode.norm)
        return EvaluationBatchNorm(
            use_running_average=not train, momentum=0.9, epsilon=1e-5, axis_name=self.bn_axis_name,
            dtype=self.dtype, param_dtype=self.param_dtype, name=name,
        )


class CifarResidual(_Layers):
    """The residual branch `F(x)` of a basic block, `[b, h, w, c] -> [b, h/s, w/s, features]`.

    Post-activation: conv3x3(stride)-BN-ReLU-conv3x3-BN. Pre-activation: BN-ReLU-conv3x3(stride)-
    BN-ReLU-conv3x3. No addition, no final ReLU: the stage applies the scheme.
    """

    features: int = 16
    strides: int = 1
    preactivation: bool = False

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool, evaluation: int = 0) -> jnp.ndarray:
        """`evaluation`: which `F` evaluation of a scheme step this is (per-evaluation BatchNorm
        statistics, `cnn.ode.norm`); 0 outside multi-evaluation schemes."""
        bn1 = lambda y: self.norm(train, "bn1")(y, evaluation=evaluation)  # noqa: E731
        bn2 = lambda y: self.norm(train, "bn2")(y, evaluation=evaluation)  # noqa: E731
        if self.preactivation:
            y = self.conv(self.features, 3, self.strides, "conv1")(nn.relu(bn1(x)))
            return self.conv(self.features, 3, 1, "conv2")(nn.relu(bn2(y)))
        y = nn.relu(bn1(self.conv(self.features, 3, self.strides, "conv1")(x)))
        return bn2(self.conv(self.features, 3, 1, "conv2")(y))


class PadShortcut(nn.Module):
    """Option A: `x[:, ::s, ::s, :]` zero-padded to `features` channels (half before, half after).

    `[b, h, w, c] -> [b, ceil(h/s), ceil(w/s), features]`, no parameters.
    """

    features: int
    strides: int = 2

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        del train
        extra = self.features - x.shape[-1]
        if extra < 0:
            raise ValueError(f"features={self.features}: option-A shortcut cannot shrink {x.shape[-1]} channels")
        x = x[:, :: self.strides, :: self.strides, :]
        return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))


class ProjectionShortcut(_Layers):
    """Option B: strided 1x1 conv + BN (post-activation) or BN-ReLU + strided 1x1 conv (pre-activation).

    `[b, h, w, c] -> [b, ceil(h/s), ceil(w/s), features]`.
    """

    features: int = 32
    strides: int = 2
    preactivation: bool = False

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        if self.preactivation:
            return self.conv(self.features, 1, self.strides, "conv")(nn.relu(self.norm(train, "bn")(x)))
        return self.norm(train, "bn")(self.conv(self.features, 1, self.strides, "conv")(x))


class CifarResNet(_Layers):
    """CIFAR ResNet of depth `6n+2`: `[batch, h, w, channels] -> [batch, num_classes]` float32 logits.

    Canonical input 32x32x3; any size works (global average pooling).

    Attributes:
      depth: 6n + 2.
      num_classes: logits.
      width: maps of the first stage (16); stages have width, 2 width, 4 width.
      shortcut: "A" (zero-padded identity) or "B" (1x1 projection) at the two transitions.
      preactivation: block layout (module docstring).
      scheme: a `cnn.ode.Scheme` or scheme name ("euler", "lm", "rk2", "rk4", "ab2", ...).
      stage: `cnn.ode.StageOptions` of all three stages (tied, scan, remat, start,
        history_at_entry, per_evaluation_stats; defaults: the LM-ResNet paper's). `cifar_resnet`
        also takes them as flat keywords (`scan=False`).
      final_survival: stochastic depth; survival probability of the last block (1 = off),
        linear in depth over all `3n` blocks.
      bn_axis_name, dtype, param_dtype: BatchNorm cross-device axis and dtypes.
    """

    depth: int = 20
    num_classes: int = 10
    width: int = 16
    shortcut: str = "A"
    preactivation: bool = False
    scheme: Scheme | str = "euler"
    stage: StageOptions = StageOptions()
    final_survival: float = 1.0

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        check_image_input(self, x, first_conv="conv1", model=f"cifar_resnet (depth {self.depth})")
        n = blocks_per_stage(self.depth)
        if self.shortcut not in SHORTCUTS:
            raise ValueError(f"shortcut={self.shortcut!r}: must be 'A' (zero-padded identity) or 'B' (1x1 projection)")
        if x.ndim != 4:
            raise ValueError(f"x has shape {tuple(x.shape)}; expected [batch, height, width, channels]")
        scheme = get_scheme(self.scheme)
        rates = linear_drop_path_rates(3 * n, self.final_survival) if self.final_survival < 1.0 else ()
        layers = dict(dtype=self.dtype, param_dtype=self.param_dtype, bn_axis_name=self.bn_axis_name)

        x = self.conv(self.width, 3, 1, "conv1")(x.astype(self.dtype))
        if not self.preactivation:
            x = nn.relu(self.norm(train, "bn1")(x))
        history = None
        for s in range(3):
            features = self.width * 2**s
            strides = 1 if s == 0 else 2
            transition = strides != 1 or x.shape[-1] != features
            if self.shortcut == "A":
                shortcut = functools.partial(PadShortcut, features=features, strides=strides)
            else:
                shortcut = functools.partial(
                    ProjectionShortcut, features=features, strides=strides, preactivation=self.preactivation, **layers
                )
            residual = functools.partial(CifarResidual, features=features, preactivation=self.preactivation, **layers)
            stage = ODEStage(
                scheme=scheme,
                block=functools.partial(residual, strides=1),
                num_blocks=n,
                entry_block=functools.partial(residual, strides=strides) if transition else None,
                entry_shortcut=shortcut if transition else None,
                options=self.stage,
                drop_path_rates=tuple(rates[s * n : (s + 1) * n]),
                step_activation=None if self.preactivation else nn.relu,
                param_dtype=self.param_dtype,
                name=f"stage{s + 1}",
            )
            x, history = stage(x, history, train=train)
        if self.preactivation:
            x = nn.relu(self.norm(train, "bn_final")(x))
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype, name="fc")(x)
        return x.astype(jnp.float32)


@register("cifar_resnet")
def cifar_resnet(
    *,
    depth: int = 20,
    num_classes: int = 10,
    scheme: Scheme | str = "euler",
    scheme_options: Mapping[str, Any] | None = None,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    **options: Any,
) -> CifarResNet:
    """Builds a `CifarResNet`; `scheme_options` go to `cnn.ode.get_scheme` (e.g. `{"h": 0.5}`,
    `{"k_init": (-0.1, 0.0), "constrain": True}`); other options are `CifarResNet` attributes,
    except that the `cnn.ode.StageOptions` fields may come flat (`scan=False`, `tied=True`) and
    `stage` may be a mapping (`fold_stage_options`)."""
    blocks_per_stage(depth)
    resolved = get_scheme(scheme, **dict(scheme_options or {}))
    return CifarResNet(
        depth=depth, num_classes=num_classes, scheme=resolved, dtype=dtype, param_dtype=param_dtype,
        **fold_stage_options(options),
    )


def _fixed_depth(depth: int, **defaults: Any):
    def constructor(**options: Any) -> CifarResNet:
        if "depth" in options:
            raise ValueError(
                f"depth={options['depth']!r}: this name fixes depth={depth}; use create('cifar_resnet', depth=...)"
            )
        return cifar_resnet(depth=depth, **{**defaults, **options})

    constructor.__name__ = f"cifar_resnet{depth}"
    constructor.__doc__ = f"CIFAR ResNet-{depth} (`cifar_resnet(depth={depth}, ...)`, defaults {defaults or 'He et al.'})."
    return constructor


for _depth in DEPTHS:
    register(f"resnet{_depth}", f"cifar_resnet{_depth}")(_fixed_depth(_depth))
    register(f"lm_resnet{_depth}")(_fixed_depth(_depth, scheme="lm", preactivation=True, shortcut="B"))


__all__ = [
    "CifarResNet",
    "CifarResidual",
    "DEPTHS",
    "PadShortcut",
    "ProjectionShortcut",
    "blocks_per_stage",
    "cifar_resnet",
]
