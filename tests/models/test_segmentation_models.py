"""Segmentation models: FCN-32s/16s/8s, SegNet, U-Net, dilated front end + context module.

Shapes are traced (`jax.eval_shape`); numbers are checked against the papers (Caffe crop offsets,
Table 1 receptive fields, parameter counts by layer arithmetic), against `jax.image.resize`, and
against the mirror symmetry a correctly centred crop must preserve.
"""

from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cnn.models as models
from cnn import ops
from cnn.models import dilated, fcn, segnet, unet
from cnn.models.vgg import VGGClassifier, VGGFeatures
from tests.models.helpers import random_variables

NUM_CLASSES = 4
FCN_SMALL = dict(widths=(4, 4, 8, 8, 8), fc_width=8, fc6_kernel=3, fc6_padding=1, conv1_padding=1)
DILATED_SMALL = dict(widths=(4, 4, 8, 8, 8), fc_width=8, fc6_kernel=3)
SMALL = {
    "fcn32s": FCN_SMALL,
    "fcn16s": FCN_SMALL,
    "fcn8s": FCN_SMALL,
    "segnet": dict(widths=(4, 8, 8), convs_per_block=(1, 2, 2)),
    "unet": dict(depth=3, width=4),
    "dilated_frontend": DILATED_SMALL,
    "dilated_context": DILATED_SMALL,
}
# Odd, tiny, non-square and larger-than-the-total-stride sizes.
SIZES = [(1, 1), (5, 3), (17, 31), (32, 32), (33, 20)]


def output_shape(model, input_shape, train=False):
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(input_shape), train=False))
    out = jax.eval_shape(
        lambda v: model.apply(v, jnp.zeros(input_shape), train=train, rngs={"dropout": jax.random.key(1)},
                              mutable=["batch_stats"] if train else False),
        variables,
    )
    return (out[0] if train else out).shape, variables


def param_count(model, input_shape):
    return models.count_params(output_shape(model, input_shape)[1]["params"])


def conv_params(kernel, cin, cout, bias=True):
    return kernel * kernel * cin * cout + (cout if bias else 0)


# ------------------------------------------------------------------------------------------------
# Shapes for every model and size.


@pytest.mark.parametrize("name", sorted(SMALL))
def test_output_has_the_input_resolution_for_every_size(name):
    model = models.create(name, num_classes=NUM_CLASSES, **SMALL[name])
    for height, width in SIZES:
        shape, _ = output_shape(model, (2, height, width, 3))
        assert shape == (2, height, width, NUM_CLASSES), (name, height, width)
    shape, _ = output_shape(model, (2, 17, 31, 3), train=True)  # dropout / BatchNorm training path
    assert shape == (2, 17, 31, NUM_CLASSES)


@pytest.mark.parametrize(
    "name, options",
    [
        ("fcn8s", dict(widths=(4, 4, 8, 8, 8), fc_width=8)),  # the paper's padding 100 and 7x7 fc6
        ("fcn32s", dict(widths=(4, 4, 8, 8, 8), fc_width=8)),
        ("unet", dict(depth=2, width=4, padding="valid")),  # overlap-tile mirroring
        ("dilated_context", dict(DILATED_SMALL, context="large")),
    ],
)
def test_paper_geometries_also_keep_the_input_resolution(name, options):
    model = models.create(name, num_classes=NUM_CLASSES, **options)
    for height, width in SIZES:
        assert output_shape(model, (1, height, width, 3))[0] == (1, height, width, NUM_CLASSES), (height, width)


def test_registry_names_and_canonical_sizes():
    for name in SMALL:
        assert name in models.available()
    assert output_shape(models.create("fcn8s"), (1, 500, 500, 3))[0] == (1, 500, 500, 21)
    model = models.create("unet", padding="valid", pad_input=False)
    assert model.canonical_input_shape == (572, 572, 1)
    assert output_shape(model, (1, 572, 572, 1))[0] == (1, 388, 388, 2)  # Ronneberger et al., Fig. 1


# ------------------------------------------------------------------------------------------------
# Parameter counts of the full-size models, from layer arithmetic (and the papers' rounded counts).


def vgg16_conv_params(batch_norm=False):
    widths = [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256),
              (256, 512), (512, 512), (512, 512), (512, 512), (512, 512), (512, 512)]
    return sum(conv_params(3, a, b) + (2 * b if batch_norm else 0) for a, b in widths)


