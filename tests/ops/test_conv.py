import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from cnn import ops
from cnn.ops.conv import MEMBER_AXIS
from tests.ops.reference import conv2d_loops, conv_transpose2d_loops


def _cases(count, seed):
    """Random conv settings: shapes, strides, asymmetric paddings, dilations, channels, groups."""
    rng = np.random.default_rng(seed)
    cases = []
    while len(cases) < count:
        groups = int(rng.choice([1, 1, 2, 3]))
        cin, cout = groups * int(rng.integers(1, 3)), groups * int(rng.integers(1, 3))
        fh, fw = int(rng.integers(1, 4)), int(rng.integers(1, 4))
        sh, sw = int(rng.integers(1, 4)), int(rng.integers(1, 3))
        dh, dw = int(rng.integers(1, 3)), int(rng.integers(1, 3))
        pads = tuple((int(rng.integers(0, 3)), int(rng.integers(0, 3))) for _ in range(2))
        h, w = int(rng.integers(4, 10)), int(rng.integers(4, 10))
        if dh * (fh - 1) + 1 > h + sum(pads[0]) or dw * (fw - 1) + 1 > w + sum(pads[1]):
            continue
        cases.append(dict(h=h, w=w, cin=cin, cout=cout, f=(fh, fw), s=(sh, sw), d=(dh, dw), pads=pads, groups=groups))
    return cases


