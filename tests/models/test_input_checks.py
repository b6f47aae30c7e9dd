"""Models check their input once, at the top: rank 4 (NHWC), floating dtype, and, once they have
parameters, the channel count their first convolution was built for (with an NCHW hint).

The expected messages are derived from the shapes each case builds: the channel count the model
was initialized with, the shape handed in, and whether dimension 1 equals that channel count.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cnn.models as models
from cnn.models.vgg import VGGFeatures

# Every model family, small where options allow; canonical sides where the architecture fixes them.
FAMILIES = {
    "alexnet": ({}, (224, 224)),
    "cifar_resnet": ({"depth": 8}, (32, 32)),
    "dilated_frontend": ({"widths": (4, 4, 8, 8, 8), "fc_width": 8, "fc6_kernel": 3}, (64, 64)),
    "fcn8s": ({"widths": (4, 4, 8, 8, 8), "fc_width": 8, "fc6_kernel": 3, "fc6_padding": 1, "conv1_padding": 1}, (32, 32)),
    "googlenet": ({}, (224, 224)),
    "lecun_convnet": ({}, (83, 83)),
    "lenet5": ({}, (32, 32)),
    "resnet18": ({}, (64, 64)),
    "segnet": ({"widths": (4, 8), "convs_per_block": (1, 1)}, (16, 16)),
    "simple_cnn": ({"widths": (4,)}, (16, 16)),
    "unet": ({"depth": 2, "width": 4}, (16, 16)),
    "vgg11": ({}, (32, 32)),
    "yolo_v1_tiny": ({}, (64, 64)),
}


def init_shapes(model, shape, dtype=jnp.float32):
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), jax.ShapeDtypeStruct(shape, dtype))


def apply_shapes(model, variables, shape, dtype=jnp.float32):
    return jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, jax.ShapeDtypeStruct(shape, dtype))


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_family_names_nhwc_the_expected_channels_and_the_shape_received(name):
    options, (height, width) = FAMILIES[name]
    model = models.create(name, **options)
    channels = 2  # not 1 or 3, so that a transposed array cannot pass by coincidence
    variables = init_shapes(model, (2, height, width, channels))
    apply_shapes(model, variables, (2, height, width, channels))  # the right input passes

    wrong = (2, height, width, channels + 1)
    with pytest.raises(ValueError) as info:
        apply_shapes(model, variables, wrong)
    message = str(info.value)
    assert "NHWC" in message and f"x.shape={wrong}" in message and f"with {channels} channels" in message
    assert "NCHW" not in message  # dimension 1 is not the channel count: no transpose hint

    nchw = (2, channels, height, width)
    with pytest.raises(ValueError) as info:
        apply_shapes(model, variables, nchw)
    message = str(info.value)
    assert f"x.shape={nchw}" in message and "looks like NCHW" in message
    assert f"x.transpose(0, 2, 3, 1) to get {(2, height, width, channels)}" in message


@pytest.mark.parametrize("name", ["resnet18", "vgg11", "unet", "cifar_resnet"])
def test_integer_images_are_rejected_with_advice_to_scale(name):
    options, (height, width) = FAMILIES[name]
    model = models.create(name, **options)
    for dtype in (jnp.uint8, jnp.int32, jnp.bool_):
        with pytest.raises(ValueError) as info:
            init_shapes(model, (1, height, width, 3), dtype)
        message = str(info.value)
        assert f"x.dtype={jnp.dtype(dtype)}" in message and f"x.shape={(1, height, width, 3)}" in message
        assert "x.astype(jnp.float32) / 255.0" in message
    for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):  # every floating type is accepted
        init_shapes(model, (1, height, width, 3), dtype)


@pytest.mark.parametrize("name", ["resnet18", "vgg11", "unet", "cifar_resnet"])
@pytest.mark.parametrize(
    "shape,hint",
    [((32, 32, 3), "x[None]"), ((32, 32), "x[None, :, :, None]"), ((1, 1, 32, 32, 3), "")],
)
def test_wrong_rank_names_nhwc_and_the_shape(name, shape, hint):
    model = models.create(name, **FAMILIES[name][0])
    with pytest.raises(ValueError) as info:
        init_shapes(model, shape)
    message = str(info.value)
    assert f"x has shape {shape}; expected 4 dimensions, NHWC [batch, height, width, channels]" in message
    assert hint in message


def test_channels_are_inferred_at_init():
    """Before it has parameters a model takes any channel count: digits (1), RGB (3), 5 bands."""
    model = models.create("cifar_resnet", depth=8, num_classes=7)
    for channels in (1, 3, 5):
        variables = init_shapes(model, (2, 8, 8, channels))
        assert variables["params"]["conv1"]["kernel"].shape[2] == channels
        assert apply_shapes(model, variables, (2, 8, 8, channels)).shape == (2, 7)


def test_googlenet_transform_input_fixes_three_channels_even_at_init():
    """torchvision's RGB re-normalization reads 3 channels whatever the parameters."""
    model = models.create("googlenet", transform_input=True)
    init_shapes(model, (1, 64, 64, 3))
    with pytest.raises(ValueError, match=re.escape("with 3 channels")) as info:
        init_shapes(model, (1, 64, 64, 1))
    assert "NCHW" not in str(info.value)
    with pytest.raises(ValueError, match="looks like NCHW"):
        init_shapes(model, (1, 3, 64, 64))


def test_vgg_features_used_alone_checks_its_own_first_convolution():
    trunk = VGGFeatures(depth=11)
    variables = init_shapes(trunk, (1, 32, 32, 3))
    with pytest.raises(ValueError, match=re.escape("x.shape=(1, 3, 32, 32)")):
        apply_shapes(trunk, variables, (1, 3, 32, 32))


def test_checks_run_under_jit_and_leave_values_unchanged():
    """Static shapes only: the jitted forward pass of a valid input equals the eager one, and a
    wrong channel count fails at trace time with the same message."""
    model = models.create("simple_cnn", widths=(4,), num_classes=4)
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
    variables = model.init(jax.random.key(0), x, train=False)
    forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
    np.testing.assert_allclose(forward(variables, x), model.apply(variables, x, train=False), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=re.escape("x.shape=(2, 3, 8, 8)")):
        forward(variables, jnp.transpose(x, (0, 3, 1, 2)))


def test_ensemble_members_axis_is_accepted():
    """Parameters with a leading member axis (vmapped ensembles) still give the channel count."""
    model = models.create("cifar_resnet", depth=8, num_classes=4)
    x = jnp.ones((2, 8, 8, 3))
    init = jax.vmap(lambda key: model.init(key, x, train=False))
    stacked = jax.eval_shape(init, jax.random.split(jax.random.key(0), 3))
    logits = jax.eval_shape(jax.vmap(lambda v: model.apply(v, x, train=False)), stacked)
    assert logits.shape == (3, 2, 4)
    with pytest.raises(ValueError, match="with 3 channels"):
        jax.eval_shape(jax.vmap(lambda v: model.apply(v, jnp.ones((2, 8, 8, 1)), train=False)), stacked)
