"""OverFeat dense evaluation: every position of the score map equals the classifier on its crop."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cnn.models
from cnn.tasks import sliding_window as sw


def _random_variables(name: str, input_shape, seed: int = 0, **options):
    """Variables of the right shapes filled with scaled normal noise (no init to compile)."""
    model = cnn.models.create(name, **options)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *input_shape)), train=False))
    generator = np.random.default_rng(seed)

    def fill(shape):
        fan_in = int(np.prod(shape.shape[:-1])) if len(shape.shape) > 1 else 1
        return jnp.asarray(generator.standard_normal(shape.shape) / np.sqrt(fan_in), jnp.float32)

    return model, jax.tree_util.tree_map(fill, shapes)


def _per_crop_reference(model, variables, images, window, stride):
    """The classifier on each crop, cut out with numpy loops: [batch, rows, cols, classes]."""
    images = np.asarray(images)
    rows = (images.shape[1] - window) // stride + 1
    cols = (images.shape[2] - window) // stride + 1
    apply = jax.jit(lambda x: model.apply(variables, x, train=False))
    scores = None
    for i in range(rows):
        for j in range(cols):
            crop = images[:, i * stride : i * stride + window, j * stride : j * stride + window]
            logits = np.asarray(apply(jnp.asarray(crop)))
            if scores is None:
                scores = np.zeros((images.shape[0], rows, cols, logits.shape[-1]), np.float32)
            scores[:, i, j] = logits
    return scores


@pytest.mark.parametrize(
    "name, input_shape, image_hw, options",
    [
        ("lenet5", (32, 32, 1), (56, 44), {"num_classes": 10}),  # 7 x 4 positions, stride 4
        ("lenet5", (32, 32, 1), (32, 32), {"num_classes": 10, "activation": "relu"}),  # one position
        ("lecun_convnet", (83, 83, 1), (123, 103), {"num_classes": 5}),  # 3 x 2 positions, stride 20
    ],
)
def test_dense_evaluation_equals_classifier_on_every_crop(name, input_shape, image_hw, options):
    model, variables = _random_variables(name, input_shape, **options)
    fcn = sw.to_fully_convolutional(name, variables, **options)
    images = np.random.default_rng(1).uniform(size=(2, *image_hw, input_shape[-1])).astype(np.float32)
    dense = np.asarray(fcn(images))
    window, stride = input_shape[0], fcn.geometry.stride
    reference = _per_crop_reference(model, variables, images, window, stride)
    assert fcn.geometry.window == window
    rows, cols = (fcn.geometry.output_size(side) for side in image_hw)
    assert dense.shape == reference.shape == (2, rows, cols, options["num_classes"])
    tolerance = {"rtol": 1e-4, "atol": 1e-5 * np.abs(reference).max()}
    np.testing.assert_allclose(dense, reference, **tolerance)
    # The library's own crop baseline agrees too (it is what the benchmark times).
    crops = np.asarray(sw.crop_scores(name, variables, images, fcn.geometry, **options))
    np.testing.assert_allclose(crops, reference, **tolerance)


def test_geometry_strides_match_the_networks():
    assert (sw.DenseGeometry(32, 4).output_size(56), sw.DenseGeometry(83, 20).output_size(123)) == (7, 3)
    assert sw.DenseGeometry(224, 32).crop_box(1, 2) == (32, 64, 256, 288)
    with pytest.raises(ValueError, match="size=20"):
        sw.DenseGeometry(32, 4).output_size(20)


def test_alexnet_spatial_fc6_as_a_6x6_convolution():
    """fc6 reads a flattened 6x6x256 map: as a 6x6 convolution it gives the classifier's scores
    at the 224 window, and a 2x2 score map at 256 (stride 32)."""
    options = {"num_classes": 4, "classifier_width": 8}
    model, variables = _random_variables("alexnet", (224, 224, 3), **options)
    fcn = sw.to_fully_convolutional("alexnet", variables, **options)
    assert fcn.variables["params"]["classifier"]["fc6"]["kernel"].shape == (6, 6, 256, 8)
    images = np.random.default_rng(2).uniform(size=(1, 256, 256, 3)).astype(np.float32)
    dense = np.asarray(fcn(images))
    assert dense.shape == (1, 2, 2, 4)
    single = np.asarray(model.apply(variables, jnp.asarray(images[:, :224, :224]), train=False))
    top_left = np.asarray(fcn(images[:, :224, :224]))
    np.testing.assert_allclose(top_left[:, 0, 0], single, rtol=1e-4, atol=1e-5 * np.abs(single).max())


def test_unsupported_or_too_small_inputs_are_rejected():
    _, variables = _random_variables("lenet5", (32, 32, 1), num_classes=10)
    with pytest.raises(ValueError, match="name='resnet18'"):
        sw.to_fully_convolutional("resnet18", variables)
    fcn = sw.to_fully_convolutional("lenet5", variables)
    with pytest.raises(ValueError, match="size=30"):
        fcn(np.zeros((1, 30, 40, 1), np.float32))
    with pytest.raises(ValueError, match="images must be"):
        fcn(np.zeros((30, 40, 1), np.float32))


def test_compare_dense_and_crops_counts_fewer_flops_for_the_dense_pass():
    _, variables = _random_variables("lenet5", (32, 32, 1), num_classes=10)
    report = sw.compare_dense_and_crops("lenet5", variables, 64, repeats=1)
    assert report["positions"] == 81
    assert report["max_abs_difference"] < 1e-4
    # Deterministic counts, not timings: cropping repeats the shared convolutions 81 times.
    assert report["crops_flops"] > 2 * report["dense_flops"] > 0


@pytest.mark.slow
def test_vgg11_dense_evaluation_at_the_canonical_window():
    """VGG's fc6 (7x7x512 -> width) as a 7x7 convolution equals the classifier at 224x224."""
    options = {"num_classes": 3, "classifier_width": 8}
    model, variables = _random_variables("vgg11", (224, 224, 3), **options)
    fcn = sw.to_fully_convolutional("vgg11", variables, **options)
    images = np.random.default_rng(3).uniform(size=(1, 224, 224, 3)).astype(np.float32)
    single = np.asarray(model.apply(variables, jnp.asarray(images), train=False))
    np.testing.assert_allclose(np.asarray(fcn(images))[:, 0, 0], single, rtol=1e-4, atol=1e-5 * np.abs(single).max())
    assert fcn(np.zeros((1, 288, 256, 3), np.float32)).shape == (1, 3, 2, 3)