@pytest.mark.parametrize("case", _cases(14, seed=0), ids=lambda c: f"{c['h']}x{c['w']}f{c['f']}s{c['s']}d{c['d']}g{c['groups']}")
def test_conv2d_matches_numpy_loops(case):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, case["h"], case["w"], case["cin"])).astype(np.float32)
    kernel = rng.normal(size=(*case["f"], case["cin"] // case["groups"], case["cout"])).astype(np.float32)
    bias = rng.normal(size=(case["cout"],)).astype(np.float32)
    got = ops.conv2d(jnp.asarray(x), jnp.asarray(kernel), jnp.asarray(bias), stride=case["s"], padding=case["pads"], dilation=case["d"], groups=case["groups"])
    want = conv2d_loops(x, kernel, case["s"], case["pads"], case["d"], case["groups"]) + bias
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_conv1x1_is_per_pixel_channel_mixing(rng):
    x = rng.normal(size=(2, 5, 6, 4)).astype(np.float32)
    weight = rng.normal(size=(4, 3)).astype(np.float32)
    want = np.einsum("bhwc,co->bhwo", x.astype(np.float64), weight)
    np.testing.assert_allclose(ops.conv1x1(x, weight), want, atol=1e-5)
    np.testing.assert_allclose(ops.conv2d(x, weight[None, None]), want, atol=1e-5)
    np.testing.assert_allclose(conv2d_loops(x, weight[None, None]), want, atol=1e-9)


@pytest.mark.parametrize("case", [c for c in _cases(14, seed=5) if c["groups"] == 1][:7], ids=str)
def test_conv_transpose2d_matches_scatter_loops_and_matrix_transpose(case):
    rng = np.random.default_rng(2)
    kernel = rng.normal(size=(*case["f"], case["cin"], case["cout"])).astype(np.float32)
    out_h, out_w = ops.conv_output_shape((case["h"], case["w"]), case["f"], case["s"], case["pads"], case["d"])
    y = rng.normal(size=(1, out_h, out_w, case["cout"])).astype(np.float32)
    # output_padding recovers the original input size exactly.
    extra = []
    for i, n in enumerate((case["h"], case["w"])):
        base = ops.conv_transpose_output_size((out_h, out_w)[i], case["f"][i], case["s"][i], case["pads"][i], case["d"][i])
        extra.append(n - base)
    got = ops.conv_transpose2d(jnp.asarray(y), jnp.asarray(kernel), stride=case["s"], padding=case["pads"], dilation=case["d"], output_padding=tuple(extra))
    assert got.shape == (1, case["h"], case["w"], case["cin"])
    want = conv_transpose2d_loops(y, kernel, (case["h"], case["w"]), case["s"], case["pads"], case["d"])
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    matrix = ops.conv_matrix(kernel, (case["h"], case["w"], case["cin"]), case["s"], case["pads"], case["d"])
    np.testing.assert_allclose(np.asarray(got).ravel(), matrix.T @ y.ravel(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", [c for c in _cases(16, seed=9) if c["groups"] == 1][:6], ids=str)
def test_conv_matrix_reproduces_the_loop_convolution(case):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(1, case["h"], case["w"], case["cin"]))
    kernel = rng.normal(size=(*case["f"], case["cin"], case["cout"]))
    matrix = ops.conv_matrix(kernel, x.shape[1:], case["s"], case["pads"], case["d"])
    want = conv2d_loops(x, kernel, case["s"], case["pads"], case["d"])
    np.testing.assert_allclose(matrix @ x.ravel(), want.ravel(), atol=1e-10)


def test_lecture_example_2x2_kernel_3x3_input():
    """The lecture's transposed-convolution example: a 2x2 filter w on a 3x3 input gives 2x2, so the
    convolution is a 4x9 matrix W (one row per output pixel, row-major) and the transposed
    convolution, which maps a 2x2 map back to 3x3, is W^T (9x4), written out by hand."""
    w1, w2, w3, w4 = 2.0, 3.0, 5.0, 7.0
    kernel = np.array([[w1, w2], [w3, w4]]).reshape(2, 2, 1, 1)
    W = np.array([
        [w1, w2, 0, w3, w4, 0, 0, 0, 0],
        [0, w1, w2, 0, w3, w4, 0, 0, 0],
        [0, 0, 0, w1, w2, 0, w3, w4, 0],
        [0, 0, 0, 0, w1, w2, 0, w3, w4],
    ])
    np.testing.assert_array_equal(ops.conv_matrix(kernel, (3, 3, 1)), W)
    x = np.arange(1.0, 10.0).reshape(1, 3, 3, 1)
    y = ops.conv2d(jnp.asarray(x, jnp.float32), jnp.asarray(kernel, jnp.float32))
    assert y.shape == (1, 2, 2, 1)
    # top-left output: w1 x11 + w2 x12 + w3 x21 + w4 x22 = 2*1 + 3*2 + 5*4 + 7*5
    assert float(y[0, 0, 0, 0]) == 2 * 1 + 3 * 2 + 5 * 4 + 7 * 5
    np.testing.assert_allclose(np.asarray(y).ravel(), W @ x.ravel(), rtol=1e-6)
    y_in = np.array([1.0, 10.0, 100.0, 1000.0]).reshape(1, 2, 2, 1)
    up = ops.conv_transpose2d(jnp.asarray(y_in, jnp.float32), jnp.asarray(kernel, jnp.float32))
    assert up.shape == (1, 3, 3, 1)
    # W^T y: each input pixel scatters its value times the filter onto its 2x2 window
    expected = np.array([
        [w1 * 1, w2 * 1 + w1 * 10, w2 * 10],
        [w3 * 1 + w1 * 100, w4 * 1 + w3 * 10 + w2 * 100 + w1 * 1000, w4 * 10 + w2 * 1000],
        [w3 * 100, w4 * 100 + w3 * 1000, w4 * 1000],
    ])
    np.testing.assert_allclose(np.asarray(up)[0, :, :, 0], expected, rtol=1e-6)
    np.testing.assert_allclose(expected.ravel(), W.T @ y_in.ravel())


def test_dumoulin_example_3x3_kernel_4x4_input():
    """Dumoulin & Visin's example: a 3x3 kernel on a 4x4 input gives 2x2: C is 4 x 16; its
    transpose maps 2x2 back to 4x4."""
    kernel = np.arange(1.0, 10.0).reshape(3, 3, 1, 1)
    matrix = ops.conv_matrix(kernel, (4, 4, 1))
    assert matrix.shape == (4, 16)
    # First row: the kernel laid over the top-left 3x3 of the 4x4 grid, row-major.
    np.testing.assert_array_equal(matrix[0], [1, 2, 3, 0, 4, 5, 6, 0, 7, 8, 9, 0, 0, 0, 0, 0])
    # Last row: shifted by one row and one column.
    np.testing.assert_array_equal(matrix[3], [0, 0, 0, 0, 0, 1, 2, 3, 0, 4, 5, 6, 0, 7, 8, 9])
    x = np.arange(16.0).reshape(1, 4, 4, 1)
    y = ops.conv2d(jnp.asarray(x, jnp.float32), jnp.asarray(kernel, jnp.float32))
    assert y.shape == (1, 2, 2, 1)
    np.testing.assert_allclose(np.asarray(y).ravel(), matrix @ x.ravel(), rtol=1e-6)
    up = ops.conv_transpose2d(jnp.asarray(y), jnp.asarray(kernel, jnp.float32))
    assert up.shape == (1, 4, 4, 1)
    np.testing.assert_allclose(np.asarray(up).ravel(), matrix.T @ np.asarray(y).ravel(), rtol=1e-5)


def test_adjoint_identity(rng):
    """<conv(x), y> == <x, conv_transpose(y)> with stride, padding, dilation and groups."""
    x = rng.normal(size=(2, 9, 8, 4)).astype(np.float32)
    kernel = rng.normal(size=(3, 2, 2, 6)).astype(np.float32)
    settings = dict(stride=(2, 3), padding=((1, 2), (0, 1)), dilation=(2, 1))
    y_shape = ops.conv2d(x, kernel, groups=2, **settings).shape
    y = rng.normal(size=y_shape).astype(np.float32)
    conv_x = ops.conv2d(x, kernel, groups=2, **settings)
    extra = (9 - ops.conv_transpose_output_size(y_shape[1], 3, 2, (1, 2), 2), 8 - ops.conv_transpose_output_size(y_shape[2], 2, 3, (0, 1), 1))
    transposed_y = ops.conv_transpose2d(y, kernel, groups=2, output_padding=extra, **settings)
    np.testing.assert_allclose(jnp.vdot(conv_x, y), jnp.vdot(x, transposed_y), rtol=1e-4)


def test_conv_transpose_is_the_input_gradient_of_conv(rng):
    x = rng.normal(size=(1, 8, 8, 2)).astype(np.float32)
    kernel = rng.normal(size=(3, 3, 2, 3)).astype(np.float32)
    y, vjp = jax.vjp(lambda x: ops.conv2d(x, kernel, stride=2, padding=1), x)
    cotangent = rng.normal(size=y.shape).astype(np.float32)
    (grad,) = vjp(cotangent)
    np.testing.assert_allclose(ops.conv_transpose2d(cotangent, kernel, stride=2, padding=1, output_padding=1), grad, atol=1e-5)


def test_gradients_of_conv_and_transposed_conv(rng):
    x = rng.normal(size=(1, 5, 5, 2))
    kernel = rng.normal(size=(3, 3, 2, 2))
    with jax.enable_x64(True):
        x64, k64 = jnp.asarray(x), jnp.asarray(kernel)
        check_grads(lambda x, k: ops.conv2d(x, k, stride=2, padding=1, dilation=1), (x64, k64), order=2, modes=("fwd", "rev"))
        check_grads(lambda x, k: ops.conv2d(x, k, dilation=2, padding=2), (x64, k64), order=1)
        check_grads(lambda y, k: ops.conv_transpose2d(y, k, stride=2, padding=1), (x64, k64), order=1)


def test_works_under_jit_and_vmap(rng):
    x = rng.normal(size=(3, 1, 6, 6, 2)).astype(np.float32)
    kernel = rng.normal(size=(3, 3, 2, 4)).astype(np.float32)
    direct = jnp.stack([ops.conv2d(xi, kernel, stride=2, padding="SAME") for xi in x])
    mapped = jax.vmap(jax.jit(lambda xi: ops.conv2d(xi, kernel, stride=2, padding="SAME")))(x)
    np.testing.assert_allclose(mapped, direct, atol=1e-6)
    y = rng.normal(size=(3, 1, 3, 3, 4)).astype(np.float32)
    mapped_t = jax.vmap(jax.jit(lambda yi: ops.conv_transpose2d(yi, kernel, stride=2, padding=1, output_padding=1)))(y)
    assert mapped_t.shape == (3, 1, 6, 6, 2)
    np.testing.assert_allclose(mapped_t[1], ops.conv_transpose2d(y[1], kernel, stride=2, padding=1, output_padding=1), atol=1e-6)


@pytest.mark.parametrize(
    "kernel_size, padding",
    [((3, 3), ((1, 1), (1, 1))), ((1, 1), ((0, 0), (0, 0))), ((3, 2), ((2, 0), (0, 1))), ((5, 5), ((2, 2), (2, 2)))],
)
def test_conv_general_dilated_has_lax_values_and_gradients(rng, kernel_size, padding):
    x = jnp.asarray(rng.standard_normal((2, 6, 7, 3)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((*kernel_size, 3, 4)), jnp.float32)
    dims = ("NHWC", "HWIO", "NHWC")

    def loss(conv, x, w):
        y = conv(x, w, (1, 1), padding, dimension_numbers=dims, precision=jax.lax.Precision.HIGHEST)
        return jnp.sum(jnp.sin(y) * jnp.arange(y.size, dtype=y.dtype).reshape(y.shape) / y.size)

    want = jax.value_and_grad(lambda x, w: loss(jax.lax.conv_general_dilated, x, w), argnums=(0, 1))(x, w)
    got = jax.value_and_grad(lambda x, w: loss(ops.conv_general_dilated, x, w), argnums=(0, 1))(x, w)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    for g, r in zip(got[1], want[1]):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)
    # and the forward against the numpy loops
    np.testing.assert_allclose(
        ops.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=dims),
        conv2d_loops(np.asarray(x), np.asarray(w), stride=(1, 1), pads=padding, dilation=(1, 1), groups=1),
        rtol=1e-4, atol=1e-4,
    )


def test_conv_general_dilated_inside_scan_matches_lax_gradients(rng):
    """The case it exists for: gradients of convolutions inside a `lax.scan` loop body."""
    x = jnp.asarray(rng.standard_normal((2, 5, 5, 4)), jnp.float32)
    ws = jnp.asarray(rng.standard_normal((3, 3, 3, 4, 4)) * 0.3, jnp.float32)

    def run(conv, x, ws):
        def body(h, w):
            return h + jnp.tanh(conv(h, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))), None

        return jnp.sum(jax.lax.scan(body, x, ws)[0] ** 2)

    assert "custom_vjp" in str(jax.make_jaxpr(lambda x, ws: run(ops.conv_general_dilated, x, ws))(x, ws))
    want = jax.grad(lambda x, ws: run(jax.lax.conv_general_dilated, x, ws), argnums=(0, 1))(x, ws)
    got = jax.jit(jax.grad(lambda x, ws: run(ops.conv_general_dilated, x, ws), argnums=(0, 1)))(x, ws)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)


