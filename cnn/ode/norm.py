"""BatchNorm with running statistics per `F` evaluation of a scheme step.

A Runge-Kutta step evaluates the same residual function `F` several times (RK2 twice, RK4 four
times, an implicit tableau once per stage and sweep), each time on a differently distributed
input: `x`, then `x + h/2 F(x)`, ... A plain BatchNorm inside `F` normalizes every evaluation
with that evaluation's batch statistics in training, but keeps *one* running average of all of
them, so in eval mode no evaluation is normalized as it was in training. On Fashion-MNIST that cost
RK2 up to 4 points and backward Euler up to 58 points of test accuracy, while the same weights
scored like Euler with batch statistics (`experiments/RESULTS.md`, section 2b).

`EvaluationBatchNorm` keeps one set of running statistics per evaluation and shares the affine
parameters (`F` is the same function at every evaluation). Evaluation 0 is exactly
`flax.linen.BatchNorm`, with its variable names (`params/{scale,bias}`,
`batch_stats/{mean,var}`), so one-evaluation schemes, the stems and shortcuts, and converted
torchvision weights are unchanged; evaluation `k >= 1` keeps its statistics in a child
`eval{k}` (`batch_stats/eval{k}/{mean,var}`), created when a step first calls it.

    norm = EvaluationBatchNorm(use_running_average=not train, momentum=0.9)
    y0 = norm(x0)                   # evaluation 0: batch_stats/mean, var
    y1 = norm(x1, evaluation=1)     # evaluation 1: batch_stats/eval1/mean, var; same scale, bias

`cnn.ode.ODEStage` numbers the evaluations of each step and passes `evaluation=k` to residual
blocks whose `__call__` takes an `evaluation` argument (the model zoo's ResNet blocks do, and hand
it to their norms); `per_evaluation_stats=False` restores the shared statistics.
"""

from __future__ import annotations

import dataclasses
import operator
import re

import flax.linen as nn
import jax.numpy as jnp

EVALUATION_PREFIX = "eval"


def is_evaluation_name(name: object) -> bool:
    """Whether `name` is that of the child holding evaluation k >= 1's statistics (`eval{k}`)."""
    return isinstance(name, str) and re.fullmatch(rf"{EVALUATION_PREFIX}[1-9]\d*", name) is not None


class EvaluationBatchNorm(nn.BatchNorm):
    """`flax.linen.BatchNorm` with separate running statistics for each scheme evaluation.

    `__call__(x, use_running_average=None, *, evaluation=0)`: `x` of any shape with features on
    `axis` (NHWC: `[batch, height, width, channels]`), output of the same shape. All attributes
    are `flax.linen.BatchNorm`'s.
    """

    @nn.compact
    def __call__(self, x: jnp.ndarray, use_running_average: bool | None = None, *, evaluation: int = 0):
        try:
            evaluation = operator.index(evaluation)
        except TypeError:
            raise ValueError(f"evaluation={evaluation!r}: must be a non-negative Python int") from None
        if evaluation < 0:
            raise ValueError(f"evaluation={evaluation}: must be >= 0")
        if evaluation == 0:
            return super().__call__(x, use_running_average)
        running = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        # The same normalization without the affine part, with its own statistics ...
        fields = {
            field.name: getattr(self, field.name)
            for field in dataclasses.fields(nn.BatchNorm)
            if field.init and field.name not in ("parent", "name")
        }
        fields.update(use_running_average=running, use_scale=False, use_bias=False)
        y = nn.BatchNorm(**fields, name=f"{EVALUATION_PREFIX}{evaluation}")(x)
        # ... then the affine parameters of evaluation 0 (declared alike: same names and shapes).
        feature_axes = _axes(x.ndim, self.axis)
        feature_shape = tuple(x.shape[axis] for axis in feature_axes)
        broadcast = [x.shape[axis] if axis in feature_axes else 1 for axis in range(x.ndim)]
        if self.use_scale:
            scale = self.param("scale", self.scale_init, feature_shape, self.param_dtype)
            y = y * jnp.reshape(scale, broadcast).astype(y.dtype)
        if self.use_bias:
            bias = self.param("bias", self.bias_init, feature_shape, self.param_dtype)
            y = y + jnp.reshape(bias, broadcast).astype(y.dtype)
        return y


def _axes(ndim: int, axis: int | tuple[int, ...]) -> tuple[int, ...]:
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    return tuple(sorted(a % ndim for a in axes))


__all__ = ["EVALUATION_PREFIX", "EvaluationBatchNorm", "is_evaluation_name"]
