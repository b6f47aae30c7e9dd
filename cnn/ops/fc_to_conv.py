"""Fully connected layers recast as convolutions (OverFeat, FCN).

A `Dense` layer that reads a flattened `h x w x c` map is a convolution with an `h x w` kernel
and no padding: on an input of exactly `h x w` it produces a `1 x 1` map holding the same
numbers, and on a larger input it slides, producing the map of the classifier's outputs at
every `h x w` window (with the stride of everything before it). A following `Dense` on that
vector is a 1x1 convolution.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp


def dense_to_conv_kernel(
    dense_kernel: jax.Array, input_hwc: Sequence[int], *, flatten_order: str = "hwc"
) -> jax.Array:
    """Reshapes a Dense kernel reading a flattened map into an equivalent conv kernel.

    Args:
      dense_kernel: `[h * w * c, features]` (Flax's `Dense` layout: inputs by outputs).
      input_hwc: `(h, w, c)`, the map the Dense layer flattened.
      flatten_order: how that map was flattened: `"hwc"` (NHWC row-major, what
        `x.reshape(batch, -1)` does in Flax) or `"chw"` (PyTorch's NCHW `flatten`, e.g. VGG's
        `classifier.0` reading `512 x 7 x 7`).

    Returns:
      `[h, w, c, features]` (HWIO) such that a VALID convolution of an `h x w x c` map with it
      equals the Dense layer on the flattened map.
    """
    if len(input_hwc) != 3:
        raise ValueError(f"input_hwc must be (height, width, channels), got input_hwc={tuple(input_hwc)}")
    height, width, channels = (int(v) for v in input_hwc)
    if dense_kernel.ndim != 2 or dense_kernel.shape[0] != height * width * channels:
        raise ValueError(
            f"dense_kernel must be [h*w*c = {height * width * channels}, features] for input_hwc={tuple(input_hwc)}, "
            f"got dense_kernel.shape={tuple(dense_kernel.shape)}"
        )
    features = dense_kernel.shape[1]
    if flatten_order == "hwc":
        return dense_kernel.reshape(height, width, channels, features)
    if flatten_order == "chw":
        return jnp.transpose(dense_kernel.reshape(channels, height, width, features), (1, 2, 0, 3))
    raise ValueError(f"flatten_order must be 'hwc' or 'chw', got flatten_order={flatten_order!r}")


def dense_to_conv1x1_kernel(dense_kernel: jax.Array) -> jax.Array:
    """A Dense layer applied to a feature vector as a `1 x 1` conv kernel `[1, 1, in, out]`."""
    if dense_kernel.ndim != 2:
        raise ValueError(f"dense_kernel must be [in, out], got dense_kernel.shape={tuple(dense_kernel.shape)}")
    return dense_kernel[None, None]
