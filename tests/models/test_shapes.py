"""Output and intermediate shapes (traced, not run), published layer sizes, and input validation."""

import jax
import jax.numpy as jnp
import pytest

import cnn.models as models
from cnn.models.googlenet import GoogLeNetOutput
from cnn.models.vgg import VGGFeatures, vgg_layer_names
from tests.models.helpers import intermediate_shapes, variable_shapes


def out_size(n, f, p=0, s=1):
    """The lecture's output-size formula floor((n + 2p - f) / s) + 1."""
    return (n + 2 * p - f) // s + 1


def output_shape(model, input_shape, train=False):
    variables = variable_shapes(model, input_shape)
    return jax.eval_shape(
        lambda v: model.apply(v, jnp.zeros(input_shape), train=train, rngs={"dropout": jax.random.key(1)},
                              mutable=["batch_stats"] if train else False),
        variables,
    )


# name -> (canonical input, other valid sizes)
SIZES = {
    "lecun_convnet": ((83, 83, 1), [(90, 102, 1)]),
    "lenet5": ((32, 32, 1), [(35, 33, 1)]),
    "alexnet": ((224, 224, 3), [(63, 63, 3), (100, 160, 3)]),
    "vgg16": ((224, 224, 3), [(32, 32, 3), (64, 96, 3)]),
    "vgg11_bn": ((224, 224, 3), [(48, 48, 3)]),
    "googlenet": ((224, 224, 3), [(31, 31, 3), (96, 128, 3)]),
    "resnet18": ((224, 224, 3), [(1, 1, 3), (97, 160, 3)]),
    "resnet50": ((224, 224, 3), [(32, 48, 3)]),
    "resnet152": ((224, 224, 3), [(64, 64, 3)]),
}


@pytest.mark.parametrize("name", sorted(SIZES))
def test_output_shapes(name):
    canonical, others = SIZES[name]
    model = models.create(name, num_classes=7)
    assert model.canonical_input_shape == canonical
    for spatial in [canonical, *others]:
        out = output_shape(model, (2, *spatial))
        assert out.shape == (2, 7), spatial


def test_lecun_convnet_intermediate_sizes_follow_the_formula():
    shapes = intermediate_shapes(models.create("lecun_convnet"), (1, 83, 83, 1))
    conv1 = out_size(83, 9)
    pool1 = out_size(conv1, 10, s=5)
    conv2 = out_size(pool1, 9)
    pool2 = out_size(conv2, 6, s=4)
    assert (conv1, pool1, conv2, pool2) == (75, 14, 6, 1)
    assert shapes[("conv1",)] == (1, 75, 75, 64)
    assert shapes[("pool1",)] == (1, 14, 14, 64)
    assert shapes[("conv2",)] == (1, 6, 6, 256)
    assert shapes[("pool2",)] == (1, 1, 1, 256)
    assert shapes[("fc",)] == (1, 101)


def test_lenet5_intermediate_sizes():
    shapes = intermediate_shapes(models.create("lenet5"), (1, 32, 32, 1))
    assert [shapes[(n,)][1:] for n in ("c1", "s2", "c3", "s4", "c5")] == [
        (28, 28, 6), (14, 14, 6), (10, 10, 16), (5, 5, 16), (1, 1, 120)
    ]


def test_vgg16_named_maps():
    shapes = intermediate_shapes(models.create("vgg16"), (1, 224, 224, 3))
    expected = {"conv1_1": (224, 64), "pool1": (112, 64), "pool3": (28, 256), "conv4_2": (28, 512),
                "pool4": (14, 512), "conv5_3": (14, 512), "pool5": (7, 512)}
    for name, (side, channels) in expected.items():
        assert shapes[("features", name)] == (1, side, side, channels), name
    assert shapes[("classifier", "fc6")] == (1, 4096)


def test_vgg_features_outputs_by_name_and_early_stop():
    trunk = VGGFeatures(depth=19)
    x = jnp.zeros((1, 64, 64, 3))
    wanted = ("relu1_1", "conv2_1", "pool3")
    variables = jax.eval_shape(lambda: trunk.init(jax.random.key(0), x, train=False, outputs=wanted))
    # only the layers up to pool3 exist: 2 + 2 + 4 convs of VGG-19
    assert list(variables["params"]) == [n for n in vgg_layer_names(19) if n.startswith("conv") and n < "conv4"]
    maps = jax.eval_shape(lambda v: trunk.apply(v, x, train=False, outputs=wanted), variables)
    assert {k: v.shape for k, v in maps.items()} == {
        "relu1_1": (1, 64, 64, 64), "conv2_1": (1, 32, 32, 128), "pool3": (1, 8, 8, 256)
    }
    with pytest.raises(ValueError, match=r"outputs=\['conv6_1'\] are not layers of vgg19"):
        trunk.init(jax.random.key(0), x, train=False, outputs=["conv6_1"])


def test_vgg_dilated_front_end_keeps_resolution_and_params():
    plain = VGGFeatures(depth=16)
    dilated = VGGFeatures(depth=16, pools=(True, True, True, False, False), dilations=(1, 1, 1, 2, 4))
    x = jnp.zeros((1, 64, 64, 3))
    p_plain = variable_shapes(plain, x.shape)
    p_dilated = variable_shapes(dilated, x.shape)
    assert jax.tree.map(lambda a: a.shape, p_plain) == jax.tree.map(lambda a: a.shape, p_dilated)
    out = jax.eval_shape(lambda v: dilated.apply(v, x, train=False), p_dilated)
    assert out.shape == (1, 8, 8, 512)  # 64 / 2^3