def test_full_size_parameter_counts():
    trunk = vgg16_conv_params()
    assert trunk == 14_714_688  # VGG16's convolutions (138,357,544 minus the three Dense layers)
    fc = conv_params(7, 512, 4096) + conv_params(1, 4096, 4096)
    c = 21
    # learned: score layers and the two 2x upsamplings; the final 8x / 32x upsampling is fixed bilinear
    fcn8s = (trunk + fc + conv_params(1, 4096, c) + conv_params(1, 512, c) + conv_params(1, 256, c)
             + 2 * conv_params(4, c, c, bias=False))
    fcn32s = trunk + fc + conv_params(1, 4096, c)
    assert param_count(models.create("fcn8s"), (1, 64, 64, 3)) == fcn8s == 134_376_863
    assert param_count(models.create("fcn32s"), (1, 64, 64, 3)) == fcn32s
    assert param_count(models.create("fcn8s", learnable_final_upsampling=True), (1, 64, 64, 3)) == (
        fcn8s + conv_params(16, c, c, bias=False))
    assert round(fcn8s / 1e6) == 134  # Long et al. 2015, Table 1: FCN-VGG16 has 134M parameters

    frontend = trunk + fc + conv_params(1, 4096, c)
    assert param_count(models.create("dilated_frontend"), (1, 64, 64, 3)) == frontend
    context = 7 * conv_params(3, c, c) + conv_params(1, c, c)
    assert param_count(models.create("dilated_context"), (1, 64, 64, 3)) == frontend + context
    large = [c * m for m in (1, 2, 2, 4, 8, 16, 32, 32)]
    context_large = sum(conv_params(3, a, b) for a, b in zip(large[:-1], large[1:])) + conv_params(1, 32 * c, c)
    assert param_count(models.create("dilated_context", context="large"), (1, 64, 64, 3)) == frontend + context_large

    decoder = [(512, 512), (512, 512), (512, 512), (512, 512), (512, 512), (512, 256), (256, 256),
               (256, 256), (256, 128), (128, 128), (128, 64), (64, 64)]
    segnet_count = (vgg16_conv_params(batch_norm=True) + sum(conv_params(3, a, b) + 2 * b for a, b in decoder)
                    + conv_params(3, 64, 11))
    count = param_count(models.create("segnet", num_classes=11), (1, 32, 32, 3))
    assert count == segnet_count
    assert abs(count / 1e6 - 29.5) < 0.1  # Badrinarayanan et al. 2017, Table 6: 29.5M

    widths = [64 * 2**level for level in range(5)]
    down = [(1, 64)] + [(widths[i - 1], widths[i]) for i in range(1, 5)]
    unet_count = sum(conv_params(3, a, b) + conv_params(3, b, b) for a, b in down)
    for level in range(3, -1, -1):
        w = widths[level]
        unet_count += conv_params(2, 2 * w, w) + conv_params(3, 2 * w, w) + conv_params(3, w, w)
    unet_count += conv_params(1, 64, 2)
    assert param_count(models.create("unet"), (1, 64, 64, 1)) == unet_count == 31_030_658


# ------------------------------------------------------------------------------------------------
# FCN geometry.


@pytest.mark.parametrize("stride, learned, fixed", [
    (32, [], "upscore"), (16, ["upscore2"], "upscore16"), (8, ["upscore2", "upscore_pool4"], "upscore8")])
def test_fcn_final_upsampling_is_fixed_bilinear_and_only_the_2x_upsamplings_learn(stride, learned, fixed):
    """Long et al. 2015, section 4.1 and the reference voc-fcn*s nets (lr_mult 0 on the last
    Deconvolution): the final upsampling is bilinear interpolation and is not trained."""
    model = models.create(f"fcn{stride}s", num_classes=3, **FCN_SMALL)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 32, 32, 3)), jnp.float32)
    variables = model.init(jax.random.key(0), x, train=False)
    upsampling = sorted(name for name in variables["params"] if name.startswith("upscore"))
    assert upsampling == learned and fixed not in variables["params"]
    # the fixed layer is the bilinear kernel the learnable one starts from: same scores at init
    learnable = models.create(f"fcn{stride}s", num_classes=3, learnable_final_upsampling=True, **FCN_SMALL)
    params = dict(variables["params"])
    params[fixed] = {"kernel": jnp.asarray(fcn.bilinear_kernel(fcn.upsampling_kernel_size(stride), 3))}
    # nonzero scores (the paper zero-initializes score_fr)
    params["score_fr"] = {"kernel": jnp.ones_like(params["score_fr"]["kernel"]), "bias": params["score_fr"]["bias"]}
    out_fixed = model.apply({**variables, "params": params}, x, train=False)
    out_learnable = learnable.apply({**variables, "params": params}, x, train=False)
    assert float(jnp.abs(out_fixed).max()) > 0
    np.testing.assert_allclose(np.asarray(out_fixed), np.asarray(out_learnable), rtol=1e-5, atol=1e-6)


