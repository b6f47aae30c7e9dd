"""Receptive fields of stacks of convolutions and poolings, computed and measured.

For layers `l = 1..L` with kernel `f_l`, stride `s_l` and dilation `d_l`, the receptive field
`r` of one output unit on the input and the distance `j` between neighbouring units (the *jump*,
measured in input pixels) obey

    r_l = r_{l-1} + (d_l * (f_l - 1)) * j_{l-1},      j_l = j_{l-1} * s_l,      r_0 = j_0 = 1.

Stacked 3x3 convolutions with dilations 1, 2, 4 (stride 1) therefore see 3, 7, 15 pixels: the
receptive field grows exponentially with depth while the parameter count grows linearly (Yu &
Koltun 2016). `empirical_receptive_field` measures the same quantity from gradients.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cnn.ops.arithmetic import effective_kernel_size, is_integer


@dataclasses.dataclass(frozen=True)
class LayerGeometry:
    """One convolution or pooling layer along one spatial dimension."""

    kernel: int
    stride: int = 1
    dilation: int = 1
    padding: int = 0


@dataclasses.dataclass(frozen=True)
class ReceptiveField:
    """After a layer: receptive-field size, jump between units, centre of the first unit."""

    size: int
    jump: int
    start: float


def receptive_fields(layers: Sequence[LayerGeometry | tuple[int, ...]]) -> list[ReceptiveField]:
    """Receptive field after each layer of a stack (one spatial dimension).

    Args:
      layers: `LayerGeometry`s or tuples `(kernel, stride=1, dilation=1, padding=0)`.

    Returns:
      One `ReceptiveField` per layer: `size` in input pixels, `jump` (input pixels between
      neighbouring output units) and `start` (input coordinate of the first unit's centre).
    """
    size, jump, start = 1, 1, 0.5
    result = []
    for index, layer in enumerate(layers):
        geometry = layer if isinstance(layer, LayerGeometry) else LayerGeometry(*layer)
        if not is_integer(geometry.stride) or geometry.stride < 1:
            raise ValueError(f"layers[{index}].stride must be an integer >= 1, got stride={geometry.stride!r}")
        eff = effective_kernel_size(geometry.kernel, geometry.dilation)
        start = start + ((eff - 1) / 2 - float(geometry.padding)) * jump
        size = size + (eff - 1) * jump
        jump = jump * int(geometry.stride)  # Python ints out, also for NumPy integer settings
        result.append(ReceptiveField(size=size, jump=jump, start=start))
    return result


def receptive_field_size(layers: Sequence[LayerGeometry | tuple[int, ...]]) -> int:
    """The receptive field of the last layer of the stack, in input pixels."""
    if not layers:
        return 1
    return receptive_fields(layers)[-1].size


def empirical_receptive_field(
    fn: Callable[[jax.Array], jax.Array],
    input_shape: Sequence[int],
    position: tuple[int, int] | None = None,
    *,
    key: jax.Array | None = None,
) -> tuple[int, int]:
    """Measures (height, width) of the input region that one output pixel depends on.

    Differentiates the sum over channels of `fn(x)[0, i, j, :]` with respect to `x` (a random
    input) and returns the extent of the nonzero gradient. Choose `fn` and `position` so the
    receptive field is not clipped by the image border (default: the central output pixel) and
    no unit is dead (e.g. no ReLU, or positive weights).

    Args:
      fn: maps `[1, height, width, channels]` to `[1, out_h, out_w, out_channels]`.
      input_shape: `(height, width, channels)`.
      position: output pixel `(i, j)`; default the centre.
    """
    key = jax.random.PRNGKey(0) if key is None else key
    x = jax.random.normal(key, (1, *input_shape))
    out_shape = jax.eval_shape(fn, x).shape
    if position is None:
        position = (out_shape[1] // 2, out_shape[2] // 2)
    grad = jax.grad(lambda x: jnp.sum(fn(x)[0, position[0], position[1], :]))(x)
    support = np.nonzero(np.abs(np.asarray(grad[0])).sum(axis=-1))
    if support[0].size == 0:
        raise ValueError(f"the output at position={position} does not depend on the input (all gradients are zero)")
    return int(support[0].max() - support[0].min() + 1), int(support[1].max() - support[1].min() + 1)
