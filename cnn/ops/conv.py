"""Convolution, 1x1 convolution, the convolution matrix and its transpose (NHWC / HWIO).

Shapes: images `[batch, height, width, channels]`; kernels `[kernel_h, kernel_w, in_channels /
groups, out_channels]` (HWIO, Flax's layout). "Convolution" is cross-correlation, as in every
deep-learning library.

The transposed convolution is defined as the *adjoint* of the convolution with the same kernel:
if `C` is the matrix with `vec(conv2d(x)) == C @ vec(x)` (see `conv_matrix`), then
`vec(conv_transpose2d(y)) == C.T @ vec(y)`. It is what upsamples in FCNs and U-Nets, and the
gradient of a convolution with respect to its input.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import custom_batching, lax

from cnn.ops.arithmetic import (
    Padding1D,
    conv_output_size,
    conv_transpose_output_size,
    effective_kernel_size,
    is_integer,
    pair,
    pair_padding,
    resolve_padding,
)

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


def _check_image(name: str, x: jax.Array) -> None:
    if x.ndim != 4:
        raise ValueError(f"{name} must be [batch, height, width, channels], got {name}.shape={tuple(x.shape)}")


def _check_kernel(kernel: jax.Array, in_channels: int, groups: int) -> None:
    if kernel.ndim != 4:
        raise ValueError(f"kernel must be [kernel_h, kernel_w, in/groups, out] (HWIO), got kernel.shape={tuple(kernel.shape)}")
    if not is_integer(groups) or groups < 1:
        raise ValueError(f"groups must be an integer >= 1, got groups={groups!r}")
    if in_channels % groups or kernel.shape[3] % groups:
        raise ValueError(
            f"groups={groups} must divide the input channels ({in_channels}) and output channels ({kernel.shape[3]})"
        )
    if kernel.shape[2] * groups != in_channels:
        raise ValueError(
            f"kernel.shape[2]={kernel.shape[2]} must equal in_channels / groups = {in_channels} / {groups}"
        )


def explicit_padding(
    input_hw: Sequence[int],
    kernel_hw: Sequence[int],
    stride: int | Sequence[int],
    padding: Padding1D | Sequence[Padding1D],
    dilation: int | Sequence[int],
) -> tuple[tuple[int, int], tuple[int, int]]:
    """((top, bottom), (left, right)) for any padding spec, after checking the sizes fit."""
    strides, dilations, paddings = pair(stride), pair(dilation), pair_padding(padding)
    result = []
    for i in range(2):
        # Validates everything (kernel larger than padded input, stride 0, negative padding).
        conv_output_size(input_hw[i], kernel_hw[i], strides[i], paddings[i], dilations[i])
        result.append(resolve_padding(paddings[i], input_hw[i], kernel_hw[i], strides[i], dilations[i]))
    return result[0], result[1]


def conv2d(
    x: jax.Array,
    kernel: jax.Array,
    bias: jax.Array | None = None,
    *,
    stride: int | Sequence[int] = 1,
    padding: Padding1D | Sequence[Padding1D] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    precision: lax.Precision | None = lax.Precision.HIGHEST,
) -> jax.Array:
    """2-D convolution (cross-correlation) of NHWC images with an HWIO kernel.

    Args:
      x: `[batch, height, width, in_channels]`.
      kernel: `[kernel_h, kernel_w, in_channels // groups, out_channels]`.
      bias: optional `[out_channels]`.
      stride: int or (stride_h, stride_w).
      padding: int (both sides), `"SAME"`, `"VALID"`, a per-dimension pair `(p_h, p_w)`, or
        explicit `((top, bottom), (left, right))`.
      dilation: int or pair; spacing of the kernel taps (atrous convolution).
      groups: split channels into this many independent groups (depthwise when
        `groups == in_channels`).

    Returns:
      `[batch, out_h, out_w, out_channels]` with `out = floor((n + 2p - d*(f-1) - 1)/s) + 1`.
    """
    _check_image("x", x)
    _check_kernel(kernel, x.shape[3], groups)
    pads = explicit_padding(x.shape[1:3], kernel.shape[:2], stride, padding, dilation)
    y = lax.conv_general_dilated(
        x,
        kernel,
        window_strides=pair(stride),
        padding=pads,
        rhs_dilation=pair(dilation),
        dimension_numbers=_DIMENSION_NUMBERS,
        feature_group_count=groups,
        precision=precision,
    )
    return y if bias is None else y + bias


def conv1x1(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    """A 1x1 convolution: a per-pixel linear map of channels, `y[b,i,j] = x[b,i,j] @ W (+ bias)`.

    Args:
      x: `[batch, height, width, in_channels]`.
      kernel: `[in_channels, out_channels]` or `[1, 1, in_channels, out_channels]`.
    """
    _check_image("x", x)
    if kernel.ndim == 4:
        if kernel.shape[:2] != (1, 1):
            raise ValueError(f"conv1x1 needs a 1x1 kernel, got kernel.shape={tuple(kernel.shape)}")
        kernel = kernel[0, 0]
    if kernel.ndim != 2 or kernel.shape[0] != x.shape[3]:
        raise ValueError(
            f"kernel must be [in_channels={x.shape[3]}, out_channels], got kernel.shape={tuple(kernel.shape)}"
        )
    y = jnp.einsum("bhwi,io->bhwo", x, kernel, precision=lax.Precision.HIGHEST)
    return y if bias is None else y + bias


def conv_transpose2d(
    y: jax.Array,
    kernel: jax.Array,
    *,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] | Sequence[tuple[int, int]] = 0,
    dilation: int | Sequence[int] = 1,
    output_padding: int | Sequence[int] = 0,
    groups: int = 1,
    precision: lax.Precision | None = lax.Precision.HIGHEST,
) -> jax.Array:
    """The transposed convolution: the adjoint of `conv2d(., kernel)` with the same settings.

    `kernel` is the *forward* convolution's kernel `[kh, kw, in_channels // groups,
    out_channels]`; `y` has the forward conv's output channels and the result its input
    channels. Each input pixel `y[b, i, j]` scatters `kernel @ y[b, i, j]` onto the output window
    starting at `(i*s - p_top, j*s - p_left)`.

    Args:
      y: `[batch, h, w, out_channels]`.
      kernel: `[kernel_h, kernel_w, in_channels // groups, out_channels]`.
      stride, dilation: as in the forward convolution.
      padding: the forward convolution's explicit padding (int, per-dim pair, or
        `((top, bottom), (left, right))`); it is *removed* from the result.
      output_padding: extra rows/columns at the bottom/right, in `[0, stride)`, selecting which of
        the input sizes that the strided convolution maps to `h` to return.

    Returns:
      `[batch, (h-1)*s - p_top - p_bottom + d*(f-1) + 1 + output_padding, ..., in_channels]`.
    """
    _check_image("y", y)
    if kernel.ndim != 4 or kernel.shape[3] != y.shape[3]:
        raise ValueError(
            f"kernel must be the forward conv's HWIO kernel with out_channels={y.shape[3]} (y's channels), "
            f"got kernel.shape={tuple(kernel.shape)}"
        )
    _check_kernel(kernel, kernel.shape[2] * groups, groups)
    strides, dilations, out_pads = pair(stride), pair(dilation), pair(output_padding)
    paddings = pair_padding(padding)
    pads = []
    for i in range(2):
        low, high = resolve_padding(paddings[i], y.shape[1 + i], kernel.shape[i], strides[i], dilations[i])
        conv_transpose_output_size(y.shape[1 + i], kernel.shape[i], strides[i], (low, high), dilations[i], out_pads[i])
        eff = effective_kernel_size(kernel.shape[i], dilations[i])
        pads.append((eff - 1 - low, eff - 1 - high + out_pads[i]))
    # The adjoint of a strided cross-correlation: dilate the input by the stride, pad by
    # (effective kernel - 1 - padding), and correlate with the spatially flipped kernel whose
    # in/out channel roles are swapped (per group).
    fh, fw, cin_g, cout = kernel.shape
    flipped = kernel[::-1, ::-1]
    flipped = flipped.reshape(fh, fw, cin_g, groups, cout // groups)
    flipped = jnp.transpose(flipped, (0, 1, 4, 3, 2)).reshape(fh, fw, cout // groups, groups * cin_g)
    return lax.conv_general_dilated(
        y,
        flipped,
        window_strides=(1, 1),
        padding=pads,
        lhs_dilation=strides,
        rhs_dilation=dilations,
        dimension_numbers=_DIMENSION_NUMBERS,
        feature_group_count=groups,
        precision=precision,
    )


def conv_matrix(
    kernel: np.ndarray | jax.Array,
    input_shape: Sequence[int],
    stride: int | Sequence[int] = 1,
    padding: Padding1D | Sequence[Padding1D] = 0,
    dilation: int | Sequence[int] = 1,
) -> np.ndarray:
    """The dense matrix `C` of a convolution: `vec(conv2d(x)) == C @ vec(x)`.

    `vec` flattens one image `[height, width, channels]` in row-major (NHWC) order, so `C` has
    shape `[out_h * out_w * out_channels, height * width * in_channels]`. Built entry by entry
    from the definition (no call to a convolution routine), so it can serve as a reference; its
    transpose is the transposed convolution. Intended for small sizes (it is dense).

    Args:
      kernel: `[kernel_h, kernel_w, in_channels, out_channels]` (groups = 1).
      input_shape: `(height, width, in_channels)` of one image.
    """
    kernel = np.asarray(kernel)
    if kernel.ndim != 4:
        raise ValueError(f"kernel must be [kernel_h, kernel_w, in, out], got kernel.shape={kernel.shape}")
    if len(input_shape) != 3 or input_shape[2] != kernel.shape[2]:
        raise ValueError(
            f"input_shape must be (height, width, in_channels={kernel.shape[2]}), got input_shape={tuple(input_shape)}"
        )
    height, width, cin = (int(v) for v in input_shape)
    fh, fw, _, cout = kernel.shape
    (top, _), (left, _) = explicit_padding((height, width), (fh, fw), stride, padding, dilation)
    (sh, sw), (dh, dw) = pair(stride), pair(dilation)
    out_h = conv_output_size(height, fh, sh, pair_padding(padding)[0], dh)
    out_w = conv_output_size(width, fw, sw, pair_padding(padding)[1], dw)
    matrix = np.zeros((out_h, out_w, cout, height, width, cin), dtype=kernel.dtype)
    for i in range(out_h):
        for j in range(out_w):
            for u in range(fh):
                for v in range(fw):
                    row, col = i * sh - top + u * dh, j * sw - left + v * dw
                    if 0 <= row < height and 0 <= col < width:
                        # output channel o reads input channel c with weight kernel[u, v, c, o]
                        matrix[i, j, :, row, col, :] += kernel[u, v].T
    return matrix.reshape(out_h * out_w * cout, height * width * cin)


# --------------------------------------------------- convolution with an XLA-CPU-friendly backward


def _conv_nhwc(x: jax.Array, kernel: jax.Array, padding, precision) -> jax.Array:
    return lax.conv_general_dilated(
        x, kernel, (1, 1), padding, dimension_numbers=_DIMENSION_NUMBERS, precision=precision
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_canonical_backward(x: jax.Array, kernel: jax.Array, padding, precision) -> jax.Array:
    return _canonical_forward(x, kernel, padding, precision)[0]


# The name of an ensemble's member axis (`jax.vmap(..., axis_name=MEMBER_AXIS)`, cnn.train.ensemble).
MEMBER_AXIS = "ensemble_member"


def _member_axis_bound() -> bool:
    """Whether this is traced inside a vmap over an ensemble's members."""
    try:
        jax.lax.axis_size(MEMBER_AXIS)
    except NameError:
        return False
    return True