def test_fcn_crop_offsets_are_those_of_the_reference_caffe_models():
    # voc-fcn32s: upscore crop 19; voc-fcn16s: score_pool4c 5, upscore16 crop 27;
    # voc-fcn8s: score_pool4c 5, score_pool3c 9, upscore8 crop 31.
    assert fcn.fcn_crop_offsets(32) == {"final": 19}
    assert fcn.fcn_crop_offsets(16) == {"score_pool4": 5, "final": 27}
    assert fcn.fcn_crop_offsets(8) == {"score_pool4": 5, "score_pool3": 9, "final": 31}
    # Sizes kept (padding 1, 3x3 fc6 padded): the upsampled maps are the ones cropped.
    small = fcn.FCN(stride=8, **FCN_SMALL).layout().crops
    assert small == {"upscore2": 1, "upscore_pool4": 1, "final": 4}


def test_grid_agrees_with_the_receptive_field_arithmetic():
    # (kernel, stride, dilation, padding) stacks; Grid counts pixel centres from 0, ops from 0.5.
    stack = [(3, 1, 1, 100), (3, 1, 1, 1), (2, 2, 1, 0), (3, 1, 2, 2), (2, 2, 1, 0), (7, 1, 4, 0), (1, 1, 1, 0)]
    grid = fcn.Grid()
    for kernel, stride, dilation, padding in stack:
        grid = grid.conv(kernel, stride, padding, dilation)
    reference = ops.receptive_fields(stack)[-1]
    assert grid.jump == reference.jump
    assert float(grid.start) + 0.5 == pytest.approx(reference.start)


def test_align_crops_the_map_that_starts_earlier():
    coarse = jnp.arange(6.0)[None, :, None, None] * jnp.ones((1, 6, 6, 1))
    fine = jnp.arange(4.0)[None, :, None, None] * jnp.ones((1, 4, 5, 1))
    # coarse unit i at 2i - 1, fine unit i at 2i + 3: fine's unit 0 is coarse's unit 2.
    a, b, grid = fcn.align(coarse, fcn.Grid(2, -1), fine, fcn.Grid(2, 3))
    assert a.shape == b.shape == (1, 4, 4, 1)
    np.testing.assert_array_equal(a[0, :, 0, 0], [2, 3, 4, 5])
    np.testing.assert_array_equal(b[0, :, 0, 0], [0, 1, 2, 3])
    assert grid == fcn.Grid(2, 3)
    with pytest.raises(ValueError, match="lattice"):
        fcn.Grid(2, 0).index_of(fcn.Grid(2, 1))


def symmetrized(variables):
    """Every conv kernel made left-right symmetric, so a correctly centred net commutes with flips.
    (Random variables: the zero-initialized score layers would make every output 0.)"""
    def fix(path, leaf):
        if path[-1].key == "kernel" and leaf.ndim == 4:
            return (leaf + leaf[:, ::-1]) / 2
        return leaf

    return jax.tree_util.tree_map_with_path(fix, variables)


