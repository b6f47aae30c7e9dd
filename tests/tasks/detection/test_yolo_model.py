"""The YOLO v1 networks: output shapes, the paper's layer count and parameter count (eval_shape)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cnn.models
from cnn.models import yolo


def abstract_variables(model, side):
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, side, side, 3)), train=False))


def kernels(params):
    leaves = jax.tree_util.tree_leaves_with_path(params)
    return [(jax.tree_util.keystr(path), leaf.shape) for path, leaf in leaves if "kernel" in jax.tree_util.keystr(path)]


def test_full_yolo_is_7x7x30_with_24_conv_and_2_fc_layers():
    model = cnn.models.create("yolo_v1")  # S=7, B=2, C=20
    variables = abstract_variables(model, 448)
    out = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((2, 448, 448, 3)), train=False), variables)
    assert out.shape == (2, 7, 7, 30)
    shapes = [shape for _, shape in kernels(variables["params"])]
    conv = [s for s in shapes if len(s) == 4]
    dense = [s for s in shapes if len(s) == 2]
    assert len(conv) == 24 and len(dense) == 2
    # The paper's Figure 3, written out independently: (kernel, output maps) in order.
    figure3 = [(7, 64), (3, 192), (1, 128), (3, 256), (1, 256), (3, 512)] + [(1, 256), (3, 512)] * 4 + [
        (1, 512), (3, 1024)] + [(1, 512), (3, 1024)] * 2 + [(3, 1024)] * 4
    channels = [3] + [f for _, f in figure3]
    # flax orders the parameter dict by name; sort conv layers by their number
    by_name = sorted(kernels(variables["params"]), key=lambda item: (len(item[0]), item[0]))
    conv_by_index = sorted(
        [(int(name.split("conv")[1].split("'")[0]), shape) for name, shape in by_name if len(shape) == 4]
    )
    assert [shape for _, shape in conv_by_index] == [(k, k, channels[i], f) for i, (k, f) in enumerate(figure3)]
    assert sorted(dense) == sorted([(7 * 7 * 1024, 4096), (4096, 7 * 7 * 30)])
    expected = sum(k * k * cin * f + f for (k, f), cin in zip(figure3, channels))
    expected += 7 * 7 * 1024 * 4096 + 4096 + 4096 * 1470 + 1470
    assert cnn.models.count_params(variables["params"]) == expected


def test_full_yolo_other_geometry():
    model = cnn.models.create("yolo_v1", num_classes=3, grid_size=5, boxes_per_cell=3)
    variables = abstract_variables(model, 448)
    out = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((1, 448, 448, 3)), train=False), variables)
    assert out.shape == (1, 5, 5, 3 * 5 + 3)


@pytest.fixture(scope="module")
def tiny():
    """The small network at 32x32 (S=4, B=2, C=3), initialized once (compiles dominate on CPU)."""
    model = cnn.models.create("yolo_v1_tiny", num_classes=3, grid_size=4)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)
    variables = jax.jit(lambda key: model.init(key, x, train=False))(jax.random.key(0))
    return model, x, variables


def test_tiny_yolo_runs_and_reshapes_fc_output_row_major(tiny):
    model, x, variables = tiny
    out, features = jax.jit(lambda v: model.apply(v, x, train=False, capture_intermediates=True))(variables)
    assert out.shape == (2, 4, 4, 13)
    fc2 = features["intermediates"]["fc2"]["__call__"][0]
    assert fc2.shape == (2, 4 * 4 * 13)
    # element ((row * S + col) * (B*5+C) + k) of fc2's vector is channel k of cell (row, col)
    row, col, k = 2, 1, 7
    np.testing.assert_array_equal(out[:, row, col, k], fc2[:, (row * 4 + col) * 13 + k])
    conv = [s for _, s in kernels(variables["params"]) if len(s) == 4]
    assert len(conv) == len([layer for layer in yolo.YOLO_V1_TINY_LAYERS if layer != yolo.POOL]) == 9
    # without dropout (train=False) the output is deterministic
    np.testing.assert_array_equal(out, jax.jit(lambda v: model.apply(v, x, train=False))(variables))


def test_dropout_after_first_fc_only_in_training(tiny):
    model, x, variables = tiny
    train = jax.jit(lambda v, key: model.apply(v, x, train=True, rngs={"dropout": key}))
    a, b = train(variables, jax.random.key(1)), train(variables, jax.random.key(2))
    assert not np.allclose(a, b)


def test_leaky_relu_slope_is_the_papers():
    assert yolo.YOLOv1().negative_slope == 0.1
    assert yolo.YOLOv1().dropout_rate == 0.5


def test_batch_norm_option_adds_batch_stats():
    model = cnn.models.create("yolo_v1_tiny", num_classes=2, grid_size=2, batch_norm=True)
    variables = abstract_variables(model, 16)
    assert "batch_stats" in variables


def test_bad_input_names_the_argument():
    model = cnn.models.create("yolo_v1_tiny", num_classes=2)
    with pytest.raises(ValueError, match="too small"):
        model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), train=False)
    with pytest.raises(ValueError, match="grid_size=0"):
        abstract_variables(cnn.models.create("yolo_v1_tiny", grid_size=0), 16)
