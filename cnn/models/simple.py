"""A small configurable ConvNet for quick runs and tests of the training engine.

`simple_cnn` is `depth` conv-BN-ReLU blocks per stage, one stage per entry of `widths`, a 2x2
pooling between stages, global average pooling and a dense classifier:

    model = cnn.models.create("simple_cnn", num_classes=10, widths=(16, 32))
    variables = model.init(key, images, train=False)   # images: [batch, height, width, channels]
    logits = model.apply(variables, images, train=False)  # [batch, num_classes]

It compiles in about a second on CPU for 8x8 digits, which keeps trainer tests fast.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from cnn.models.layers import check_image_input
from cnn.models.registry import register

_POOLING = ("max", "avg", "none")


@register("simple_cnn")
class SimpleCNN(nn.Module):
    """Conv-BN-ReLU stages, global average pooling and a dense classifier.

    Attributes:
      num_classes: number of output logits.
      widths: output channels of each stage, e.g. `(16, 32)`.
      depth: conv-BN-ReLU blocks per stage.
      pooling: downsampling between stages: "max", "avg" (2x2, stride 2, SAME) or "none".
      use_batch_norm: put BatchNorm after each convolution (else a conv bias is used).
      bn_momentum: BatchNorm running-average momentum.
      bn_axis_name: mapped axis over which BatchNorm averages batch statistics (e.g. "batch"
        under `jax.pmap`), so that per-device normalization uses global-batch statistics.
      dropout_rate: dropout before the classifier (rng stream "dropout").
      dtype: computation dtype (e.g. `jnp.bfloat16` for mixed precision).
      param_dtype: parameter dtype (float32 in mixed precision; BatchNorm statistics stay float32).
    """

    num_classes: int = 10
    widths: Sequence[int] = (16, 32)
    depth: int = 1
    pooling: str = "max"
    use_batch_norm: bool = True
    bn_momentum: float = 0.9
    bn_axis_name: str | None = None
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        """Maps images `[batch, height, width, channels]` to logits `[batch, num_classes]`."""
        check_image_input(self, x, first_conv="Conv_0", model="simple_cnn")
        if self.pooling not in _POOLING:
            raise ValueError(f"pooling={self.pooling!r} is not one of {_POOLING}")
        if self.depth < 1 or not self.widths:
            raise ValueError(f"need depth >= 1 and at least one width, got depth={self.depth}, widths={self.widths}")
        if x.ndim != 4:
            raise ValueError(f"images must be [batch, height, width, channels], got shape {x.shape}")
        x = x.astype(self.dtype)
        for stage, width in enumerate(self.widths):
            if stage > 0 and self.pooling != "none":
                pool = nn.max_pool if self.pooling == "max" else nn.avg_pool
                x = pool(x, window_shape=(2, 2), strides=(2, 2), padding="SAME")
            for _ in range(self.depth):
                x = nn.Conv(
                    int(width),
                    (3, 3),
                    padding="SAME",
                    use_bias=not self.use_batch_norm,
                    dtype=self.dtype,
                    param_dtype=self.param_dtype,
                )(x)
                if self.use_batch_norm:
                    x = nn.BatchNorm(
                        use_running_average=not train,
                        momentum=self.bn_momentum,
                        axis_name=self.bn_axis_name,
                        dtype=self.dtype,
                        param_dtype=self.param_dtype,
                    )(x)
                x = nn.relu(x)
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype)(x)
