import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from cnn import ops
from tests.ops.reference import pool_loops

CASES = [
    # (h, w, window, stride, pads)
    (6, 6, (2, 2), (2, 2), ((0, 0), (0, 0))),
    (7, 5, (3, 3), (2, 2), ((1, 1), (1, 1))),
    (8, 9, (3, 2), (1, 2), ((0, 2), (1, 0))),
    (9, 9, (10 // 3, 3), (3, 3), ((0, 0), (0, 0))),
    (5, 7, (2, 3), (1, 1), ((1, 0), (0, 2))),
]


@pytest.mark.parametrize("h,w,window,stride,pads", CASES)
def test_max_and_mean_pool_match_loops(h, w, window, stride, pads):
    rng = np.random.default_rng(h * w)
    x = rng.normal(size=(2, h, w, 3)).astype(np.float32)
    want_max, want_arg = pool_loops(x, window, stride, pads, "max")
    np.testing.assert_allclose(ops.max_pool2d(x, window, stride, pads), want_max, atol=1e-6)
    values, indices = ops.max_pool_with_argmax(x, window, stride, pads)
    np.testing.assert_allclose(values, want_max, atol=1e-6)
    np.testing.assert_array_equal(indices, want_arg)
    want_mean = pool_loops(x, window, stride, pads, "mean")
    np.testing.assert_allclose(ops.avg_pool2d(x, window, stride, pads), want_mean, atol=1e-5)


def test_mean_pool_count_include_pad():
    x = np.ones((1, 3, 3, 1), np.float32)
    out = ops.avg_pool2d(x, 2, 2, ((0, 1), (0, 1)), count_include_pad=True)
    np.testing.assert_allclose(np.asarray(out)[0, :, :, 0], [[1.0, 0.5], [0.5, 0.25]])
    np.testing.assert_allclose(ops.avg_pool2d(x, 2, 2, ((0, 1), (0, 1))), np.ones((1, 2, 2, 1)))


def test_pool_output_size_default_stride_is_window():
    assert ops.pool_output_size(75, 10, 5) == 14  # LeCun's net: 75x75 -> 14x14 with 10x10 / 5
    assert ops.pool_output_size(6, 6, 4) == 1
    assert ops.max_pool2d(jnp.ones((1, 75, 75, 1)), 10, 5).shape == (1, 14, 14, 1)
    assert ops.max_pool2d(jnp.ones((1, 8, 8, 1)), 2).shape == (1, 4, 4, 1)


def test_unpool_hand_made_example():
    """SegNet-style: each max goes back to where it came from, zeros elsewhere."""
    x = np.array(
        [[1, 5, 0, 2],
         [3, 2, 7, 1],
         [0, 1, 4, 4],
         [9, 2, 3, 8]], np.float32,
    ).reshape(1, 4, 4, 1)
    values, indices = ops.max_pool_with_argmax(x, 2)
    np.testing.assert_array_equal(np.asarray(values)[0, :, :, 0], [[5, 7], [9, 8]])
    np.testing.assert_array_equal(np.asarray(indices)[0, :, :, 0], [[1, 6], [12, 15]])
    up = ops.max_unpool(values, indices, (4, 4))
    want = np.array(
        [[0, 5, 0, 0],
         [0, 0, 7, 0],
         [0, 0, 0, 0],
         [9, 0, 0, 8]], np.float32,
    )
    np.testing.assert_array_equal(np.asarray(up)[0, :, :, 0], want)
    # Decoder features (not the pooled values) go to the same remembered places.
    features = np.array([[10.0, 20.0], [30.0, 40.0]], np.float32).reshape(1, 2, 2, 1)
    up = np.asarray(ops.max_unpool(features, indices, x.shape))[0, :, :, 0]
    assert up[0, 1] == 10 and up[1, 2] == 20 and up[3, 0] == 30 and up[3, 3] == 40 and up.sum() == 100


def test_unpool_matches_loop_scatter_on_random_input(rng):
    x = rng.normal(size=(2, 8, 6, 3)).astype(np.float32)
    values, indices = ops.max_pool_with_argmax(x, 2)
    up = np.asarray(ops.max_unpool(values, indices, (8, 6)))
    want = np.zeros_like(x)
    idx, vals = np.asarray(indices), np.asarray(values)
    for b, i, j, c in np.ndindex(*vals.shape):
        r, q = divmod(int(idx[b, i, j, c]), 6)
        want[b, r, q, c] = vals[b, i, j, c]
    np.testing.assert_array_equal(up, want)
    # unpool(pool(x)) keeps x exactly at the maxima and zeros elsewhere.
    mask = up != 0
    np.testing.assert_array_equal(up[mask], x[mask])


def test_unpool_rejects_mismatched_shapes():
    values = jnp.ones((1, 2, 2, 1))
    with pytest.raises(ValueError, match="indices.shape"):
        ops.max_unpool(values, jnp.zeros((1, 2, 2, 2), jnp.int32), (4, 4))
    with pytest.raises(ValueError, match="output_shape"):
        ops.max_unpool(values, jnp.zeros((1, 2, 2, 1), jnp.int32), (1, 4, 4, 3))


def test_pooling_padding_must_be_smaller_than_window():
    with pytest.raises(ValueError, match="padding"):
        ops.max_pool2d(jnp.ones((1, 4, 4, 1)), 2, 2, 2)


def test_gradients_of_pooling_and_unpooling(rng):
    x = rng.normal(size=(1, 6, 6, 2))
    with jax.enable_x64(True):
        x64 = jnp.asarray(x)
        check_grads(lambda x: ops.max_pool2d(x, 2), (x64,), order=1)
        check_grads(lambda x: ops.max_pool2d(x, 3, 2, 1), (x64,), order=1)
        check_grads(lambda x: ops.avg_pool2d(x, 3, 2, 1), (x64,), order=2)
        check_grads(lambda x: ops.max_pool_with_argmax(x, 2)[0], (x64,), order=1)
        _, indices = ops.max_pool_with_argmax(x64, 2)
        values = jnp.asarray(rng.normal(size=(1, 3, 3, 2)))
        check_grads(lambda v: ops.max_unpool(v, indices, (6, 6)), (values,), order=2)


def test_pooling_under_jit_and_vmap(rng):
    x = rng.normal(size=(4, 1, 6, 6, 2)).astype(np.float32)

    def pool_unpool(xi):
        values, indices = ops.max_pool_with_argmax(xi, 2)
        return ops.max_unpool(values, indices, xi.shape)

    mapped = jax.vmap(jax.jit(pool_unpool))(x)
    np.testing.assert_array_equal(mapped, np.stack([pool_unpool(xi) for xi in x]))
    np.testing.assert_allclose(jax.jit(lambda x: ops.avg_pool2d(x, 2))(x[0]), ops.avg_pool2d(x[0], 2))
