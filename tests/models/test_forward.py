"""Forward passes at small inputs, checked against numpy references and documented semantics."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

import cnn.models as models
from cnn.models.googlenet import GoogLeNetOutput
from cnn.models.resnet import BottleneckResidual, ResNetStage
from tests.models.helpers import random_variables


def np_conv(x, kernel, bias=None, stride=1, padding=0):
    """Cross-correlation on NHWC with an HWIO kernel, in numpy."""
    x = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    kh, kw = kernel.shape[:2]
    windows = sliding_window_view(x, (kh, kw), axis=(1, 2))[:, ::stride, ::stride]  # [n, h, w, c, kh, kw]
    out = np.einsum("nhwcij,ijco->nhwo", windows, kernel)
    return out if bias is None else out + bias


def np_avg_pool2(x):
    n, h, w, c = x.shape
    return x[:, : h // 2 * 2, : w // 2 * 2].reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def captured(model, variables, x, **kwargs):
    """(output, {path: first output}) of a forward pass with every module's output captured."""
    out, state = model.apply(variables, x, capture_intermediates=True, mutable=["intermediates"], **kwargs)
    flat = {}

    def visit(node, path):
        for key, value in node.items():
            if key == "__call__":
                flat[path] = value[0]
            else:
                visit(value, path + (key,))

    visit(state["intermediates"], ())
    return out, flat


def captured_numpy(model, variables, x, **kwargs):
    """`captured` with the maps as float32 numpy arrays."""
    out, flat = captured(model, variables, x, **kwargs)
    return out, {path: np.asarray(value, np.float32) for path, value in flat.items()}


def test_lenet5_matches_numpy_reference(rng):
    model = models.create("lenet5")
    variables = random_variables(model, (1, 32, 32, 1))
    p = jax.tree.map(np.asarray, variables["params"])
    x = rng.standard_normal((3, 32, 32, 1)).astype(np.float32)
    h = np_avg_pool2(np.tanh(np_conv(x, p["c1"]["kernel"], p["c1"]["bias"])))
    h = np_avg_pool2(np.tanh(np_conv(h, p["c3"]["kernel"], p["c3"]["bias"])))
    h = np.tanh(np_conv(h, p["c5"]["kernel"], p["c5"]["bias"])).reshape(3, 120)
    h = np.tanh(h @ p["f6"]["kernel"] + p["f6"]["bias"])
    expected = h @ p["output"]["kernel"] + p["output"]["bias"]
    got = model.apply(variables, jnp.asarray(x), train=False)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=1e-5)


