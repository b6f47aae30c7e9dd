"""Shared layers: torch-style pooling arithmetic and values, adaptive pooling, input checks."""

import jax.numpy as jnp
import numpy as np
import pytest

from cnn.models import layers


def numpy_max_pool_1d_torch(x: np.ndarray, window: int, stride: int, padding: int, ceil_mode: bool) -> np.ndarray:
    """Reference from torch's documented definition: out[i] = max x[i*s - p + j], j < window, over
    in-range indices. Window i starts at i*s in the padded frame. Floor mode keeps the windows that
    fit inside the padded input; ceil mode also keeps one that hangs over the right edge by less
    than a stride, provided it starts inside the input or the left padding."""
    n = len(x)
    starts = []
    k = 0
    while True:
        start = k * stride - padding
        end_in_padded_frame = k * stride + window
        if ceil_mode:
            if start >= n or end_in_padded_frame > n + 2 * padding + stride - 1:
                break
        elif end_in_padded_frame > n + 2 * padding:
            break
        starts.append(start)
        k += 1
    out = []
    for start in starts:
        values = [x[i] for i in range(start, start + window) if 0 <= i < n]
        out.append(max(values))
    return np.array(out)


POOL_CASES = [
    (n, window, stride, padding, ceil_mode)
    for n in (1, 2, 3, 5, 6, 7, 11, 14, 56, 112)
    for window, stride, padding in ((2, 2, 0), (3, 2, 0), (3, 2, 1), (3, 1, 1), (4, 3, 0), (10, 5, 0))
    for ceil_mode in (False, True)
    # floor mode needs the window to fit; ceil mode keeps a window that starts inside the input
    if n + 2 * padding >= window or (ceil_mode and n + 2 * padding + stride - 1 >= window)
]


@pytest.mark.parametrize("n,window,stride,padding,ceil_mode", POOL_CASES)
def test_max_pool_matches_torch_definition(n, window, stride, padding, ceil_mode):
    rng = np.random.default_rng(n * 100 + window)
    column = rng.standard_normal(n).astype(np.float32)
    expected = numpy_max_pool_1d_torch(column, window, stride, padding, ceil_mode)
    assert layers.pool_output_size(n, window, stride, padding, ceil_mode) == len(expected)
    # 2-D pooling of an image that is constant along the width reduces to the 1-D case per row.
    image = np.broadcast_to(column[:, None], (n, n))[None, :, :, None]
    pooled = layers.MaxPool(window, stride, padding, ceil_mode).apply({}, jnp.asarray(image))
    assert pooled.shape == (1, len(expected), len(expected), 1)
    np.testing.assert_allclose(np.asarray(pooled)[0, :, 0, 0], expected, rtol=0, atol=0)


def test_pool_output_size_hand_examples():
    # A window larger than the input: torch's ceil mode still keeps the one window that starts
    # inside it (MaxPool2d(2, 2, ceil_mode=True) maps 1x1 to 1x1); floor mode keeps none.
    assert layers.pool_output_size(1, 2, 2, ceil_mode=True) == 1
    assert layers.pool_output_size(1, 2, 2) == 0
    assert layers.pool_output_size(1, 4, 2, ceil_mode=True) == 0  # ceil(-3/2) + 1 = 0: none
    # GoogLeNet: 112 -> 56 in ceil mode (floor would give 55); 14 -> 7 with 2x2.
    assert layers.pool_output_size(112, 3, 2, ceil_mode=True) == 56
    assert layers.pool_output_size(112, 3, 2) == 55
    assert layers.pool_output_size(14, 2, 2, ceil_mode=True) == 7
    # The lecture's LeCun net: 75 -> 14 (10x10 stride 5) and 6 -> 1 (6x6 stride 4).
    assert layers.pool_output_size(75, 10, 5) == 14
    assert layers.pool_output_size(6, 6, 4) == 1
    assert layers.conv_output_size(224, 7, 2, 3) == 112
    assert layers.conv_output_size(7, 3, 1, 2, dilation=2) == 7


def numpy_adaptive_avg_pool(x: np.ndarray, out: int) -> np.ndarray:
    """torch's adaptive bins on [h, w]: rows floor(i*n/o) .. ceil((i+1)*n/o) - 1."""
    n_h, n_w = x.shape
    result = np.zeros((out, out))
    for i in range(out):
        h0, h1 = (i * n_h) // out, -(-((i + 1) * n_h) // out)
        for j in range(out):
            w0, w1 = (j * n_w) // out, -(-((j + 1) * n_w) // out)
            result[i, j] = x[h0:h1, w0:w1].mean()
    return result


@pytest.mark.parametrize("size", [1, 2, 5, 7, 10, 14, 15])
def test_adaptive_avg_pool_matches_torch_bins(size, rng):
    x = rng.standard_normal((size, size)).astype(np.float32)
    got = layers.adaptive_avg_pool(jnp.asarray(x)[None, :, :, None], (7, 7))
    np.testing.assert_allclose(np.asarray(got)[0, :, :, 0], numpy_adaptive_avg_pool(x, 7), rtol=1e-6, atol=1e-6)


def test_flatten_is_hwc_order():
    x = np.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
    flat = np.asarray(layers.flatten(jnp.asarray(x)))
    # element (h, w, c) of sample b sits at h*4*5 + w*5 + c
    assert flat[1, 2 * 20 + 3 * 5 + 4] == x[1, 2, 3, 4]


def test_check_input_messages():
    with pytest.raises(ValueError, match=r"net: input x of shape \(1, 20, 40, 3\) is too small.*at least 32"):
        layers.check_input(jnp.zeros((1, 20, 40, 3)), model="net", min_size=32)
    with pytest.raises(ValueError, match=r"too large.*between 32 and 35, got 36x36"):
        layers.check_input(jnp.zeros((1, 36, 36, 1)), model="net", min_size=32, max_size=35)
    with pytest.raises(ValueError, match=r"input x has shape \(32, 32, 3\); expected 4 dimensions"):
        layers.check_input(jnp.zeros((32, 32, 3)), model="net", min_size=1)
    layers.check_input(jnp.zeros((1, 32, 35, 1)), model="net", min_size=32, max_size=35)


def test_minimum_input_size():
    # two 2x2/2 pools need 4 pixels
    def sizes(n):
        first = layers.pool_output_size(n, 2, 2)
        return [first, layers.pool_output_size(first, 2, 2)]

    assert layers.minimum_input_size(sizes) == 4
    with pytest.raises(ValueError, match="limit=3"):
        layers.minimum_input_size(sizes, limit=3)
