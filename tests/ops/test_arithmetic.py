import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from cnn import ops
from tests.ops.reference import conv2d_loops


@pytest.mark.parametrize(
    "n,f,p,s,d",
    [c for c in itertools.product([5, 8, 13], [1, 3, 4], [0, 1, 2], [1, 2, 3], [1, 2]) if (c[1] - 1) * c[4] + 1 <= c[0] + 2 * c[2]],
)
def test_output_size_formula_matches_actual_conv_shape(n, f, p, s, d):
    """floor((n + 2p - d(f-1) - 1)/s) + 1 against the shape lax produces and a loop counts."""
    expected = (n + 2 * p - d * (f - 1) - 1) // s + 1
    if d == 1:
        assert expected == (n + 2 * p - f) // s + 1  # the lecture's form
    assert ops.conv_output_size(n, f, s, p, d) == expected
    x = jnp.ones((1, n, n + 1, 1))
    kernel = jnp.ones((f, f, 1, 1))
    y = ops.conv2d(x, kernel, stride=s, padding=p, dilation=d)
    assert y.shape == (1, expected, ops.conv_output_size(n + 1, f, s, p, d), 1)


def test_output_size_small_grid_against_loop_reference():
    rng = np.random.default_rng(1)
    for n, f, p, s, d in [(7, 3, 1, 2, 1), (6, 2, 0, 2, 1), (9, 3, 2, 3, 2)]:
        out = conv2d_loops(rng.normal(size=(1, n, n, 1)), np.ones((f, f, 1, 1)), (s, s), ((p, p), (p, p)), (d, d))
        assert out.shape[1] == ops.conv_output_size(n, f, s, p, d)


@pytest.mark.parametrize("n,f,s,d", [(7, 3, 1, 1), (7, 3, 2, 1), (8, 3, 2, 1), (10, 4, 3, 1), (9, 3, 1, 2), (6, 1, 2, 1)])
def test_same_padding_keeps_ceil_n_over_s(n, f, s, d):
    low, high = ops.same_padding(n, f, s, d)
    assert 0 <= high - low <= 1
    assert ops.conv_output_size(n, f, s, (low, high), d) == -(-n // s)
    y = ops.conv2d(jnp.ones((1, n, n, 1)), jnp.ones((f, f, 1, 1)), stride=s, padding="SAME", dilation=d)
    assert y.shape[1:3] == (-(-n // s), -(-n // s))


def test_same_padding_for_odd_kernel_is_half_kernel():
    assert ops.same_padding(32, 3) == (1, 1)
    assert ops.same_padding(32, 5) == (2, 2)
    assert ops.same_padding(32, 3, dilation=4) == (4, 4)


@pytest.mark.parametrize("m,f,p,s,d", [(9, 3, 1, 2, 1), (10, 3, 1, 2, 1), (17, 4, 1, 3, 1), (12, 3, 2, 2, 2)])
def test_transposed_size_inverts_conv_size(m, f, p, s, d):
    n = ops.conv_output_size(m, f, s, p, d)
    recovered = {ops.conv_transpose_output_size(n, f, s, p, d, op) for op in range(s)}
    assert m in recovered
    assert ops.conv_transpose_output_size(n, f, s, p, d, 0) == (n - 1) * s - 2 * p + d * (f - 1) + 1


def test_effective_kernel_size():
    assert [ops.effective_kernel_size(3, d) for d in (1, 2, 4)] == [3, 5, 9]


@pytest.mark.parametrize(
    "kwargs,names",
    [
        (dict(size=4, kernel_size=7), ["kernel_size=7", "4"]),
        (dict(size=8, kernel_size=3, stride=0), ["stride=0"]),
        (dict(size=8, kernel_size=3, padding=-1), ["padding=-1"]),
        (dict(size=8, kernel_size=0), ["kernel_size=0"]),
        (dict(size=8, kernel_size=3, dilation=0), ["dilation=0"]),
        (dict(size=5, kernel_size=3, dilation=3), ["dilation=3", "effective size 7"]),
        (dict(size=8, kernel_size=3, padding="FULL"), ["padding='FULL'"]),
    ],
)
def test_bad_arguments_name_the_argument_and_value(kwargs, names):
    with pytest.raises(ValueError) as info:
        ops.conv_output_size(**kwargs)
    for name in names:
        assert name in str(info.value)


def test_conv2d_rejects_bad_shapes_with_clear_messages():
    with pytest.raises(ValueError, match=r"x must be \[batch, height, width, channels\]"):
        ops.conv2d(jnp.ones((4, 4, 1)), jnp.ones((3, 3, 1, 1)))
    with pytest.raises(ValueError, match="kernel.shape\\[2\\]=2"):
        ops.conv2d(jnp.ones((1, 4, 4, 3)), jnp.ones((3, 3, 2, 1)))
    with pytest.raises(ValueError, match="groups=2"):
        ops.conv2d(jnp.ones((1, 4, 4, 3)), jnp.ones((3, 3, 1, 4)), groups=2)
    with pytest.raises(ValueError, match="stride=0"):
        ops.conv2d(jnp.ones((1, 4, 4, 1)), jnp.ones((3, 3, 1, 1)), stride=0)
    with pytest.raises(ValueError, match="kernel_size=5"):
        ops.conv2d(jnp.ones((1, 4, 4, 1)), jnp.ones((5, 5, 1, 1)))
    with pytest.raises(ValueError, match="output_padding=2"):
        ops.conv_transpose2d(jnp.ones((1, 4, 4, 1)), jnp.ones((3, 3, 1, 1)), stride=2, output_padding=2)


@pytest.mark.parametrize("integer", [np.int64, np.int32, np.int8, np.uint16])
def test_numpy_integer_scalars_are_accepted_and_give_python_ints(integer):
    """Sizes often come from NumPy arithmetic on shapes; the values are the formula's, typed int."""
    n, f, s, p = integer(32), integer(3), integer(2), integer(1)
    expected = (32 + 2 * 1 - 3) // 2 + 1  # 16
    size = ops.conv_output_size(n, f, s, p)
    assert size == expected and type(size) is int
    assert ops.conv_output_size(np.int64(32), 3) == 30  # the example
    assert ops.pool_output_size(n, integer(2)) == 16
    assert ops.same_padding(integer(7), f, s) == (1, 1)  # total (4-1)*2 + 3 - 7 = 2
    up = ops.conv_transpose_output_size(integer(16), f, s, (p, p), output_padding=integer(1))
    assert up == (16 - 1) * 2 - 2 + 3 + 1 and type(up) is int
    assert ops.conv_output_shape(np.array([32, 17]), (f, f), s, p) == (16, 9)
    assert ops.receptive_field_size([(f, 1, integer(2)), (f, s, 1)]) == 1 + 4 + 2
    y = ops.conv2d(jnp.ones((1, 8, 8, 1)), jnp.ones((3, 3, 1, 1)), stride=s, padding=p, dilation=integer(1))
    assert y.shape == (1, 4, 4, 1)
    assert ops.max_pool2d(jnp.ones((1, 8, 8, 1)), integer(2)).shape == (1, 4, 4, 1)


@pytest.mark.parametrize("value", [True, 3.0, np.float64(3.0), np.bool_(True), "3"])
def test_non_integer_sizes_are_still_rejected(value):
    with pytest.raises(ValueError, match="size must be an integer >= 1, got size="):
        ops.conv_output_size(value, 3)