@pytest.mark.parametrize(
    "name, options, size",
    [
        ("fcn8s", dict(widths=(2, 2, 2, 2, 2), convs_per_block=(1, 1, 1, 1, 1), fc_width=2), (5, 58)),  # 58 + 198 = 256
        ("fcn8s", FCN_SMALL, (3, 64)),  # every pool sees an even width
        ("segnet", SMALL["segnet"], (3, 24)),
        ("unet", dict(depth=2, width=2, padding="valid", pad_input=False), (48, 44)),  # a valid tile
        ("unet", SMALL["unet"], (3, 16)),
        ("dilated_context", DILATED_SMALL, (3, 40)),
    ],
)
def test_crops_are_centred_so_mirror_symmetry_is_kept(name, options, size):
    """With left-right symmetric kernels a net whose crops are centred is equivariant to mirroring
    the input left-right (pool windows tile the even maps symmetrically); a crop off by one pixel
    breaks it."""
    model = models.create(name, num_classes=3, **options)
    height, width = size
    x = jax.random.normal(jax.random.key(2), (1, height, width, 3))
    variables = symmetrized(random_variables(model, x.shape))
    if name == "segnet":
        # Argmax ties (windows of ReLU zeros) pick the first position in row-major order, which
        # mirroring moves; BatchNorm scale 0.1 and offset 1 keep every activation positive.
        variables = jax.tree_util.tree_map_with_path(
            lambda path, leaf: {"scale": 0.1, "bias": 1.0}.get(path[-1].key, leaf) * jnp.ones_like(leaf)
            if path[-2].key.startswith("bn") else leaf, variables)
    forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
    direct = forward(variables, x)
    mirrored = forward(variables, x[:, :, ::-1])[:, :, ::-1]
    assert float(jnp.abs(direct).max()) > 0
    np.testing.assert_allclose(mirrored, direct, rtol=1e-4, atol=1e-5 * float(jnp.abs(direct).max()))


def test_symmetry_test_detects_a_crop_off_by_one(monkeypatch):
    x = jax.random.normal(jax.random.key(2), (1, 3, 64, 3))
    model = models.create("fcn32s", num_classes=3, **FCN_SMALL)
    variables = symmetrized(random_variables(model, x.shape))
    crop = fcn.crop

    def shifted_crop(x, offset, size):  # the final crop one pixel too far
        return crop(x, offset + 1, size) if x.shape[1] > offset + size[0] else crop(x, offset, size)

    direct = model.apply(variables, x, train=False)
    monkeypatch.setattr(fcn, "crop", shifted_crop)
    wrong = model.apply(variables, x, train=False)
    wrong_mirrored = model.apply(variables, x[:, :, ::-1], train=False)[:, :, ::-1]
    assert not np.allclose(wrong, direct)
    assert not np.allclose(wrong_mirrored, wrong, rtol=1e-4, atol=1e-5 * float(jnp.abs(wrong).max()))


def test_fc6_fc7_as_convolutions_equal_the_vgg_classifier():
    """vgg_to_fcn_params: at every 7x7 window of pool5 the converted fc6/fc7/fc8 convolutions give
    exactly the scores the Dense classifier gives on that window."""
    model = fcn.FCN(num_classes=5, stride=32, widths=(2, 2, 2, 2, 3), convs_per_block=(1, 1, 1, 1, 1), fc_width=6,
                    dropout_rate=0.0)
    x = jax.random.normal(jax.random.key(0), (1, 40, 45, 3))  # pool5 of (40 + 198) x (45 + 198): 8 x 8
    fcn_params = jax.eval_shape(lambda: model.init(jax.random.key(1), x, train=False))["params"]
    classifier = VGGClassifier(num_classes=5, hidden=6, dropout_rate=0.0)
    vgg_params = {
        "features": random_variables(fcn.VGGTrunk((2, 2, 2, 2, 3), (1, 1, 1, 1, 1)), x.shape)["params"],
        "classifier": classifier.init(jax.random.key(2), jnp.zeros((1, 7, 7, 3)), train=False)["params"],
    }
    params = fcn.vgg_to_fcn_params(vgg_params, fcn_params, include_classifier=True)

    @jax.jit
    def maps(params, x):
        _, state = model.apply({"params": params}, x, train=False, capture_intermediates=True,
                               mutable=["intermediates"])
        found = state["intermediates"]
        return found["features"]["pool5"]["__call__"][0], found["score_fr"]["__call__"][0]

    pool5, scores = maps(params, x)
    assert pool5.shape[1:3] == (8, 8) and scores.shape[1:3] == (2, 2)
    windows = jnp.concatenate([pool5[:, i:i + 7, j:j + 7] for i in range(2) for j in range(2)])
    expected = classifier.apply({"params": vgg_params["classifier"]}, windows, train=False)  # [4 windows, 5]
    np.testing.assert_allclose(scores[0].reshape(4, 5), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="fc6"):
        bad = dict(vgg_params, classifier=dict(vgg_params["classifier"], fc6={"kernel": jnp.zeros((10, 16)),
                                                                              "bias": jnp.zeros(16)}))
        fcn.vgg_to_fcn_params(bad, fcn_params)