def test_conv_general_dilated_falls_back_to_lax_for_strides_and_groups(rng):
    x = jnp.asarray(rng.standard_normal((1, 8, 8, 4)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, 2, 4)), jnp.float32)
    kwargs = dict(dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=2)
    np.testing.assert_allclose(
        ops.conv_general_dilated(x, w, (2, 2), "SAME", **kwargs),
        jax.lax.conv_general_dilated(x, w, (2, 2), "SAME", **kwargs),
        rtol=1e-6,
    )


def test_conv_general_dilated_kernel_gradient_against_numpy_loops(rng):
    x = rng.standard_normal((2, 4, 4, 2)).astype(np.float32)
    dy = rng.standard_normal((2, 4, 4, 3)).astype(np.float32)
    w = jnp.zeros((3, 3, 2, 3), jnp.float32)
    conv = lambda x, w: ops.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))  # noqa: E731
    _, vjp = jax.vjp(conv, jnp.asarray(x), w)
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    expected = np.zeros((3, 3, 2, 3))
    for i in range(3):
        for j in range(3):  # dW[i, j] = sum_{b,h,w} x_pad[b, h+i, w+j, :]^T dy[b, h, w, :]
            expected[i, j] = np.einsum("bhwc,bhwo->co", padded[:, i : i + 4, j : j + 4], dy)
    np.testing.assert_allclose(vjp(jnp.asarray(dy))[1], expected, rtol=1e-5, atol=1e-4)


