"""VOC AP / mAP against precision/recall worked out by hand in the comments."""

import math

import numpy as np
import pytest

from cnn.metrics import detection as metrics

A = (0, 0, 10, 10)
B = (20, 20, 30, 30)
FAR = (50, 50, 60, 60)


def dets(*rows):
    """(box, score, class) rows -> a detection dict."""
    return {
        "boxes": np.array([r[0] for r in rows], np.float32).reshape(-1, 4),
        "scores": np.array([r[1] for r in rows], np.float32),
        "classes": np.array([r[2] for r in rows], np.int32),
    }


def gts(*rows):
    """(box, class[, difficult]) rows -> a ground-truth dict."""
    return {
        "boxes": np.array([r[0] for r in rows], np.float32).reshape(-1, 4),
        "classes": np.array([r[1] for r in rows], np.int32),
        "difficult": np.array([r[2] if len(r) > 2 else False for r in rows], bool),
    }


def evaluate(detections, ground_truths, method, num_classes=1, **kwargs):
    return metrics.evaluate_detections(detections, ground_truths, num_classes=num_classes, method=method, **kwargs)


def test_two_images_with_a_duplicate_and_a_miss():
    # image 0: objects A, B; image 1: object A. P = 3.
    # by score: 0.9 A@0 TP | 0.8 A shifted @0 duplicate FP (IoU 90/110) | 0.7 FAR@1 FP | 0.6 A@1 TP | 0.5 FAR@0 FP
    # recall    1/3, 1/3, 1/3, 2/3, 2/3
    # precision 1,   1/2, 1/3, 1/2, 2/5
    # all-point: envelope 1 on (0, 1/3], 1/2 on (1/3, 2/3], 0 beyond: AP = 1/3 + 1/6 = 0.5
    # 11-point: t = 0, .1, .2, .3 -> 1; t = .4, .5, .6 -> 1/2; t >= .7 -> 0: AP = 5.5 / 11 = 0.5
    detections = [dets((A, 0.9, 0), ((1, 0, 11, 10), 0.8, 0), (FAR, 0.5, 0)), dets((FAR, 0.7, 0), (A, 0.6, 0))]
    ground_truths = [gts((A, 0), (B, 0)), gts((A, 0))]
    for method in ("voc2010", "voc07"):
        result = evaluate(detections, ground_truths, method)
        np.testing.assert_allclose(result.recall[0], [1 / 3, 1 / 3, 1 / 3, 2 / 3, 2 / 3])
        np.testing.assert_allclose(result.precision[0], [1, 1 / 2, 1 / 3, 1 / 2, 2 / 5])
        assert result.average_precision[0] == pytest.approx(0.5)
        assert result.mean_ap == pytest.approx(0.5)
        assert result.num_positives[0] == 3 and result.num_detections[0] == 5


def test_interpolations_differ():
    # P = 2; TP, FP, TP, FP: recall .5 .5 1 1, precision 1 .5 2/3 .5
    # all-point: .5 * 1 + .5 * 2/3 = 5/6
    # 11-point: t <= .5 (6 points) -> 1, t >= .6 (5 points) -> 2/3: (6 + 10/3) / 11 = 28/33
    detections = [dets((A, 0.9, 0), (FAR, 0.8, 0), (B, 0.7, 0), ((70, 70, 80, 80), 0.6, 0))]
    ground_truths = [gts((A, 0), (B, 0))]
    assert evaluate(detections, ground_truths, "voc2010").mean_ap == pytest.approx(5 / 6)
    assert evaluate(detections, ground_truths, "voc07").mean_ap == pytest.approx(28 / 33)
    assert metrics.average_precision([0.5, 0.5, 1, 1], [1, 0.5, 2 / 3, 0.5], "voc2010") == pytest.approx(5 / 6)
    assert metrics.average_precision([0.5, 0.5, 1, 1], [1, 0.5, 2 / 3, 0.5], "voc07") == pytest.approx(28 / 33)


def test_equal_scores_keep_the_given_order():
    # P = 1; two detections score 0.7, one false, one true.
    # false first: recall 0, 1; precision 0, 1/2 -> AP 1/2 (both interpolations)
    # true first:  recall 1, 1; precision 1, 1/2 -> AP 1
    false_first = [dets((FAR, 0.7, 0), (A, 0.7, 0))]
    true_first = [dets((A, 0.7, 0), (FAR, 0.7, 0))]
    for method in ("voc2010", "voc07"):
        assert evaluate(false_first, [gts((A, 0))], method).mean_ap == pytest.approx(0.5)
        assert evaluate(true_first, [gts((A, 0))], method).mean_ap == pytest.approx(1.0)
    # across images the image order decides
    across = [dets((FAR, 0.7, 0)), dets((A, 0.7, 0))]
    assert evaluate(across, [gts(), gts((A, 0))], "voc2010").mean_ap == pytest.approx(0.5)


