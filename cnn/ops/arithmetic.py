"""Convolution arithmetic: output sizes, "SAME" padding, transposed-conv sizes, dilation.

For one spatial dimension of size `n`, a kernel of size `f` with dilation `d` covers
`d * (f - 1) + 1` input positions (its *effective* size). With padding `p` on both sides and
stride `s` the output has

    floor((n + 2p - d*(f-1) - 1) / s) + 1        (= floor((n + 2p - f) / s) + 1 when d = 1)

positions. Pooling follows the same formula. A transposed convolution maps the output size back:

    (n - 1) * s - 2p + d*(f-1) + 1 + output_padding,

where `output_padding` in `[0, s)` chooses among the input sizes that a strided convolution maps
to the same output size.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Union

# A padding spec: an int (same on both sides), a (low, high) pair, or "SAME" / "VALID".
Padding1D = Union[int, tuple[int, int], str]


def is_integer(value) -> bool:
    """A Python int or a NumPy integer scalar (`np.int64(32)`, e.g. an entry of `array.shape`
    arithmetic); not a bool, a float or an array."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_int(name: str, value: int, minimum: int) -> int:
    """`value` as a Python int, after checking it is an integer >= `minimum`."""
    if not is_integer(value) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {name}={value!r}")
    return int(value)


def effective_kernel_size(kernel_size: int, dilation: int = 1) -> int:
    """Input positions covered by a kernel of `kernel_size` taps spaced `dilation` apart."""
    kernel_size = _check_int("kernel_size", kernel_size, 1)
    dilation = _check_int("dilation", dilation, 1)
    return dilation * (kernel_size - 1) + 1


