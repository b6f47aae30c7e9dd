import jax.numpy as jnp
import numpy as np
import pytest

from cnn import ops


def test_dense_on_flat_map_equals_conv_at_exact_size(rng):
    """A Dense reading a flattened 7x7x8 map (a small 7x7x512 -> 4096) is a 7x7 VALID conv."""
    x = rng.normal(size=(2, 7, 7, 8)).astype(np.float32)
    kernel = rng.normal(size=(7 * 7 * 8, 16)).astype(np.float32)
    bias = rng.normal(size=(16,)).astype(np.float32)
    dense = x.reshape(2, -1).astype(np.float64) @ kernel + bias
    conv = ops.conv2d(x, ops.dense_to_conv_kernel(kernel, (7, 7, 8)), bias)
    assert conv.shape == (2, 1, 1, 16)
    np.testing.assert_allclose(np.asarray(conv)[:, 0, 0], dense, rtol=1e-4, atol=1e-4)


def test_larger_input_gives_the_sliding_window_map(rng):
    """On a 10x12 map the converted conv yields Dense(crop) at every 7x7 window (OverFeat)."""
    x = rng.normal(size=(1, 10, 12, 3)).astype(np.float32)
    kernel = rng.normal(size=(7 * 7 * 3, 5)).astype(np.float32)
    second = rng.normal(size=(5, 4)).astype(np.float32)
    conv = ops.conv2d(x, ops.dense_to_conv_kernel(kernel, (7, 7, 3)))
    conv = ops.conv2d(jnp.maximum(conv, 0), ops.dense_to_conv1x1_kernel(second))
    assert conv.shape == (1, 4, 6, 4)
    for i in range(4):
        for j in range(6):
            crop = x[0, i : i + 7, j : j + 7].reshape(-1).astype(np.float64)
            want = np.maximum(crop @ kernel, 0) @ second
            np.testing.assert_allclose(np.asarray(conv)[0, i, j], want, rtol=1e-4, atol=1e-4)


def test_chw_flatten_order_matches_pytorch_style_flatten(rng):
    x = rng.normal(size=(1, 3, 4, 5)).astype(np.float32)  # NHWC
    kernel = rng.normal(size=(5 * 3 * 4, 6)).astype(np.float32)  # reads a CHW-flattened map
    torch_style = np.transpose(x, (0, 3, 1, 2)).reshape(1, -1).astype(np.float64) @ kernel
    conv = ops.conv2d(x, ops.dense_to_conv_kernel(kernel, (3, 4, 5), flatten_order="chw"))
    np.testing.assert_allclose(np.asarray(conv)[0, 0, 0], torch_style[0], rtol=1e-4, atol=1e-4)


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="dense_kernel must be"):
        ops.dense_to_conv_kernel(jnp.ones((10, 2)), (2, 2, 2))
    with pytest.raises(ValueError, match="flatten_order='whc'"):
        ops.dense_to_conv_kernel(jnp.ones((8, 2)), (2, 2, 2), flatten_order="whc")
