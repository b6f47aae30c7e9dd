"""cnn.viz: filter grids, feature maps of named layers, input-gradient saliency; PNG files written."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import cnn.models
from cnn import viz


class LinearClassifier(nn.Module):
    """logits = flatten(x) @ W: the input gradient of class k is W[:, k], known in closed form."""

    num_classes: int = 3

    @nn.compact
    def __call__(self, x, *, train: bool):
        del train
        return nn.Dense(self.num_classes, use_bias=False, name="dense")(x.reshape(x.shape[0], -1))


@pytest.fixture(scope="module")
def simple():
    model = cnn.models.create("simple_cnn", num_classes=10, widths=(4, 8))
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 12, 12, 1)), train=False))
    generator = np.random.default_rng(0)
    fill = lambda s: jnp.asarray(0.3 * generator.standard_normal(s.shape) + 0.1, jnp.float32)  # noqa: E731
    variables = jax.tree_util.tree_map(fill, shapes)
    variables["batch_stats"] = jax.tree_util.tree_map(jnp.abs, variables["batch_stats"])  # positive variances
    return model, variables


def _is_png(path) -> bool:
    with Image.open(path) as image:
        return image.format == "PNG" and image.size[0] > 50


def test_saliency_of_a_linear_classifier_is_its_weights(rng):
    model = LinearClassifier()
    images = jnp.asarray(rng.uniform(size=(2, 4, 5, 3)), jnp.float32)
    variables = model.init(jax.random.key(0), images, train=False)
    weights = np.asarray(variables["params"]["dense"]["kernel"]).reshape(4, 5, 3, 3)  # [h, w, c, classes]
    maps, labels = viz.saliency(model, variables, images, labels=jnp.asarray([2, 0]))
    np.testing.assert_allclose(np.asarray(maps[0]), np.abs(weights[..., 2]).max(axis=-1), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(maps[1]), np.abs(weights[..., 0]).max(axis=-1), rtol=1e-6)
    _, predicted = viz.saliency(model, variables, images)
    logits = np.asarray(images).reshape(2, -1) @ np.asarray(variables["params"]["dense"]["kernel"])
    np.testing.assert_array_equal(np.asarray(predicted), logits.argmax(-1))


def test_filter_images_scale_each_filter_to_unit_range(rng):
    kernel = rng.standard_normal((5, 5, 3, 6)).astype(np.float32)
    images = viz.filter_images(kernel)
    assert images.shape == (6, 5, 5, 3)
    np.testing.assert_allclose(images.min(axis=(1, 2, 3)), 0.0, atol=1e-7)
    np.testing.assert_allclose(images.max(axis=(1, 2, 3)), 1.0, rtol=1e-6)
    k = kernel[..., 4]
    np.testing.assert_allclose(images[4], (k - k.min()) / (k.max() - k.min()), rtol=1e-5, atol=1e-6)
    assert viz.filter_images(rng.standard_normal((3, 3, 8, 2))).shape == (2, 3, 3, 1)  # mean over inputs
    with pytest.raises(ValueError, match="kernel must be"):
        viz.filter_images(np.zeros((3, 3, 4)))


def test_first_conv_kernel_is_the_layer_reading_the_image(simple):
    _, variables = simple
    np.testing.assert_array_equal(viz.first_conv_kernel(variables["params"]), variables["params"]["Conv_0"]["kernel"])
    with pytest.raises(ValueError, match="no convolution kernel"):
        viz.first_conv_kernel({"dense": {"kernel": np.zeros((3, 2))}})


def test_plots_are_written_to_the_run_directory(simple, tmp_path, rng):
    model, variables = simple
    images = rng.uniform(size=(3, 12, 12, 1)).astype(np.float32)
    run = tmp_path / "run" / "viz"
    written = [
        viz.plot_filters(viz.first_conv_kernel(variables["params"]), run / "filters.png"),
        viz.plot_feature_maps(model, variables, images[0], "Conv_1", run / "conv1.png"),
        viz.plot_saliency(model, variables, images, run / "saliency.png", class_names=[str(i) for i in range(10)]),
    ]
    for path in written:
        assert path.parent == run and _is_png(path)


def test_layer_names_in_forward_order_and_feature_maps_match(simple, rng):
    model, variables = simple
    assert viz.layer_names(model, variables, (12, 12, 1)) == ["Conv_0", "BatchNorm_0", "Conv_1", "BatchNorm_1"]
    image = jnp.asarray(rng.uniform(size=(1, 12, 12, 1)), jnp.float32)
    outputs = viz.layer_outputs(model, variables, image)
    conv0 = jax.lax.conv_general_dilated(image, variables["params"]["Conv_0"]["kernel"], (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(np.asarray(outputs["Conv_0"]), np.asarray(conv0), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="layer='conv9'"):
        viz.plot_feature_maps(model, variables, np.zeros((12, 12, 1)), "conv9", "unused.png")
