"""Small layers and checks shared by the model families (NHWC throughout).

The pooling layers are parameter-free `nn.Module`s rather than bare functions so that they get a
name: they show up in `cnn.models.summary` tables and in `capture_intermediates`, and the VGG
trunk can hand out `pool3` / `pool4` by name. Their arithmetic follows torchvision (floor or ceil
mode, padding with -inf for max pooling, torch's bin edges for adaptive pooling) so that weights
converted from torchvision give the same activations.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

from cnn import ops

# torchvision initializes convolutions with kaiming_normal_(mode="fan_out", nonlinearity="relu").
kaiming_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# torch.nn.Linear's default weight init: kaiming_uniform_(a=sqrt(5)) == U(+-1/sqrt(fan_in)).
torch_linear_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def conv_output_size(size: int, kernel: int, stride: int = 1, padding: int = 0, dilation: int = 1) -> int:
    """`cnn.ops.conv_output_size` (`floor((n + 2p - d(f-1) - 1) / s) + 1`), but 0 instead of an
    error when `size < 1` or the kernel does not fit: the form the minimum-input-size search needs."""
    if size < 1 or dilation * (kernel - 1) + 1 > size + 2 * padding:
        return 0
    return ops.conv_output_size(size, kernel, stride, padding, dilation)


def pool_output_size(size: int, window: int, stride: int, padding: int = 0, ceil_mode: bool = False) -> int:
    """Output length of torch-style pooling; 0 when the window does not fit.

    In ceil mode the last window may hang over the right edge, but (as in torch) it must start
    inside the input or the left padding.
    """
    if not ceil_mode:
        return conv_output_size(size, window, stride, padding)
    if size < 1:
        return 0
    # torch: ceil((n + 2p - f) / s) + 1, which keeps one window even when the padded input is
    # shorter than the window, as long as the window starts inside it.
    out = -(-(size + 2 * padding - window) // stride) + 1
    if (out - 1) * stride >= size + padding:
        out -= 1
    return max(out, 0)


def minimum_input_size(sizes_of: Callable[[int], Sequence[int]], limit: int = 4096) -> int:
    """The smallest input side `n` for which every layer's output side in `sizes_of(n)` is >= 1.

    Args:
      sizes_of: maps an input side length to the side lengths of every layer's output.
      limit: the largest side tried.
    """
    for size in range(1, limit + 1):
        if all(s >= 1 for s in sizes_of(size)):
            return size
    raise ValueError(f"no input size up to limit={limit} gives a valid output")


def check_input(
    x: jnp.ndarray,
    *,
    model: str,
    min_size: int,
    max_size: int | None = None,
    why: str = "",
) -> None:
    """Raises ValueError unless `x` is `[batch, height, width, channels]` with sides in range.

    Args:
      x: the model input.
      model: the model's name, quoted in the message.
      min_size: the smallest height/width the architecture accepts.
      max_size: the largest, for nets whose classifier reads a fixed-size map (LeNet-5).
      why: an optional reason appended to the message.
    """
    shape = tuple(x.shape)
    if len(shape) != 4:
        raise ValueError(
            f"{model}: input x has shape {shape}; expected 4 dimensions [batch, height, width, channels]"
        )
    height, width = shape[1], shape[2]
    reason = f" ({why})" if why else ""
    if min(height, width) < min_size:
        limits = f"at least {min_size}" if max_size is None else f"between {min_size} and {max_size}"
        raise ValueError(
            f"{model}: input x of shape {shape} is too small: height and width must be {limits}, "
            f"got {height}x{width}{reason}"
        )
    if max_size is not None and max(height, width) > max_size:
        raise ValueError(
            f"{model}: input x of shape {shape} is too large: height and width must be between "
            f"{min_size} and {max_size}, got {height}x{width}{reason}"
        )


def check_image_input(
    module: nn.Module, x: jnp.ndarray, *, first_conv: str, model: str | None = None, channels: int | None = None
) -> None:
    """Raises ValueError unless `x` is a floating NHWC batch with the channels the model reads.

    Called once at the top of a model's `__call__`. It reads only static shapes and dtypes, so it
    works under `jit`, `vmap` and `eval_shape`. Checks:
      * rank: `[batch, height, width, channels]` (a hint to add the batch axis for one image);
      * dtype: floating point. Integer (e.g. uint8) and bool images are rejected rather than
        converted, because a silent cast would feed 0..255 pixels to a model trained on [0, 1] or
        normalized inputs; scale them first (`x.astype(jnp.float32) / 255.0`; `cnn.train` does
        this for integer batches before the model);
      * channels: once the model has parameters (apply, not init), `x.shape[-1]` must equal the
        input channels of the kernel at `first_conv`, which the model learned them for; when
        `x.shape[1]` has that count instead, the message says the array looks NCHW. At init the
        channel count is inferred from `x` (any count is accepted) unless `channels` fixes it.

    Args:
      module: the model, bound (i.e. called from inside its `__call__`).
      x: the model input.
      first_conv: "/"-separated path, in the model's own `params`, of the layer whose `kernel`
        `[kh, kw, in_channels, out]` reads `x` (e.g. "conv1" or "features/conv1_1").
      model: the model's name in messages (default: its `registry_name`, else its class name).
      channels: a channel count the architecture fixes whatever its parameters (e.g. the RGB
        re-normalization of GoogLeNet's `transform_input`); None: inferred at init.
    """
    name = model or getattr(module, "registry_name", None) or type(module).__name__
    shape = tuple(x.shape)
    if len(shape) != 4:
        hint = {
            3: " For one image add a batch axis: x[None].",
            2: " For one grayscale image add batch and channel axes: x[None, :, :, None].",
        }.get(len(shape), "")
        raise ValueError(
            f"{name}: input x has shape {shape}; expected 4 dimensions, NHWC [batch, height, width, "
            f"channels].{hint}"
        )
    dtype = jnp.dtype(x.dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(
            f"{name}: input x must be a floating-point NHWC image batch, got x.dtype={dtype} with "
            f"x.shape={shape}. Scale integer images to floats first, e.g. x.astype(jnp.float32) / 255.0 "
            "(cnn.train does this for integer batches); the model does not cast them."
        )
    expected = channels
    if expected is None and not module.is_initializing():
        node = module.variables.get("params", {})
        for key in first_conv.split("/"):
            node = node.get(key, {}) if hasattr(node, "get") else {}
        kernel = node.get("kernel") if hasattr(node, "get") else None
        if kernel is not None and len(kernel.shape) >= 4:
            expected = int(kernel.shape[-2])  # HWIO (a leading axis, e.g. ensemble members, is fine)
    if expected is not None and shape[3] != expected:
        hint = (
            f" The shape looks like NCHW (channels first, as in PyTorch): transpose it with "
            f"x.transpose(0, 2, 3, 1) to get {(shape[0], shape[2], shape[3], shape[1])}."
            if shape[1] == expected
            else ""
        )
        raise ValueError(
            f"{name}: input x must be NHWC [batch, height, width, channels] with {expected} channels "
            f"(what its first convolution {first_conv!r} reads), got x.shape={shape} with {shape[3]} "
            f"channels.{hint}"
        )


def _pool_padding(size: int, window: int, stride: int, padding: int, ceil_mode: bool) -> tuple[int, int]:
    """(left, right) padding that makes a floor-mode window reproduce torch's output length."""
    out = pool_output_size(size, window, stride, padding, ceil_mode)
    right = max((out - 1) * stride + window - size - padding, 0)
    return padding, right


class MaxPool(nn.Module):
    """Max pooling as torch's `MaxPool2d(window, stride, padding, ceil_mode)` (pads with -inf).

    `[batch, h, w, c] -> [batch, h', w', c]` with `h' = pool_output_size(h, ...)`.
    """

    window: int
    strides: int
    padding: int = 0
    ceil_mode: bool = False

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        pads = tuple(
            _pool_padding(n, self.window, self.strides, self.padding, self.ceil_mode) for n in x.shape[1:3]
        )
        return nn.max_pool(x, (self.window, self.window), (self.strides, self.strides), padding=pads)


class AvgPool(nn.Module):
    """Average pooling without padding (torch's `AvgPool2d(window, stride)`), `[b,h,w,c] -> [b,h',w',c]`."""

    window: int
    strides: int

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        return nn.avg_pool(x, (self.window, self.window), (self.strides, self.strides), padding="VALID")


def adaptive_avg_pool(x: jnp.ndarray, output_size: tuple[int, int]) -> jnp.ndarray:
    """torch's `adaptive_avg_pool2d` on NHWC: `[b, h, w, c] -> [b, oh, ow, c]`.

    Bin `i` of `o` over a side of length `n` averages rows `floor(i*n/o)` to `ceil((i+1)*n/o) - 1`,
    so bins overlap when `n` is not a multiple of `o` and repeat rows when `n < o`.
    """

    def pool_axis(x: jnp.ndarray, axis: int, out: int) -> jnp.ndarray:
        n = x.shape[axis]
        if n == out:
            return x
        if n % out == 0:
            shape = x.shape[:axis] + (out, n // out) + x.shape[axis + 1 :]
            return x.reshape(shape).mean(axis=axis + 1)
        bins = []
        for i in range(out):
            start, end = (i * n) // out, -(-((i + 1) * n) // out)
            index = [slice(None)] * x.ndim
            index[axis] = slice(start, end)
            bins.append(x[tuple(index)].mean(axis=axis, keepdims=True))
        return jnp.concatenate(bins, axis=axis)

    return pool_axis(pool_axis(x, 1, output_size[0]), 2, output_size[1])


class AdaptiveAvgPool(nn.Module):
    """Module form of `adaptive_avg_pool`: any `[b, h, w, c]` -> `[b, *output_size, c]`."""

    output_size: tuple[int, int]

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        return adaptive_avg_pool(x, tuple(self.output_size))


def flatten(x: jnp.ndarray) -> jnp.ndarray:
    """`[batch, h, w, c] -> [batch, h*w*c]` in NHWC (row-major h, w, c) order.

    torch flattens NCHW maps in (c, h, w) order; `cnn.models.convert` permutes the first Linear
    after a flatten accordingly.
    """
    return x.reshape(x.shape[0], -1)


__all__ = [
    "AdaptiveAvgPool",
    "AvgPool",
    "MaxPool",
    "adaptive_avg_pool",
    "check_image_input",
    "check_input",
    "conv_output_size",
    "flatten",
    "kaiming_fan_out",
    "minimum_input_size",
    "pool_output_size",
    "torch_linear_init",
]
