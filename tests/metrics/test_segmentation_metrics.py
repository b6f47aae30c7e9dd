"""Segmentation metrics: confusion matrix, pixel / mean accuracy, mean IoU, frequency-weighted IoU.

References: explicit loops over pixels and classes written here, and a hand-worked example.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn.metrics import segmentation as seg

IGNORE = 255


def random_labels(rng, shape, num_classes, ignore_fraction=0.2):
    labels = rng.integers(0, num_classes, shape)
    labels[rng.random(shape) < ignore_fraction] = IGNORE
    predictions = rng.integers(0, num_classes, shape)
    return labels, predictions


def loop_confusion(labels, predictions, num_classes):
    cm = np.zeros((num_classes, num_classes), np.int64)
    for truth, guess in zip(labels.ravel(), predictions.ravel()):
        if truth != IGNORE:
            cm[truth, guess] += 1
    return cm


def loop_metrics(labels, predictions, num_classes):
    """The four metrics straight from pixel counts, class by class."""
    keep = labels != IGNORE
    truth, guess = labels[keep], predictions[keep]
    pixel_accuracy = np.mean(truth == guess)
    accuracies, ious, weighted = [], [], 0.0
    for c in range(num_classes):
        in_truth, in_guess = truth == c, guess == c
        intersection = np.sum(in_truth & in_guess)
        union = np.sum(in_truth | in_guess)
        if in_truth.any():
            accuracies.append(intersection / in_truth.sum())
        if union:
            ious.append(intersection / union)
            weighted += in_truth.sum() * intersection / union
    return {
        "pixel_accuracy": pixel_accuracy,
        "mean_accuracy": np.mean(accuracies),
        "mean_iou": np.mean(ious),
        "frequency_weighted_iou": weighted / truth.size,
    }


def test_confusion_matrix_matches_a_pixel_loop_with_the_ignore_label_excluded(rng):
    labels, predictions = random_labels(rng, (3, 17, 13), 5)
    expected = loop_confusion(labels, predictions, 5)
    cm = seg.confusion_matrix(labels, predictions, 5)
    np.testing.assert_array_equal(cm, expected)
    assert cm.dtype == np.int64 and cm.sum() == np.sum(labels != IGNORE) < labels.size
    on_device = jax.jit(lambda a, b: seg.confusion_matrix_jax(a, b, 5))(jnp.asarray(labels), jnp.asarray(predictions))
    np.testing.assert_array_equal(np.asarray(on_device), expected)
    everything = seg.confusion_matrix(np.where(labels == IGNORE, 0, labels), predictions, 5, ignore_label=None)
    assert everything.sum() == labels.size


def test_metrics_match_per_class_pixel_counts(rng):
    for num_classes in (2, 5, 21):
        labels, predictions = random_labels(rng, (2, 31, 29), num_classes)
        # Make predictions better than chance so the metrics are not all alike.
        agree = rng.random(labels.shape) < 0.6
        predictions = np.where(agree & (labels != IGNORE), labels, predictions)
        expected = loop_metrics(labels, predictions, num_classes)
        got = seg.segmentation_metrics(seg.confusion_matrix(labels, predictions, num_classes))
        for name, value in expected.items():
            assert got[name] == pytest.approx(value, rel=1e-12), name


def test_a_hand_worked_example():
    # truth:      0 0 0 1 | 1 1 2 255        pred: 0 0 1 1 | 1 2 2 0
    labels = np.array([0, 0, 0, 1, 1, 1, 2, 255])
    predictions = np.array([0, 0, 1, 1, 1, 2, 2, 0])
    cm = seg.confusion_matrix(labels, predictions, 3)
    np.testing.assert_array_equal(cm, [[2, 1, 0], [0, 2, 1], [0, 0, 1]])
    assert seg.pixel_accuracy(cm) == pytest.approx(5 / 7)
    assert seg.mean_accuracy(cm) == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)
    # IoU: class 0: 2 / (3 + 2 - 2) = 2/3; class 1: 2 / (3 + 3 - 2) = 1/2; class 2: 1 / (1 + 2 - 1) = 1/2
    np.testing.assert_allclose(seg.per_class_iou(cm), [2 / 3, 1 / 2, 1 / 2])
    assert seg.mean_iou(cm) == pytest.approx((2 / 3 + 1 / 2 + 1 / 2) / 3)
    assert seg.frequency_weighted_iou(cm) == pytest.approx((3 * 2 / 3 + 3 * 1 / 2 + 1 * 1 / 2) / 7)


def test_absent_classes_are_left_out_of_the_means():
    labels = np.array([0, 0, 1, 1])
    predictions = np.array([0, 0, 1, 3])  # class 2 appears nowhere, class 3 only as a wrong guess
    cm = seg.confusion_matrix(labels, predictions, 4)
    iou = seg.per_class_iou(cm)
    assert np.isnan(iou[2]) and iou[3] == 0.0
    assert seg.mean_iou(cm) == pytest.approx((1.0 + 0.5 + 0.0) / 3)
    accuracy = seg.per_class_accuracy(cm)
    assert np.isnan(accuracy[2]) and np.isnan(accuracy[3])
    assert seg.mean_accuracy(cm) == pytest.approx((1.0 + 0.5) / 2)


def test_bad_input_raises_naming_the_argument():
    with pytest.raises(ValueError, match="labels.shape"):
        seg.confusion_matrix(np.zeros((2, 3), int), np.zeros((3, 2), int), 2)
    with pytest.raises(ValueError, match="labels"):
        seg.confusion_matrix(np.array([0, 7]), np.array([0, 1]), 2)
    with pytest.raises(ValueError, match="predictions"):
        seg.confusion_matrix(np.array([0, 1]), np.array([0, 2]), 2)
    with pytest.raises(ValueError, match="num_classes"):
        seg.confusion_matrix(np.array([0]), np.array([0]), 0)
    with pytest.raises(ValueError, match="cm"):
        seg.mean_iou(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="no pixels"):
        seg.pixel_accuracy(np.zeros((2, 2)))
    # Inside jit, out-of-range values cannot raise: they are not counted.
    cm = seg.confusion_matrix_jax(jnp.array([0, 7, 1]), jnp.array([0, 1, 9]), 2)
    np.testing.assert_array_equal(np.asarray(cm), [[1, 0], [0, 0]])