def test_lecun_convnet_sparse_connection_table(rng):
    """Output map j of conv2 reads input map j // 4 only: compare with a dense conv whose kernel
    is zero outside that table."""
    model = models.create("lecun_convnet")
    variables = random_variables(model, (1, 83, 83, 1))
    x = jnp.asarray(rng.standard_normal((2, 83, 83, 1)), jnp.float32)
    logits, maps = captured_numpy(model, variables, x, train=False)
    sparse = np.asarray(variables["params"]["conv2"]["kernel"])  # [9, 9, 1, 256]
    dense = np.zeros((9, 9, 64, 256), np.float32)
    for j in range(256):
        dense[:, :, j // 4, j] = sparse[:, :, 0, j]
    expected = np_conv(maps[("pool1",)], dense, np.asarray(variables["params"]["conv2"]["bias"]))
    np.testing.assert_allclose(maps[("conv2",)], expected, rtol=1e-4, atol=1e-4)
    assert logits.shape == (2, 101)


def test_lecun_connection_table_is_balanced_and_conv2_reads_exactly_it(rng):
    """connections="table": output map j reads the 16 input maps table[j] (distinct), every input
    map feeds 64 output maps; conv2 equals a dense conv whose kernel is zero outside the table."""
    from cnn.models.lecun import lecun_connection_table

    table = lecun_connection_table()
    assert table.shape == (256, 16)
    assert all(len(set(row)) == 16 for row in table.tolist())
    assert np.bincount(table.ravel(), minlength=64).tolist() == [64] * 64
    model = models.create("lecun_convnet", connections="table")
    variables = random_variables(model, (1, 83, 83, 1))
    x = jnp.asarray(rng.standard_normal((2, 83, 83, 1)), jnp.float32)
    _, maps = captured_numpy(model, variables, x, train=False)
    grouped = np.asarray(variables["params"]["conv2"]["kernel"])  # [9, 9, 16, 256]
    dense = np.zeros((9, 9, 64, 256), np.float32)
    for j in range(256):
        for slot, i in enumerate(table[j]):
            dense[:, :, i, j] = grouped[:, :, slot, j]
    expected = np_conv(maps[("pool1",)], dense, np.asarray(variables["params"]["conv2"]["bias"]))
    np.testing.assert_allclose(maps[("conv2",)], expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="fan_in=5"):
        lecun_connection_table(64, 256, 5)


@pytest.fixture(scope="module")
def resnet18_small():
    """ResNet-18 (10 classes) with random variables, a batch at 32x32, and its compiled
    float32 forward pass with every module's output captured."""
    model = models.create("resnet18", num_classes=10)
    variables = random_variables(model, (1, 32, 32, 3), seed=1)
    x = jnp.asarray(np.random.default_rng(18).standard_normal((4, 32, 32, 3)), jnp.float32)
    logits, maps = jax.jit(lambda v, x: captured(model, v, x, train=False))(variables, x)
    return model, variables, x, np.asarray(logits), {path: np.asarray(m) for path, m in maps.items()}


def test_resnet_stage_applies_relu_of_shortcut_plus_residual(resnet18_small):
    *_, maps = resnet18_small
    # layer2: block0 changes shape (projection shortcut), block1 keeps it (identity shortcut)
    x1 = np.maximum(maps[("layer2", "shortcut")] + maps[("layer2", "block0")], 0)
    x2 = np.maximum(x1 + maps[("layer2", "block1")], 0)
    np.testing.assert_allclose(maps[("layer2",)], x2, rtol=1e-5, atol=1e-5)
    # layer1 of ResNet-18 has no projection: x1 = relu(x0 + F0(x0)) with x0 the max-pool output
    assert ("layer1", "shortcut") not in maps
    x1 = np.maximum(maps[("maxpool",)] + maps[("layer1", "block0")], 0)
    np.testing.assert_allclose(np.maximum(x1 + maps[("layer1", "block1")], 0), maps[("layer1",)], rtol=1e-5,
                               atol=1e-5)


def test_bfloat16_forward_close_to_float32(resnet18_small):
    _, variables, x, logits32, _ = resnet18_small
    model16 = models.create("resnet18", num_classes=10, dtype=jnp.bfloat16)
    logits16 = jax.jit(lambda v, x: model16.apply(v, x, train=False))(variables, x)
    assert logits16.dtype == jnp.bfloat16
    logits16 = np.asarray(logits16, np.float32)
    assert np.all(np.isfinite(logits16))
    relative = np.linalg.norm(logits16 - logits32) / np.linalg.norm(logits32)
    assert relative < 0.05, relative
    # and the two are not trivially equal (the computation really ran in bfloat16)
    assert relative > 1e-5


def test_batchnorm_training_updates_running_mean_like_torch(resnet18_small):
    """Running statistics move by momentum 0.1 towards the batch mean (torch's convention)."""
    model, variables, x, _, _ = resnet18_small
    _, state = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables, x)
    conv1 = np_conv(np.asarray(x), np.asarray(variables["params"]["conv1"]["kernel"]), stride=2, padding=3)
    old = np.asarray(variables["batch_stats"]["bn1"]["mean"])
    expected = 0.9 * old + 0.1 * conv1.mean(axis=(0, 1, 2))
    np.testing.assert_allclose(np.asarray(state["batch_stats"]["bn1"]["mean"]), expected, rtol=1e-4, atol=1e-5)


def small_bottleneck_stage(**options):
    """A 2-block bottleneck stage (width 4 -> 16 maps, stride 2): the ResNet-50 structure in small."""
    return ResNetStage(residual=BottleneckResidual, num_blocks=2, features=4, strides=2, **options)


