"""Jit-able NMS against a greedy numpy reference written here."""

import jax
import numpy as np
import pytest

from cnn.tasks.detection import nms as nms_lib


def iou_loop(a, b):
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def greedy_reference(boxes, scores, iou_threshold, score_threshold=None):
    """Textbook greedy NMS: visit boxes by decreasing score (stable), keep one unless it overlaps
    an already kept box with IoU > threshold."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    kept = []
    for i in order:
        if score_threshold is not None and not scores[i] > score_threshold:
            continue
        if all(iou_loop(boxes[i], boxes[k]) <= iou_threshold for k in kept):
            kept.append(i)
    return kept


def clustered_boxes(rng, n, clusters=4):
    centres = rng.uniform(10, 90, size=(clusters, 2))
    which = rng.integers(0, clusters, n)
    centre = centres[which] + rng.normal(0, 3, size=(n, 2))
    size = rng.uniform(5, 25, size=(n, 2))
    return np.concatenate([centre - size / 2, centre + size / 2], 1).astype(np.float32)


nms = jax.jit(nms_lib.nms, static_argnames=("max_outputs", "score_threshold", "box_format"))  # iou_threshold traced
multiclass_nms = jax.jit(nms_lib.multiclass_nms, static_argnames=(
    "iou_threshold", "score_threshold", "max_per_class", "max_detections", "box_format"))


@pytest.mark.parametrize("iou_threshold", [0.3, 0.5, 0.7])
def test_nms_matches_greedy_reference(rng, iou_threshold):
    for trial in range(4):
        boxes = clustered_boxes(rng, 40)
        # rounded scores make ties; ties must go to the lower index, as a stable sort does
        scores = np.round(rng.uniform(0, 1, 40), 1).astype(np.float32)
        expected = greedy_reference(boxes, scores, iou_threshold)
        indices, valid = map(np.asarray, nms(boxes, scores, iou_threshold=iou_threshold, max_outputs=40))
        assert valid.sum() == len(expected)
        assert list(indices[valid]) == expected
        assert np.all(indices[~valid] == -1) and np.all(valid[: len(expected)])


def test_nms_fixed_size_truncates_and_filters_scores(rng):
    boxes = clustered_boxes(rng, 30, clusters=8)
    scores = rng.uniform(0, 1, 30).astype(np.float32)
    expected = greedy_reference(boxes, scores, 0.5, score_threshold=0.3)
    assert len(expected) > 3
    indices, valid = map(np.asarray, nms(boxes, scores, iou_threshold=0.5, max_outputs=3, score_threshold=0.3))
    assert indices.shape == (3,) and valid.all()
    assert list(indices) == expected[:3]
    indices, valid = map(np.asarray, nms(boxes, scores, iou_threshold=0.5, max_outputs=30, score_threshold=0.3))
    assert list(indices[valid]) == expected


def test_nms_hand_example():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 10]], np.float32)
    scores = np.array([0.9, 0.8, 0.7, 0.95], np.float32)
    # box 3 wins; box 0 is identical (IoU 1) and box 1 overlaps it with IoU 81/119 > 0.5
    indices, valid = map(np.asarray, nms(boxes, scores, iou_threshold=0.5, max_outputs=4))
    assert list(indices) == [3, 2, -1, -1] and list(valid) == [True, True, False, False]
    # at threshold 0.7, 81/119 = 0.68 no longer suppresses box 1
    indices, valid = map(np.asarray, nms(boxes, scores, iou_threshold=0.7, max_outputs=4))
    assert list(indices[valid]) == [3, 1, 2]


def test_multiclass_nms_matches_per_class_reference(rng):
    n, classes = 30, 3
    boxes = clustered_boxes(rng, n)
    class_scores = np.round(rng.uniform(0, 1, (n, classes)), 2).astype(np.float32)
    class_scores[class_scores < 0.4] = 0.0
    candidates = []
    for c in range(classes):
        kept = greedy_reference(boxes, class_scores[:, c], 0.5, score_threshold=0.0)[:5]
        candidates += [(-class_scores[i, c], c, rank, i) for rank, i in enumerate(kept)]
    candidates.sort()  # by score, then class, then rank within the class
    expected = candidates[:8]
    dets = jax.tree_util.tree_map(np.asarray, multiclass_nms(
        boxes, class_scores, iou_threshold=0.5, score_threshold=0.0, max_per_class=5, max_detections=8))
    assert dets.boxes.shape == (8, 4) and dets.valid.sum() == len(expected)
    np.testing.assert_array_equal(dets.classes[dets.valid], [c for _, c, _, _ in expected])
    np.testing.assert_allclose(dets.scores[dets.valid], [-s for s, _, _, _ in expected])
    np.testing.assert_array_equal(dets.boxes[dets.valid], boxes[[i for _, _, _, i in expected]])
    # boxes of different classes never suppress each other
    two = np.array([[0, 0, 10, 10], [0, 0, 10, 10]], np.float32)
    # (and more slots than the 2 classes x 2 candidates: the rest is padding)
    same_box = multiclass_nms(two, np.array([[0.9, 0.0], [0.0, 0.8]], np.float32), max_per_class=2, max_detections=6)
    assert list(np.asarray(same_box.classes)) == [0, 1, -1, -1, -1, -1]
    assert list(np.asarray(same_box.valid)) == [True, True, False, False, False, False]


def test_no_boxes_gives_only_invalid_slots():
    indices, valid = nms_lib.nms(np.zeros((0, 4)), np.zeros(0), max_outputs=3)
    assert list(np.asarray(indices)) == [-1, -1, -1] and not np.asarray(valid).any()
    # all scores below the threshold: nothing kept
    indices, valid = nms(np.ones((2, 4)) * [0, 0, 1, 1], np.array([0.1, 0.2]), max_outputs=2, score_threshold=0.5)
    assert not np.asarray(valid).any()


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="max_outputs=0"):
        nms_lib.nms(np.zeros((2, 4)), np.zeros(2), max_outputs=0)
    with pytest.raises(ValueError, match="scores has shape"):
        nms_lib.nms(np.zeros((2, 4)), np.zeros(3), max_outputs=2)
    with pytest.raises(ValueError, match="iou_threshold=1.5"):
        nms_lib.nms(np.zeros((2, 4)), np.zeros(2), max_outputs=2, iou_threshold=1.5)
    with pytest.raises(ValueError, match="class_scores has shape"):
        nms_lib.multiclass_nms(np.zeros((2, 4)), np.zeros((3, 2)))