def _compiled_convolutions(fn, *args) -> list[str]:
    hlo = jax.jit(fn).lower(*args).compile().as_text()
    return [line for line in hlo.splitlines() if " convolution(" in line]


@pytest.mark.parametrize("shared_input", [False, True], ids=["own-inputs", "shared-input"])
def test_conv_general_dilated_vmapped_over_members_equals_each_member(rng, shared_input):
    """An ensemble's vmap (over `MEMBER_AXIS`, input and kernel both mapped) gives each member
    the gradients of its own convolution, and on CPU compiles to one plain convolution per member
    and pass instead of grouped ones (the member loop of `_one_per_member`). Any other vmap keeps
    JAX's batching (grouped), and the convolution stays plain JAX outside an ensemble."""
    members, padding, dims = 3, ((1, 1), (1, 1)), ("NHWC", "HWIO", "NHWC")
    x = jnp.asarray(rng.standard_normal((members, 2, 5, 6, 3)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((members, 3, 3, 3, 4)), jnp.float32)

    def loss(conv, x, w):
        y = conv(jnp.tanh(x), w, (1, 1), padding, dimension_numbers=dims, precision=jax.lax.Precision.HIGHEST)
        return jnp.sum(jnp.sin(y) * jnp.arange(y.size, dtype=y.dtype).reshape(y.shape) / y.size)

    in_axes = (None if shared_input else 0, 0)
    mapped = jax.vmap(jax.value_and_grad(lambda x, w: loss(ops.conv_general_dilated, x, w), argnums=(0, 1)), in_axes,
                      axis_name=MEMBER_AXIS)
    inputs = x[0] if shared_input else x
    value, (dx, dw) = jax.jit(mapped)(inputs, w)
    for i in range(members):
        xi = x[0] if shared_input else x[i]
        want_value, (want_dx, want_dw) = jax.value_and_grad(
            lambda x, w: loss(jax.lax.conv_general_dilated, x, w), argnums=(0, 1))(xi, w[i])
        np.testing.assert_allclose(value[i], want_value, rtol=1e-5)
        np.testing.assert_allclose(dx[i], want_dx, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(dw[i], want_dw, rtol=1e-4, atol=1e-5)
    if jax.default_backend() == "cpu":
        convolutions = _compiled_convolutions(mapped, inputs, w)
        assert not [line for line in convolutions if "feature_group_count" in line or "batch_group_count" in line]
        # own inputs: forward, input and kernel gradient per member; shared input: one forward
        # for all members (JAX folds the members into output features, no groups), then the two
        # gradients per member
        assert len(convolutions) == (1 + 2 * members if shared_input else 3 * members)
        unnamed = jax.vmap(jax.grad(lambda x, w: loss(ops.conv_general_dilated, x, w), argnums=(0, 1)), in_axes)
        grouped = _compiled_convolutions(unnamed, inputs, w)
        assert [line for line in grouped if "feature_group_count" in line or "batch_group_count" in line]
    assert "custom_vmap" not in str(jax.make_jaxpr(jax.grad(lambda w: loss(ops.conv_general_dilated, x[0], w)))(w[0]))
