"""Max and mean pooling, max pooling that remembers where the maxima were, and max-unpooling.

Shapes: `[batch, height, width, channels]`. Windows and strides are ints or (h, w) pairs;
padding is as in `cnn.ops.conv2d` (int, pair, explicit pairs, "SAME", "VALID"). Padded
positions never win a max and, for mean pooling, are excluded from the average unless
`count_include_pad=True`.

`max_pool_with_argmax` returns, for every pooled value, the flat position `row * width + col` of
its maximum in the (unpadded) input channel. `max_unpool` puts each value back at that position,
zeros elsewhere: the decoder upsampling of SegNet.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from cnn.ops.arithmetic import Padding1D, pair
from cnn.ops.conv import _check_image, explicit_padding


def _window_settings(x, window, stride, padding, dilation=1):
    _check_image("x", x)
    windows = pair(window)
    strides = windows if stride is None else pair(stride)
    pads = explicit_padding(x.shape[1:3], windows, strides, padding, dilation)
    for i, (low, high) in enumerate(pads):
        if max(low, high) >= windows[i] * pair(dilation)[i] - pair(dilation)[i] + 1:
            raise ValueError(
                f"padding {pads[i]} must be smaller than the pooling window {windows[i]} "
                "(otherwise a window can lie entirely in the padding)"
            )
    return windows, strides, pads


def max_pool2d(
    x: jax.Array,
    window: int | Sequence[int],
    stride: int | Sequence[int] | None = None,
    padding: Padding1D | Sequence[Padding1D] = 0,
) -> jax.Array:
    """Max pooling. `stride` defaults to `window`. Returns `[batch, out_h, out_w, channels]`."""
    windows, strides, pads = _window_settings(x, window, stride, padding)
    init = jnp.array(-jnp.inf, x.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else jnp.iinfo(x.dtype).min
    return lax.reduce_window(x, init, lax.max, (1, *windows, 1), (1, *strides, 1), ((0, 0), *pads, (0, 0)))


def avg_pool2d(
    x: jax.Array,
    window: int | Sequence[int],
    stride: int | Sequence[int] | None = None,
    padding: Padding1D | Sequence[Padding1D] = 0,
    *,
    count_include_pad: bool = False,
) -> jax.Array:
    """Mean pooling. Padded zeros count in the mean only when `count_include_pad`."""
    windows, strides, pads = _window_settings(x, window, stride, padding)
    dims, steps, full_pads = (1, *windows, 1), (1, *strides, 1), ((0, 0), *pads, (0, 0))
    total = lax.reduce_window(x, jnp.array(0, x.dtype), lax.add, dims, steps, full_pads)
    if count_include_pad:
        return total / (windows[0] * windows[1])
    ones = jnp.ones((1, *x.shape[1:3], 1), x.dtype)
    counts = lax.reduce_window(ones, jnp.array(0, x.dtype), lax.add, dims, steps, full_pads)
    return total / counts


def _windows(x: jax.Array, windows, strides, pads, fill) -> tuple[jax.Array, jax.Array]:
    """Every window's values and flat input positions, stacked on a new axis 3.

    Returns `([batch, out_h, out_w, kh*kw, channels], [out_h, out_w, kh*kw])`.
    """
    height, width = x.shape[1:3]
    (top, bottom), (left, right) = pads
    padded = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)), constant_values=fill)
    rows = jnp.arange(-top, height + bottom)
    cols = jnp.arange(-left, width + right)
    positions = rows[:, None] * width + cols[None, :]
    out_h = (height + top + bottom - windows[0]) // strides[0] + 1
    out_w = (width + left + right - windows[1]) // strides[1] + 1
    values, flat = [], []
    for u in range(windows[0]):
        for v in range(windows[1]):
            row_slice = slice(u, u + strides[0] * (out_h - 1) + 1, strides[0])
            col_slice = slice(v, v + strides[1] * (out_w - 1) + 1, strides[1])
            values.append(padded[:, row_slice, col_slice, :])
            flat.append(positions[row_slice, col_slice])
    return jnp.stack(values, axis=3), jnp.stack(flat, axis=2)


def max_pool_with_argmax(
    x: jax.Array,
    window: int | Sequence[int],
    stride: int | Sequence[int] | None = None,
    padding: Padding1D | Sequence[Padding1D] = 0,
) -> tuple[jax.Array, jax.Array]:
    """Max pooling that also returns where each maximum was.

    Returns:
      values: `[batch, out_h, out_w, channels]`, equal to `max_pool2d(x, ...)`.
      indices: int32 `[batch, out_h, out_w, channels]`, the flat position `row * width + col` of
        each maximum in its input channel (ties: the first in row-major window order).
    """
    windows, strides, pads = _window_settings(x, window, stride, padding)
    fill = -jnp.inf if jnp.issubdtype(x.dtype, jnp.floating) else jnp.iinfo(x.dtype).min
    values, positions = _windows(x, windows, strides, pads, fill)
    best = jnp.argmax(values, axis=3)  # [batch, out_h, out_w, channels]
    pooled = jnp.take_along_axis(values, best[:, :, :, None, :], axis=3)[:, :, :, 0, :]
    indices = jnp.take_along_axis(
        jnp.broadcast_to(positions[None, :, :, :, None], values.shape), best[:, :, :, None, :], axis=3
    )[:, :, :, 0, :]
    return pooled, indices.astype(jnp.int32)


def max_unpool(values: jax.Array, indices: jax.Array, output_shape: Sequence[int]) -> jax.Array:
    """Places each pooled value at its remembered position; every other position is zero.

    Args:
      values: `[batch, h, w, channels]` (e.g. decoder features at the pooled resolution).
      indices: int `[batch, h, w, channels]` from `max_pool_with_argmax`.
      output_shape: `(height, width)` or `(batch, height, width, channels)` of the pooled input.

    Returns:
      `[batch, height, width, channels]`. Unpooling is meant for non-overlapping windows (SegNet's
      2x2, stride 2), where positions are unique. Where overlapping windows picked the same
      position, one of their values is kept (they are equal when unpooling the pooled values).
    """
    _check_image("values", values)
    if indices.shape != values.shape:
        raise ValueError(f"indices.shape={tuple(indices.shape)} must equal values.shape={tuple(values.shape)}")
    if len(output_shape) == 4:
        if tuple(output_shape[::3]) != (values.shape[0], values.shape[3]):
            raise ValueError(
                f"output_shape={tuple(output_shape)} must keep batch={values.shape[0]} and channels={values.shape[3]}"
            )
        output_shape = output_shape[1:3]
    if len(output_shape) != 2 or min(output_shape) < 1:
        raise ValueError(f"output_shape must be (height, width) or NHWC, got output_shape={tuple(output_shape)}")
    height, width = (int(v) for v in output_shape)
    batch, _, _, channels = values.shape
    flat_values = jnp.moveaxis(values, 3, 1).reshape(batch, channels, -1)
    flat_indices = jnp.moveaxis(indices, 3, 1).reshape(batch, channels, -1)
    out = jnp.zeros((batch, channels, height * width), values.dtype)
    out = jax.vmap(jax.vmap(lambda o, i, v: o.at[i].set(v, mode="drop")))(out, flat_indices, flat_values)
    return jnp.moveaxis(out.reshape(batch, channels, height, width), 1, 3)