def test_vgg_trunk_reproduces_vgg16_features():
    """At VGG16's widths the trunk has VGGFeatures' parameter tree and computes the same maps, so
    converted VGG16 weights load into FCN, SegNet and the dilated front end."""
    x = jax.random.normal(jax.random.key(0), (1, 32, 32, 3))
    reference = VGGFeatures(16)
    variables = random_variables(reference, x.shape)
    trunk = fcn.VGGTrunk()
    trunk_shapes = jax.eval_shape(lambda: trunk.init(jax.random.key(1), x, train=False))
    assert jax.tree_util.tree_structure(trunk_shapes) == jax.tree_util.tree_structure(variables)
    wanted = ("relu1_2", "pool2", "conv3_1")
    expected = jax.jit(lambda v, x: reference.apply(v, x, train=False, outputs=wanted))(variables, x)
    got = jax.jit(lambda v, x: trunk.apply(v, x, train=False, outputs=wanted))(variables, x)
    for name in wanted:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-4, atol=1e-4)
    frontend = jax.eval_shape(lambda: models.create("dilated_frontend").init(jax.random.key(0), x, train=False))
    segnet_trunk = jax.eval_shape(lambda: VGGFeatures(16, batch_norm=True).init(jax.random.key(0), x, train=False))
    assert jax.tree_util.tree_map(np.shape, frontend["params"]["features"]) == jax.tree_util.tree_map(
        np.shape, variables["params"])
    segnet_params = jax.eval_shape(lambda: models.create("segnet").init(jax.random.key(0), x, train=False))["params"]
    encoder = {k: v for k, v in segnet_params.items() if not k.endswith("_D")}
    assert jax.tree_util.tree_map(np.shape, encoder) == jax.tree_util.tree_map(np.shape, segnet_trunk["params"])


# ------------------------------------------------------------------------------------------------
# Bilinear upsampling.


def test_bilinear_kernel_values():
    np.testing.assert_allclose(fcn.bilinear_kernel_1d(4), [0.25, 0.75, 0.75, 0.25])
    np.testing.assert_allclose(fcn.bilinear_kernel_1d(3), [0.5, 1.0, 0.5])
    assert fcn.upsampling_kernel_size(32) == 64 and fcn.upsampling_kernel_size(3) == 5
    kernel = fcn.bilinear_kernel(4, 3)
    assert kernel.shape == (4, 4, 3, 3)
    assert kernel[:, :, 0, 1].sum() == 0 and kernel[1, 2, 2, 2] == 0.75 * 0.75