def _per_member_if_ensemble(fn: Callable[..., Any]) -> Callable[..., Any]:
    # Outside an ensemble `fn` stays plain JAX: custom_vmap has no transpose rule, and
    # `cnn.ode.analysis` transposes this convolution's VJP.
    return _one_per_member(fn) if _member_axis_bound() else fn


def _one_per_member(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` (arrays -> arrays) whose `jax.vmap` on the CPU backend evaluates `fn` once per mapped
    index when two or more of its arguments are mapped; otherwise JAX's own batching rules.
    Used inside an ensemble's vmap over `MEMBER_AXIS` only.

    Why: an ensemble (`cnn.train.ensemble`) vmaps the train step over its members, so a
    convolution sees a member axis on both its input and its kernel. JAX batches that into one
    grouped convolution (members folded into feature groups), which XLA CPU runs 1.04-3.4x slower
    than the same convolutions one member at a time, most in the forward and input-gradient
    convolutions of the first stage (benchmarks/RESULTS.md, "Per-member convolutions").
    Unrolled, each member's convolution is the single model's, and an ensemble step costs what
    its members' separate steps cost. GPU/TPU keep the grouped form: one launch for all members
    is what ensembles are for there. Under a member-sharded `jit` on several CPU devices the
    loop still computes the right values (tests/train/test_ensemble.py).
    """
    looped = custom_batching.custom_vmap(fn)

    @looped.def_vmap
    def rule(axis_size, in_batched, *args):
        if jax.default_backend() == "cpu" and axis_size > 0 and sum(map(bool, in_batched)) >= 2:
            outs = [looped(*(a[i] if b else a for a, b in zip(args, in_batched))) for i in range(axis_size)]
            out = jax.tree_util.tree_map(lambda *members: jnp.stack(members), *outs)
        else:
            out = jax.vmap(fn, in_axes=tuple(0 if b else None for b in in_batched))(*args)
        return out, jax.tree_util.tree_map(lambda _: True, out)

    return looped


def _canonical_forward(x, kernel, padding, precision):
    y = _per_member_if_ensemble(functools.partial(_conv_nhwc, padding=padding, precision=precision))(x, kernel)
    return y, (x, kernel)


def _canonical_backward(padding, precision, residuals, dy):
    x, kernel = residuals
    gradients = functools.partial(_canonical_gradients, padding=padding, precision=precision)
    return _per_member_if_ensemble(gradients)(x, kernel, dy)


def _canonical_gradients(x, kernel, dy, *, padding, precision):
    # dW[u, v, c, o] = sum_{b,i,j} x_pad[b, i+u, j+v, c] dy[b, i, j, o]: a stride-1 convolution of
    # x^T [c, h, w, b] (batch as features) with dy^T [h', w', b, o] as the kernel.
    dkernel = _conv_nhwc(x.transpose(3, 1, 2, 0), dy.transpose(1, 2, 0, 3), padding, precision)
    dkernel = dkernel.transpose(1, 2, 0, 3)
    # dx: the transposed convolution (already a stride-1 NHWC/HWIO convolution of the padded dy
    # with the flipped kernel).
    dx = conv_transpose2d(dy, kernel, padding=padding, precision=precision)
    return dx.astype(x.dtype), dkernel.astype(kernel.dtype)


_conv_canonical_backward.defvjp(_canonical_forward, _canonical_backward)


def conv_general_dilated(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding,
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers=None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision=None,
    preferred_element_type=None,
) -> jax.Array:
    """`jax.lax.conv_general_dilated` whose gradient runs fast on XLA's CPU backend.

    A drop-in for the `conv_general_dilated` attribute of `flax.linen.Conv`; the CNNs whose
    blocks run under `nn.scan` use it. Same forward values; on the CPU backend, for the common
    case (NHWC input, HWIO kernel, stride 1, no dilation, one group, explicit padding of at most
    `f - 1`), the backward pass is written as two stride-1 NHWC/HWIO convolutions
    (`dW = conv(x^T, dy^T)`, `dx = conv(pad(dy), flipped kernel^T)`) instead of JAX's transpose
    rules. Why: XLA CPU rewrites convolutions into its fast NHWC form only in the entry
    computation, so the gradient convolutions JAX emits inside an `nn.scan` loop body fall back
    to a generic loop, 10-40x slower (benchmarks/RESULTS.md). Every other case, and every other
    backend (GPU/TPU compile both forms well), is plain `lax.conv_general_dilated`. The kernel
    gradient is fastest on CPU when compiled with `cnn.train.CPU_COMPILER_OPTIONS` (Eigen instead
    of YNNPACK), which `cnn.train`'s compile functions use by default. Under `jax.vmap` with
    input and kernel both mapped (an ensemble's member axis), these convolutions run once per
    member on CPU instead of as one grouped convolution when the vmap's axis is `MEMBER_AXIS`
    (`cnn.train.ensemble` names it so; `_one_per_member`).

    Args: as `jax.lax.conv_general_dilated`; `lhs` `[batch, height, width, in_channels]`,
    `rhs` `[kernel_h, kernel_w, in_channels, out_channels]` in the fast case.
    """
    kernel_size = tuple(rhs.shape[:2])
    fast = (
        jax.default_backend() == "cpu"
        and lhs.ndim == 4
        and not isinstance(padding, str)
        and len(padding) == 2
        and all(0 <= low <= f - 1 and 0 <= high <= f - 1 for (low, high), f in zip(padding, kernel_size))
        and tuple(window_strides) == (1, 1)
        and tuple(lhs_dilation or (1, 1)) == (1, 1)
        and tuple(rhs_dilation or (1, 1)) == (1, 1)
        and feature_group_count == 1
        and batch_group_count == 1
        and preferred_element_type is None
        and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
        == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _DIMENSION_NUMBERS)
    )
    if fast:
        padding = tuple((int(low), int(high)) for low, high in padding)
        return _conv_canonical_backward(lhs, rhs, padding, precision)
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
        feature_group_count, batch_group_count, precision, preferred_element_type,
    )
