"""Per-pixel cross-entropy with the ignore label and class weights, against numpy loops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn.tasks.segmentation import loss as seg_loss

IGNORE = 255


def numpy_loss(logits, labels, weights=None):
    total, norm = 0.0, 0.0
    for index in np.ndindex(labels.shape):
        label = labels[index]
        if label == IGNORE:
            continue
        row = logits[index].astype(np.float64)
        log_prob = row[label] - (row.max() + np.log(np.exp(row - row.max()).sum()))
        weight = 1.0 if weights is None else weights[label]
        total += -weight * log_prob
        norm += weight
    return total / norm


@pytest.fixture
def example(rng):
    logits = rng.normal(0, 3, (2, 5, 7, 4)).astype(np.float32)
    labels = rng.integers(0, 4, (2, 5, 7))
    labels[rng.random(labels.shape) < 0.3] = IGNORE
    return logits, labels


def test_mean_over_non_ignored_pixels_matches_numpy(example):
    logits, labels = example
    got = seg_loss.pixel_cross_entropy(jnp.asarray(logits), jnp.asarray(labels))
    assert float(got) == pytest.approx(numpy_loss(logits, labels), rel=1e-5)
    per_pixel, valid = seg_loss.per_pixel_cross_entropy(jnp.asarray(logits), jnp.asarray(labels))
    np.testing.assert_array_equal(np.asarray(valid), labels != IGNORE)
    assert np.all(np.asarray(per_pixel)[labels == IGNORE] == 0)


def test_class_weights_give_the_weighted_mean(example):
    logits, labels = example
    weights = np.array([0.5, 2.0, 1.0, 3.0], np.float32)
    got = seg_loss.pixel_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), class_weights=weights)
    assert float(got) == pytest.approx(numpy_loss(logits, labels, weights), rel=1e-5)
    with pytest.raises(ValueError, match="class_weights"):
        seg_loss.pixel_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), class_weights=np.ones(3))


def test_ignored_pixels_get_no_gradient_and_all_ignored_gives_zero(example):
    logits, labels = example
    grad = jax.grad(lambda z: seg_loss.pixel_cross_entropy(z, jnp.asarray(labels)))(jnp.asarray(logits))
    assert np.all(np.asarray(grad)[labels == IGNORE] == 0)
    assert np.all(np.abs(np.asarray(grad)[labels != IGNORE]).sum(-1) > 0)
    everything_ignored = jnp.full(labels.shape, IGNORE)
    assert float(seg_loss.pixel_cross_entropy(jnp.asarray(logits), everything_ignored)) == 0.0
    with pytest.raises(ValueError, match="labels.shape"):
        seg_loss.pixel_cross_entropy(jnp.asarray(logits), jnp.asarray(labels[:, :4]))


def test_median_frequency_weights_on_a_hand_worked_example():
    # Image A (4 px): classes 0, 0, 0, 1. Image B (4 px, one ignored): 0, 2, 2, 255.
    masks = [np.array([[0, 0], [0, 1]]), np.array([[0, 2], [2, 255]])]
    # f_0 = 4 / (4 + 3), f_1 = 1 / 4, f_2 = 2 / 3; median f = 4/7; class 3 never appears.
    weights = seg_loss.median_frequency_weights(masks, 4)
    f = np.array([4 / 7, 1 / 4, 2 / 3])
    np.testing.assert_allclose(weights, [4 / 7 / f[0], 4 / 7 / f[1], 4 / 7 / f[2], 0.0])
    with pytest.raises(ValueError, match="num_classes"):
        seg_loss.median_frequency_weights([np.array([[5]])], 4)