@pytest.mark.parametrize("factor", [2, 4, 8])
def test_bilinear_transposed_conv_matches_image_resize_away_from_the_border(factor):
    size = 10
    rows, cols = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    smooth = np.stack([np.sin(rows / 3.0) + np.cos(cols / 4.0), rows * cols / 50.0], -1)[None].astype(np.float32)
    reference = jax.image.resize(smooth, (1, size * factor, size * factor, 2), "bilinear")
    inside = slice(factor, -factor)  # the border, where resize clamps and the conv sees zeros, differs
    for learnable in (True, False):
        up = fcn.BilinearUpsample(factor, padding=factor // 2, learnable=learnable)
        variables = up.init(jax.random.key(0), smooth)
        assert ("kernel" in variables.get("params", {})) == learnable
        out = up.apply(variables, smooth)
        assert out.shape == reference.shape
        np.testing.assert_allclose(out[:, inside, inside], reference[:, inside, inside], atol=1e-5)
        assert float(jnp.abs(out - reference).max()) > 0.1  # the border really differs


# ------------------------------------------------------------------------------------------------
# SegNet.


def test_segnet_pool_and_unpool_on_a_hand_made_example():
    x = np.array(
        [[1, 9, 2, 0, 5],
         [3, 4, 8, 1, 6],
         [7, 0, 1, 2, 4],
         [2, 6, 3, 9, 1],
         [5, 1, 0, 3, 8]], np.float32)[None, :, :, None]
    values, indices = jax.jit(segnet.segnet_pool)(jnp.asarray(x))
    # Windows (2x2, stride 2; the odd last row/column pooled alone): maxima and their flat positions.
    np.testing.assert_array_equal(values[0, :, :, 0], [[9, 8, 6], [7, 9, 4], [5, 3, 8]])
    np.testing.assert_array_equal(indices[0, :, :, 0], [[1, 7, 9], [10, 18, 14], [20, 23, 24]])
    decoded = np.array([[10, 20, 30], [40, 50, 60], [70, 80, 90]], np.float32)[None, :, :, None]
    unpooled = jax.jit(ops.max_unpool, static_argnums=2)(jnp.asarray(decoded), indices, x.shape)
    expected = np.zeros((5, 5), np.float32)
    for (row, col), value in zip([(0, 1), (1, 2), (1, 4), (2, 0), (3, 3), (2, 4), (4, 0), (4, 3), (4, 4)],
                                 decoded.ravel()):
        expected[row, col] = value
    np.testing.assert_array_equal(unpooled[0, :, :, 0], expected)


def test_segnet_decoder_unpools_at_the_encoder_argmax_positions():
    model = models.create("segnet", num_classes=3, **SMALL["segnet"])
    x = jax.random.normal(jax.random.key(0), (2, 13, 10, 3))
    variables = random_variables(model, x.shape)
    scores, state = jax.jit(lambda v, x: model.apply(v, x, train=False, mutable=["intermediates"]))(variables, x)
    assert scores.shape == (2, 13, 10, 3)
    found = state["intermediates"]
    for block in (1, 2, 3):
        indices = np.asarray(found[f"pool{block}_indices"][0])
        values = np.asarray(found[f"unpool{block}_values"][0])
        unpooled = np.asarray(found[f"unpool{block}"][0])
        batch, h, w, channels = values.shape
        width = unpooled.shape[2]
        expected = np.zeros_like(unpooled)
        for b in range(batch):
            for i in range(h):
                for j in range(w):
                    for c in range(channels):
                        position = indices[b, i, j, c]
                        expected[b, position // width, position % width, c] = values[b, i, j, c]
        np.testing.assert_array_equal(unpooled, expected)
        assert np.count_nonzero(unpooled) <= values.size < unpooled.size


# ------------------------------------------------------------------------------------------------
# U-Net.


def test_unet_valid_sizes_follow_the_paper():
    assert unet.unet_valid_output_size(572, 4) == 388
    assert unet.unet_valid_margin(4) == 184
    assert unet.unet_valid_output_size(573, 4) is None  # a pool would see an odd side
    sizes = unet.unet_valid_input_sizes(4, 700)
    assert 572 in sizes and np.all(np.diff(sizes) == 16)
    shapes = jax.eval_shape(lambda: models.create("unet", depth=2, width=4).init(
        jax.random.key(0), jnp.zeros((1, 8, 8, 3)), train=False))["params"]
    # Concatenated skips: the first conv after each up-conv reads up + skip channels.
    assert shapes["up1_conv1"]["kernel"].shape == (3, 3, 16, 8)
    assert shapes["up0_conv1"]["kernel"].shape == (3, 3, 8, 4)
    assert shapes["up1_upconv"]["kernel"].shape[:2] == (2, 2)


# ------------------------------------------------------------------------------------------------
# Dilated front end and context module.


def test_frontend_scores_have_stride_8():
    model = models.create("dilated_frontend", num_classes=NUM_CLASSES, **DILATED_SMALL)
    assert model.score_grid() == fcn.Grid(8, Fraction(7, 2))
    _, variables = output_shape(model, (1, 33, 20, 3))

    def final(v):
        _, state = model.apply(v, jnp.zeros((1, 33, 20, 3)), train=False, capture_intermediates=True,
                               mutable=["intermediates"])
        return state["intermediates"]["final"]["__call__"][0]

    assert jax.eval_shape(final, variables).shape == (1, 5, 3, NUM_CLASSES)  # ceil(33 / 8), ceil(20 / 8)


@pytest.mark.parametrize("variant", ["basic", "large"])
def test_context_module_is_the_identity_at_initialization(variant):
    module = dilated.ContextModule(variant, noise_scale=0.0)
    x = jax.random.uniform(jax.random.key(0), (2, 11, 9, 3))  # non-negative: truncation keeps it
    variables = jax.jit(module.init)(jax.random.key(1), x)
    forward = jax.jit(module.apply)
    dyadic = jnp.round(x * 64) / 64  # partial sums of the replicated channels are then exact
    np.testing.assert_array_equal(forward(variables, dyadic), dyadic)
    if variant == "basic":
        np.testing.assert_array_equal(forward(variables, x), x)
    else:
        np.testing.assert_allclose(forward(variables, x), x, rtol=1e-6, atol=1e-7)
        # The default init adds symmetry-breaking noise to the widening layers' other weights.
        kernel = np.asarray(dilated._identity_init(3, 0.01)(jax.random.key(1), (3, 3, 3, 6), jnp.float32))
        exact = dilated.identity_kernel(3, 3, 6, 3)
        np.testing.assert_array_equal(kernel[exact != 0], exact[exact != 0])
        noise = kernel[exact == 0]
        assert np.all(noise != 0) and 0.5 * 0.005 < noise.std() < 2 * 0.005  # 0.01 * C / c_out
    negative = -x
    np.testing.assert_array_equal(forward(variables, negative), jnp.zeros_like(x))  # the first truncation


def test_identity_kernel_of_a_widening_layer():
    kernel = dilated.identity_kernel(3, 2, 4, base_channels=2)  # C = 2 -> 4 channels: weight C / c_out = 1/2
    centre = np.array([[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]])
    np.testing.assert_array_equal(kernel[1, 1], centre)
    assert np.abs(kernel).sum() == np.abs(centre).sum()


def test_context_module_receptive_field_grows_as_in_table_1():
    module = dilated.ContextModule("basic", identity_init=False)
    size = 75
    x = jnp.ones((1, size, size, 1))
    variables = module.init(jax.random.key(0), x)
    # Positive kernels and inputs: every unit is active, so the measured field is the full one.
    variables = jax.tree_util.tree_map(lambda p: jnp.abs(p) + 0.01, variables)
    names = [f"ctx_conv{i}" for i in range(1, 8)] + ["ctx_final"]
    measured = []
    for name in names:
        def layer_output(x, name=name):
            _, state = module.apply(variables, jnp.abs(x) + 1.0, capture_intermediates=True,
                                    mutable=["intermediates"])
            return state["intermediates"][name]["__call__"][0]

        measured.append(ops.empirical_receptive_field(jax.jit(layer_output), (size, size, 1)))
    assert [h for h, _ in measured] == [w for _, w in measured] == list(dilated.CONTEXT_RECEPTIVE_FIELDS)
    assert list(dilated.CONTEXT_RECEPTIVE_FIELDS) == [3, 5, 9, 17, 33, 65, 67, 67]  # Yu & Koltun, Table 1
    layers = [(3, 1, d) for d in dilated.CONTEXT_DILATIONS] + [(1, 1, 1)]
    assert [rf.size for rf in ops.receptive_fields(layers)] == list(dilated.CONTEXT_RECEPTIVE_FIELDS)


# ------------------------------------------------------------------------------------------------
# Bad input.


def test_bad_options_and_inputs_raise_naming_the_argument():
    with pytest.raises(ValueError, match="stride"):
        fcn.FCN(stride=4)
    with pytest.raises(ValueError, match="stride"):
        models.create("fcn8s", stride=16)
    with pytest.raises(ValueError, match="variant"):
        dilated.ContextModule("huge")
    with pytest.raises(ValueError, match="context"):
        models.create("dilated_context", context="huge")
    with pytest.raises(ValueError, match="padding"):
        models.create("unet", padding="full")
    with pytest.raises(ValueError, match="convs_per_block"):
        models.create("segnet", widths=(4, 8), convs_per_block=(1,))
    with pytest.raises(ValueError, match="fc6_kernel"):  # a 7x7 fc6 on the 1x1 pool5 of a 32x32 input
        output_shape(models.create("fcn8s", **dict(FCN_SMALL, fc6_kernel=7, fc6_padding=0)), (1, 32, 32, 3))
    with pytest.raises(ValueError, match="cover"):  # the upsampled scores do not reach the image's edge
        output_shape(models.create("fcn32s", **dict(FCN_SMALL, conv1_padding=5, fc6_padding=0)), (1, 64, 64, 3))
    with pytest.raises(ValueError, match="divisible"):
        output_shape(models.create("unet", depth=2, width=4, pad_input=False), (1, 10, 12, 3))