def test_difficult_objects_are_ignored():
    # image: D (difficult) and N. Detections: FP 0.95, on D 0.9, on N 0.8, duplicate on D 0.75.
    # difficult: the detections on D are neither TP nor FP and D is not a positive: P = 1,
    #   sequence FP, TP: recall 0, 1; precision 0, 1/2 -> AP 1/2
    # D not difficult: P = 2, sequence FP, TP, TP, FP: recall 0, .5, 1, 1; precision 0, .5, 2/3, .5
    #   all-point: envelope 2/3 up to recall 1 -> AP 2/3
    D, N = (0, 0, 10, 10), (30, 0, 40, 10)
    detections = [dets((FAR, 0.95, 0), (D, 0.9, 0), (N, 0.8, 0), ((0, 0, 10, 11), 0.75, 0))]
    with_difficult = evaluate(detections, [gts((D, 0, True), (N, 0))], "voc2010")
    assert with_difficult.num_positives[0] == 1
    np.testing.assert_allclose(with_difficult.recall[0], [0, 1])
    np.testing.assert_allclose(with_difficult.precision[0], [0, 0.5])
    assert with_difficult.mean_ap == pytest.approx(0.5)
    assert evaluate(detections, [gts((D, 0, False), (N, 0))], "voc2010").mean_ap == pytest.approx(2 / 3)
    # an undetected difficult object costs no recall
    assert evaluate([dets((N, 0.8, 0))], [gts((D, 0, True), (N, 0))], "voc07").mean_ap == pytest.approx(1.0)


def test_no_detections_class_without_ground_truth_and_thresholds():
    # class 0: one object, no detections -> AP 0; class 1: no objects -> NaN, left out of the mAP;
    # class 2: perfect -> AP 1. mAP = (0 + 1) / 2.
    detections = [dets((B, 0.9, 1), (A, 0.8, 2))]
    ground_truths = [gts((FAR, 0), (A, 2))]
    for method in ("voc2010", "voc07"):
        result = evaluate(detections, ground_truths, method, num_classes=3)
        assert result.average_precision[0] == 0.0
        assert math.isnan(result.average_precision[1])
        assert result.average_precision[2] == 1.0
        assert result.mean_ap == pytest.approx(0.5)
    # no detections anywhere, no ground truth anywhere
    assert evaluate([dets()], [gts((A, 0))], "voc2010").mean_ap == 0.0
    assert math.isnan(evaluate([dets((A, 0.5, 0))], [gts()], "voc2010").mean_ap)
    # IoU exactly 0.5 is a match (>=), just below is not: (0,0,10,20) vs A has IoU 100/200
    assert evaluate([dets(((0, 0, 10, 20), 0.9, 0))], [gts((A, 0))], "voc2010").mean_ap == 1.0
    assert evaluate([dets(((0, 0, 10, 20.5), 0.9, 0))], [gts((A, 0))], "voc2010").mean_ap == 0.0
    assert evaluate([dets(((0, 0, 10, 20.5), 0.9, 0))], [gts((A, 0))], "voc2010", iou_threshold=0.4).mean_ap == 1.0


def test_valid_masks_drop_padding_rows():
    detections = [{**dets((A, 0.9, 0), (FAR, 0.95, 0)), "valid": np.array([True, False])}]
    ground_truths = [{**gts((A, 0), (B, 0)), "valid": np.array([True, False])}]
    assert evaluate(detections, ground_truths, "voc2010").mean_ap == 1.0
    assert metrics.mean_average_precision(detections, ground_truths, num_classes=1) == 1.0


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="method='coco'"):
        metrics.average_precision([1.0], [1.0], "coco")
    with pytest.raises(ValueError, match="detections has 2 images but ground_truths has 1"):
        evaluate([dets(), dets()], [gts()], "voc2010")
    with pytest.raises(ValueError, match=r"num_classes=1"):
        evaluate([dets((A, 0.9, 3))], [gts((A, 0))], "voc2010")
    with pytest.raises(ValueError, match="iou_threshold=1.5"):
        evaluate([dets()], [gts()], "voc2010", iou_threshold=1.5)
    with pytest.raises(ValueError, match=r"detections\[0\] has no 'scores'"):
        evaluate([{"boxes": np.zeros((1, 4)), "classes": [0]}], [gts()], "voc2010")