def test_remat_gives_identical_outputs_and_gradients(rng):
    plain, remat = small_bottleneck_stage(), small_bottleneck_stage(remat=True)
    variables = random_variables(plain, (1, 8, 8, 8), seed=2)
    assert jax.tree.structure(variables) == jax.tree.structure(random_variables(remat, (1, 8, 8, 8)))
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 8)), jnp.float32)

    def loss(params, model):
        out, _ = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
        return jnp.sum(out**2)

    value_plain, grad_plain = jax.jit(jax.value_and_grad(lambda p: loss(p, plain)))(variables["params"])
    value_remat, grad_remat = jax.jit(jax.value_and_grad(lambda p: loss(p, remat)))(variables["params"])
    np.testing.assert_allclose(value_remat, value_plain, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grad_remat), jax.tree.leaves(grad_plain)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_zero_init_last_bn_makes_every_block_the_identity(rng):
    stage = small_bottleneck_stage(zero_init_last_bn=True)
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 8)), jnp.float32)
    variables = jax.jit(lambda key: stage.init(key, x, train=False))(jax.random.key(0))
    for t in range(2):
        block = variables["params"][f"block{t}"]
        assert np.all(np.asarray(block["bn3"]["scale"]) == 0) and np.all(np.asarray(block["bn2"]["scale"]) == 1)
    out, maps = jax.jit(lambda v: captured(stage, v, x, train=False))(variables)
    assert np.all(np.asarray(maps[("block0",)]) == 0) and np.all(np.asarray(maps[("block1",)]) == 0)
    # F = 0: block0 gives relu(projection(x)), block1 passes that through unchanged
    np.testing.assert_array_equal(np.asarray(out), np.maximum(np.asarray(maps[("shortcut",)]), 0))


def test_resnet_options_reach_every_residual_module():
    """`zero_init_last_bn` and `remat` of the model are what every residual module is built with."""

    def residual_modules(**options):
        seen = []

        def record(next_fun, args, kwargs, context):
            if isinstance(context.module, BottleneckResidual) and context.method_name == "__call__":
                seen.append((context.module.zero_init_last_bn, type(context.module)))
            return next_fun(*args, **kwargs)

        model = models.create("resnet50", **options)
        with nn.intercept_methods(record):
            jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False))
        return seen

    plain = residual_modules()
    assert len(plain) == 16 and all(not zero and cls is BottleneckResidual for zero, cls in plain)
    remat = residual_modules(zero_init_last_bn=True, remat=True)
    assert len(remat) >= 16 and all(zero and cls is not BottleneckResidual for zero, cls in remat)


def test_dropout_uses_the_dropout_stream(rng):
    model = models.create("alexnet", num_classes=5, classifier_width=64)
    variables = random_variables(model, (1, 64, 64, 3))
    x = jnp.asarray(rng.standard_normal((2, 64, 64, 3)), jnp.float32)
    apply = jax.jit(lambda v, key: model.apply(v, x, train=True, rngs={"dropout": key}))
    a, b = apply(variables, jax.random.key(1)), apply(variables, jax.random.key(2))
    a_again = apply(variables, jax.random.key(1))
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(a, a_again)
    eval_out = model.apply(variables, x, train=False)  # no rng needed
    assert eval_out.shape == (2, 5)


def test_googlenet_trains_with_aux_heads(rng):
    model = models.create("googlenet", num_classes=4, aux_logits=True)
    variables = random_variables(model, (1, 64, 64, 3))
    x = jnp.asarray(rng.standard_normal((2, 64, 64, 3)), jnp.float32)
    out, state = jax.jit(
        lambda v: model.apply(v, x, train=True, rngs={"dropout": jax.random.key(0)}, mutable=["batch_stats"])
    )(variables)
    assert isinstance(out, GoogLeNetOutput)
    assert all(o.shape == (2, 4) and np.all(np.isfinite(o)) for o in out)
    changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), state["batch_stats"], variables["batch_stats"])
    assert all(jax.tree.leaves(changed))