def same_padding(size: int, kernel_size: int, stride: int = 1, dilation: int = 1) -> tuple[int, int]:
    """The (low, high) padding for which the output has `ceil(size / stride)` positions.

    This is XLA/TensorFlow's "SAME": the total padding is split with the extra position (if the
    total is odd) at the high end. With stride 1 and an odd kernel it is `(f-1)/2` on both sides.
    """
    size = _check_int("size", size, 1)
    stride = _check_int("stride", stride, 1)
    eff = effective_kernel_size(kernel_size, dilation)
    out = -(-size // stride)
    total = max((out - 1) * stride + eff - size, 0)
    return total // 2, total - total // 2


def resolve_padding(padding: Padding1D, size: int, kernel_size: int, stride: int = 1, dilation: int = 1) -> tuple[int, int]:
    """Turns any padding spec into an explicit (low, high) pair, validating it."""
    if isinstance(padding, str):
        mode = padding.upper()
        if mode == "SAME":
            return same_padding(size, kernel_size, stride, dilation)
        if mode == "VALID":
            return 0, 0
        raise ValueError(f"padding must be an int, a (low, high) pair, 'SAME' or 'VALID', got padding={padding!r}")
    if is_integer(padding):
        pair = (int(padding), int(padding))
    elif isinstance(padding, Sequence) and len(padding) == 2 and all(is_integer(p) for p in padding):
        pair = (int(padding[0]), int(padding[1]))
    else:
        raise ValueError(f"padding must be an int, a (low, high) pair, 'SAME' or 'VALID', got padding={padding!r}")
    if min(pair) < 0:
        raise ValueError(f"padding must be non-negative, got padding={padding!r}")
    return pair


def conv_output_size(size: int, kernel_size: int, stride: int = 1, padding: Padding1D = 0, dilation: int = 1) -> int:
    """Output positions of a convolution (or pooling) along one dimension.

    `floor((n + p_low + p_high - d*(f-1) - 1) / s) + 1`; with symmetric padding `p` and `d = 1`
    this is the lecture's `floor((n + 2p - f) / s) + 1`.

    Raises:
      ValueError: a non-positive size/kernel/stride/dilation, negative padding, or a kernel whose
        effective size exceeds the padded input (naming the argument and the value).
    """
    size = _check_int("size", size, 1)
    kernel_size = _check_int("kernel_size", kernel_size, 1)
    stride = _check_int("stride", stride, 1)
    dilation = _check_int("dilation", dilation, 1)
    low, high = resolve_padding(padding, size, kernel_size, stride, dilation)
    eff = effective_kernel_size(kernel_size, dilation)
    padded = size + low + high
    if eff > padded:
        raise ValueError(
            f"kernel_size={kernel_size} (effective size {eff} with dilation={dilation}) is larger than the "
            f"padded input ({size} + padding {low}+{high} = {padded}); use a smaller kernel or more padding"
        )
    return (padded - eff) // stride + 1


def pool_output_size(size: int, window: int, stride: int | None = None, padding: Padding1D = 0, dilation: int = 1) -> int:
    """Output positions of a pooling window; `stride` defaults to the window (non-overlapping)."""
    return conv_output_size(size, window, window if stride is None else stride, padding, dilation)


def conv_transpose_output_size(
    size: int, kernel_size: int, stride: int = 1, padding: Padding1D = 0, dilation: int = 1, output_padding: int = 0
) -> int:
    """Output positions of the transposed convolution of a conv with these settings.

    `(n - 1) * s - p_low - p_high + d*(f-1) + 1 + output_padding`. It inverts
    `conv_output_size`: for every input size `m` with `conv_output_size(m, ...) == n` there is an
    `output_padding` in `[0, stride)` giving back `m`.
    """
    size = _check_int("size", size, 1)
    stride = _check_int("stride", stride, 1)
    output_padding = _check_int("output_padding", output_padding, 0)
    dilation = _check_int("dilation", dilation, 1)
    if output_padding >= stride and output_padding >= dilation:
        raise ValueError(
            f"output_padding must be smaller than stride or dilation, got output_padding={output_padding}, "
            f"stride={stride}, dilation={dilation}"
        )
    if isinstance(padding, str):
        raise ValueError(f"padding of a transposed convolution must be explicit (int or pair), got padding={padding!r}")
    low, high = resolve_padding(padding, size, kernel_size, stride, dilation)
    out = (size - 1) * stride - low - high + effective_kernel_size(kernel_size, dilation) + output_padding
    if out < 1:
        raise ValueError(f"padding={padding!r} leaves no output for size={size}, kernel_size={kernel_size}")
    return out


def conv_output_shape(
    input_hw: Sequence[int],
    kernel_hw: Sequence[int],
    stride: int | Sequence[int] = 1,
    padding: Padding1D | Sequence[Padding1D] = 0,
    dilation: int | Sequence[int] = 1,
) -> tuple[int, int]:
    """`conv_output_size` for both spatial dimensions; scalars apply to both."""
    strides, paddings, dilations = pair(stride), pair_padding(padding), pair(dilation)
    return tuple(
        conv_output_size(input_hw[i], kernel_hw[i], strides[i], paddings[i], dilations[i]) for i in range(2)
    )  # type: ignore[return-value]


def pair(value: int | Sequence[int]) -> tuple[int, int]:
    """`3 -> (3, 3)`, `(2, 1) -> (2, 1)`."""
    if is_integer(value):
        return int(value), int(value)
    if len(value) != 2:
        raise ValueError(f"expected an int or a pair for a 2-D setting, got {value!r}")
    return int(value[0]), int(value[1])


def pair_padding(padding: Padding1D | Sequence[Padding1D]) -> tuple[Padding1D, Padding1D]:
    """Padding spec for both spatial dims: `1`, `"SAME"`, `((1, 2), (0, 0))` or `(1, 2)` (per dim)."""
    if isinstance(padding, str) or is_integer(padding):
        return padding, padding
    if len(padding) != 2:
        raise ValueError(f"padding must be an int, 'SAME'/'VALID', or one spec per spatial dim, got {padding!r}")
    return padding[0], padding[1]
