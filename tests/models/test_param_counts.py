"""Exact parameter counts against published figures (torchvision's `parameters()` and the lecture).

Everything here is traced with `jax.eval_shape`: no compilation, no arithmetic.
"""

import jax
import jax.numpy as jnp
import pytest

import cnn.models as models
from tests.models.helpers import variable_shapes

# (name, options, input shape, published count). torchvision figures at 1000 classes.
PUBLISHED = [
    ("alexnet", {}, (1, 224, 224, 3), 61_100_840),
    ("vgg11", {}, (1, 224, 224, 3), 132_863_336),
    ("vgg13", {}, (1, 224, 224, 3), 133_047_848),
    ("vgg16", {}, (1, 224, 224, 3), 138_357_544),
    ("vgg19", {}, (1, 224, 224, 3), 143_667_240),
    ("vgg11_bn", {}, (1, 224, 224, 3), 132_868_840),
    ("vgg13_bn", {}, (1, 224, 224, 3), 133_053_736),
    ("vgg16_bn", {}, (1, 224, 224, 3), 138_365_992),
    ("vgg19_bn", {}, (1, 224, 224, 3), 143_678_248),
    ("googlenet", {}, (1, 224, 224, 3), 6_624_904),
    ("googlenet", {"aux_logits": True}, (1, 224, 224, 3), 13_004_888),
    ("resnet18", {}, (1, 224, 224, 3), 11_689_512),
    ("resnet34", {}, (1, 224, 224, 3), 21_797_672),
    ("resnet50", {}, (1, 224, 224, 3), 25_557_032),
    ("resnet101", {}, (1, 224, 224, 3), 44_549_160),
    ("resnet152", {}, (1, 224, 224, 3), 60_192_808),
    ("lenet5", {}, (1, 32, 32, 1), 61_706),
]


@pytest.mark.parametrize(
    "name,options,input_shape,published", PUBLISHED, ids=[f"{n}{'_aux' if o else ''}" for n, o, *_ in PUBLISHED]
)
def test_published_parameter_count(name, options, input_shape, published):
    variables = variable_shapes(models.create(name, **options), input_shape)
    assert models.count_params(variables["params"]) == published


def test_lecun_convnet_sparse_weights_are_the_lectures():
    params = variable_shapes(models.create("lecun_convnet"), (1, 83, 83, 1))["params"]
    assert params["conv1"]["kernel"].shape == (9, 9, 1, 64)
    # one 9x9 kernel per output map: 256 x 9 x 9 = 20,736 weights
    assert params["conv2"]["kernel"].shape == (9, 9, 1, 256)
    sizes = {name: layer["kernel"].size for name, layer in params.items()}
    assert sizes == {"conv1": 64 * 9 * 9, "conv2": 256 * 9 * 9, "fc": 256 * 101}
    assert sizes == {"conv1": 5_184, "conv2": 20_736, "fc": 25_856}  # the slide's "60916" is a slip
    assert models.count_params(params) == 5_184 + 20_736 + 25_856 + 64 + 256 + 101 == 52_197


def test_lecun_convnet_weights_only_and_full_connections():
    sparse = variable_shapes(models.create("lecun_convnet", use_bias=False), (1, 83, 83, 1))["params"]
    assert models.count_params(sparse) == 51_776
    full = variable_shapes(models.create("lecun_convnet", connections="full", use_bias=False), (1, 83, 83, 1))
    assert full["params"]["conv2"]["kernel"].size == 256 * 64 * 9 * 9 == 1_327_104
    assert models.count_params(full["params"]) == 5_184 + 1_327_104 + 25_856


def test_lecun_convnet_original_connection_table_count_by_hand():
    """LeCun's table: each of the 256 conv2 maps reads 16 of the 64 pool1 maps (4,096 9x9 kernels)."""
    params = variable_shapes(models.create("lecun_convnet", connections="table"), (1, 83, 83, 1))["params"]
    assert params["conv2"]["kernel"].shape == (9, 9, 16, 256)
    conv2 = 256 * 16 * 9 * 9  # = 4,096 kernels of 81 weights
    assert conv2 == 331_776
    assert models.count_params(params) == 64 * 81 + 64 + conv2 + 256 + 256 * 101 + 101 == 363_237
    weights_only = variable_shapes(models.create("lecun_convnet", connections="table", use_bias=False), (1, 83, 83, 1))
    assert models.count_params(weights_only["params"]) == 5_184 + 331_776 + 25_856 == 362_816
    # a quarter of the fully connected conv2 (64 input maps per output map), 16x the one-map table
    assert 4 * conv2 == 256 * 64 * 81 and conv2 == 16 * 20_736


def test_lenet5_per_layer():
    params = variable_shapes(models.create("lenet5"), (1, 32, 32, 1))["params"]
    per_layer = {name: models.count_params(layer) for name, layer in params.items()}
    assert per_layer == {
        "c1": 6 * 25 + 6,
        "c3": 16 * 6 * 25 + 16,
        "c5": 120 * 16 * 25 + 120,
        "f6": 84 * 120 + 84,
        "output": 10 * 84 + 10,
    }


def test_batch_stats_are_not_counted_as_params():
    variables = variable_shapes(models.create("resnet50"), (1, 224, 224, 3))
    # BN channels: stem 64; per bottleneck stage of width w and n blocks: n*(w + w + 4w) + 4w (projection)
    widths, blocks = (64, 128, 256, 512), (3, 4, 6, 3)
    channels = 64 + sum(n * 6 * w + 4 * w for n, w in zip(blocks, widths))
    assert models.count_params(variables["batch_stats"]) == 2 * channels == 53_120


def test_num_classes_changes_only_the_classifier():
    base = variable_shapes(models.create("resnet18"), (1, 64, 64, 3))["params"]
    ten = variable_shapes(models.create("resnet18", num_classes=10), (1, 64, 64, 3))["params"]
    assert models.count_params(base) - models.count_params(ten) == 990 * 512 + 990


def test_param_dtype():
    variables = variable_shapes(models.create("lenet5", param_dtype=jnp.bfloat16), (1, 32, 32, 1))
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(variables)} == {jnp.dtype(jnp.bfloat16)}