@pytest.mark.parametrize("name,final", [("resnet18", 512), ("resnet50", 2048)])
def test_resnet_stage_shapes(name, final):
    shapes = intermediate_shapes(models.create(name), (1, 224, 224, 3))
    expansion = final // 512
    assert shapes[("conv1",)] == (1, 112, 112, 64)
    assert shapes[("maxpool",)] == (1, 56, 56, 64)
    for stage, (side, width) in enumerate([(56, 64), (28, 128), (14, 256), (7, 512)], start=1):
        assert shapes[(f"layer{stage}",)] == (1, side, side, width * expansion)
    # the residual module F alone has the block's output shape; projections only where shapes change
    assert shapes[("layer2", "block0")] == shapes[("layer2", "shortcut")] == (1, 28, 28, 128 * expansion)
    assert ("layer2", "block1", "conv1") in shapes and ("layer2", "shortcut") in shapes
    assert (("layer1", "shortcut") in shapes) == (expansion == 4)


def test_googlenet_published_inception_widths():
    shapes = intermediate_shapes(models.create("googlenet"), (1, 224, 224, 3))
    # Szegedy et al. 2015, table 1 (output sizes of each stage)
    table = {"conv1": (112, 64), "maxpool1": (56, 64), "conv3": (56, 192), "maxpool2": (28, 192),
             "inception3a": (28, 256), "inception3b": (28, 480), "maxpool3": (14, 480),
             "inception4a": (14, 512), "inception4b": (14, 512), "inception4c": (14, 512),
             "inception4d": (14, 528), "inception4e": (14, 832), "maxpool4": (7, 832),
             "inception5a": (7, 832), "inception5b": (7, 1024)}
    for name, (side, channels) in table.items():
        assert shapes[(name,)] == (1, side, side, channels), name


def test_googlenet_aux_heads_only_in_training():
    model = models.create("googlenet", aux_logits=True, num_classes=5)
    out, _ = output_shape(model, (2, 224, 224, 3), train=True)
    assert isinstance(out, GoogLeNetOutput)
    assert [o.shape for o in out] == [(2, 5)] * 3
    assert output_shape(model, (2, 224, 224, 3), train=False).shape == (2, 5)


def test_bad_model_name():
    with pytest.raises(ValueError, match=r"unknown model name='resnet51'.*Did you mean.*'resnet50'"):
        models.create("resnet51")


@pytest.mark.parametrize(
    "name,options,match",
    [
        ("vgg", {"depth": 17}, r"depth=17 is not a VGG depth"),
        ("resnet", {"depth": 42}, r"depth=42 is not an ImageNet ResNet depth"),
        ("resnet", {"stage_sizes": (1, 2)}, r"stage_sizes=\(1, 2\)"),
        ("lecun_convnet", {"connections": "partial"}, r"connections='partial' is not one of"),
        ("lenet5", {"activation": "gelu"}, r"activation='gelu'"),
        ("googlenet", {"branch3_kernel_size": 7}, r"branch3_kernel_size=7"),
    ],
)
def test_bad_options(name, options, match):
    with pytest.raises(ValueError, match=match):
        models.create(name, **options)


# Independent minimum sides:
#   VGG: five 2x2/2 pools need 2^5 = 32.
#   AlexNet: pool5 (3x3/2) needs a 3x3 map -> pool2 out >= 3 -> its input >= 7 -> conv1 out >= 15
#            -> (n + 4 - 11) // 4 + 1 >= 15 -> n >= 63.
#   GoogLeNet (ceil-mode pools, torch semantics: a window may hang over the far edge if it starts
#            inside the input): maxpool4 (2x2/2) keeps 1 output of a 1x1 map -> maxpool3 (3x3/2)
#            needs input >= 2 (ceil(-1/2) + 1 = 1) -> maxpool2 input >= 4 -> maxpool1 input >= 8
#            -> (n - 1) // 2 + 1 >= 8 -> n >= 15 (torch's own pools give 14 -> error, 15 -> 1x1).
#   LeCun ConvNet: 83 (75, 14, 6, 1); LeNet-5: 32.
MINIMUM_SIDE = {"vgg16": 32, "vgg19_bn": 32, "alexnet": 63, "googlenet": 15, "lecun_convnet": 83, "lenet5": 32}


@pytest.mark.parametrize("name", sorted(MINIMUM_SIDE))
def test_input_too_small(name):
    model = models.create(name)
    minimum = MINIMUM_SIDE[name]
    channels = model.canonical_input_shape[-1]
    assert output_shape(model, (1, minimum, minimum, channels)).shape[0] == 1
    shape = (1, minimum - 1, minimum + 5, channels)
    with pytest.raises(ValueError, match=rf"input x of shape \(1, {minimum - 1}, {minimum + 5}, {channels}\) "
                                          rf"is too small: height and width must be (at least|between) {minimum}\b"):
        variable_shapes(model, shape)


def test_lecun_nets_reject_inputs_whose_classifier_map_is_not_1x1():
    with pytest.raises(ValueError, match=r"too large: height and width must be between 83 and 102"):
        variable_shapes(models.create("lecun_convnet"), (1, 103, 83, 1))
    with pytest.raises(ValueError, match=r"between 32 and 35, got 28x28"):
        variable_shapes(models.create("lenet5"), (1, 28, 28, 1))


def test_input_rank():
    with pytest.raises(ValueError, match=r"resnet50: input x has shape \(224, 224, 3\); expected 4 dimensions"):
        models.create("resnet50").init(jax.random.key(0), jnp.zeros((224, 224, 3)), train=False)
