"""YOLO v1 target encoding, the loss term by term, and decoding (encode -> decode is exact)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn.metrics.detection import evaluate_detections
from cnn.tasks import detection
from cnn.tasks.detection import YoloSpec

SPEC_PAPER = YoloSpec(grid_size=7, boxes_per_cell=2, num_classes=20)

# Jitted once per module: on CPU, op-by-op dispatch of these small graphs costs more than compiling.
yolo_loss = jax.jit(detection.yolo_loss, static_argnames=("spec", "lambda_coord", "lambda_noobj", "rescore"))
detect = jax.jit(detection.detect, static_argnames=(
    "spec", "image_size", "score_threshold", "iou_threshold", "max_per_class", "max_detections"))
encode_targets = jax.jit(detection.encode_targets, static_argnames=("spec", "image_size", "box_format"))
responsible_predictor = jax.jit(detection.responsible_predictor, static_argnames=("spec",))


def test_encoding_by_hand():
    # 448 px, S = 7: cells are 64 px wide
    boxes = np.array([[100, 150, 300, 250], [10, 300, 50, 340], [0, 0, 0, 0]], np.float32)
    classes = np.array([4, 11, 7])
    valid = np.array([True, True, False])
    targets = np.asarray(encode_targets(boxes, classes, valid, spec=SPEC_PAPER, image_size=(448, 448)))
    assert targets.shape == (7, 7, 25)
    # box 0: centre (200, 200) -> row 3, col 3; x = 200/64 - 3 = 0.125; w = 200/448, h = 100/448
    np.testing.assert_allclose(targets[3, 3, :5], [0.125, 0.125, 200 / 448, 100 / 448, 1.0], atol=1e-6)  # XLA:CPU divides to ~1 ulp
    assert targets[3, 3, 5:].argmax() == 4 and targets[3, 3, 5:].sum() == 1
    # box 1: centre (30, 320) -> row 5 (y = 320/64 - 5 = 0), col 0 (x = 30/64)
    np.testing.assert_allclose(targets[5, 0, :5], [30 / 64, 0.0, 40 / 448, 40 / 448, 1.0], atol=1e-6)
    assert targets[5, 0, 5:].argmax() == 11
    # every other cell is empty; the padding row (valid=False) is ignored
    occupied = targets[..., 4] > 0
    assert occupied.sum() == 2 and occupied[3, 3] and occupied[5, 0]
    assert np.all(targets[~occupied] == 0)


def test_encoding_keeps_the_largest_box_of_a_cell_and_handles_edges():
    spec = YoloSpec(grid_size=2, boxes_per_cell=1, num_classes=3)
    # both centres in cell (0, 0) of a 100x100 image; the second is larger and wins
    boxes = np.array([[10, 10, 20, 20], [5, 5, 45, 45], [90, 90, 100, 100.0]], np.float32)
    targets = np.asarray(encode_targets(boxes, np.array([0, 1, 2]), spec=spec, image_size=(100, 100)))
    np.testing.assert_allclose(targets[0, 0, :5], [0.5, 0.5, 0.4, 0.4, 1.0], rtol=1e-6)
    assert targets[0, 0, 5:].argmax() == 1
    np.testing.assert_allclose(targets[1, 1, :5], [0.9, 0.9, 0.1, 0.1, 1.0], rtol=1e-5)
    # a centre exactly on the far edge belongs to the last cell
    edge = np.asarray(encode_targets(np.array([[90, 90, 110, 110.0]]), [2], spec=spec, image_size=(100, 100)))
    np.testing.assert_allclose(edge[1, 1, :2], [1.0, 1.0])
    # no boxes at all
    empty = encode_targets(np.zeros((0, 4)), np.zeros(0, int), spec=spec, image_size=(100, 100))
    assert empty.shape == (2, 2, 8) and not np.any(np.asarray(empty))


# Widths and heights whose fraction of the 64 px image is a square of a dyadic number (1/16,
# 1/4, 9/16, 9/64), so sqrt and its square are exact in float32: decode(encode(.)) is bit-exact.
EXACT_BOXES = np.array([
    [2.0, 6.0, 18.0, 42.0],    # w 16, h 36
    [40.0, 4.0, 44.0, 13.0],   # w 4, h 9
    [23.0, 48.0, 32.0, 64.0],  # w 9, h 16 (touches the bottom edge)
    [46.0, 30.0, 62.0, 34.0],  # w 16, h 4
], np.float32)
EXACT_CLASSES = np.array([0, 2, 1, 2])


def decoded_objects(predictions, spec, image_size):
    dets = jax.tree_util.tree_map(
        np.asarray, detect(predictions, spec=spec, image_size=image_size, max_per_class=8, max_detections=8))
    keep = dets.valid
    return dets.boxes[keep], dets.classes[keep], dets.scores[keep]


def sort_rows(boxes, classes):
    order = np.lexsort((boxes[:, 1], boxes[:, 0]))
    return boxes[order], classes[order]


def test_encode_then_decode_is_exact():
    spec = YoloSpec(grid_size=4, boxes_per_cell=2, num_classes=3)
    targets = encode_targets(EXACT_BOXES, EXACT_CLASSES, spec=spec, image_size=(64, 64))
    assert int(np.asarray(targets[..., 4]).sum()) == 4  # four different cells
    perfect = detection.targets_to_predictions(targets, spec)
    boxes, classes, scores = decoded_objects(perfect, spec, (64, 64))
    got_boxes, got_classes = sort_rows(boxes, classes)
    want_boxes, want_classes = sort_rows(EXACT_BOXES, EXACT_CLASSES)
    np.testing.assert_array_equal(got_boxes, want_boxes)
    np.testing.assert_array_equal(got_classes, want_classes)
    np.testing.assert_array_equal(scores, np.ones(4))
    loss, terms = yolo_loss(perfect[None], targets[None], spec=spec)
    assert float(loss) == 0.0 and all(float(v) == 0.0 for v in terms.values())


def random_scene(rng, spec, size, count):
    """`count` boxes whose centres fall in distinct cells of the grid."""
    cells = rng.choice(spec.grid_size**2, size=count, replace=False)
    cell = size / spec.grid_size
    cx = (cells % spec.grid_size + rng.uniform(0.05, 0.95, count)) * cell
    cy = (cells // spec.grid_size + rng.uniform(0.05, 0.95, count)) * cell
    w = np.minimum(rng.uniform(4, 40, count), 2 * np.minimum(cx, size - cx))
    h = np.minimum(rng.uniform(4, 40, count), 2 * np.minimum(cy, size - cy))
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1).astype(np.float32)
    return boxes, rng.integers(0, spec.num_classes, count)


def test_perfect_predictions_on_random_scenes_decode_to_truth_and_score_map_1(rng):
    spec = YoloSpec(grid_size=5, boxes_per_cell=2, num_classes=4)
    size, max_objects = 80, 6
    boxes = np.zeros((3, max_objects, 4), np.float32)
    classes = np.zeros((3, max_objects), np.int32)
    valid = np.zeros((3, max_objects), bool)
    for i, count in enumerate([6, 1, 3]):
        boxes[i, :count], classes[i, :count] = random_scene(rng, spec, size, count)
        valid[i, :count] = True
    targets = detection.encode_batch(boxes, classes, valid, spec=spec, image_size=(size, size))
    perfect = detection.targets_to_predictions(targets, spec)
    dets = jax.tree_util.tree_map(np.asarray, jax.jit(
        lambda p: detect(p, spec=spec, image_size=(size, size), max_per_class=8, max_detections=10))(perfect))
    for i in range(3):
        got_boxes, got_classes = sort_rows(dets.boxes[i][dets.valid[i]], dets.classes[i][dets.valid[i]])
        want_boxes, want_classes = sort_rows(boxes[i][valid[i]], classes[i][valid[i]])
        np.testing.assert_allclose(got_boxes, want_boxes, atol=1e-4)
        np.testing.assert_array_equal(got_classes, want_classes)
    per_image_dets = [{"boxes": dets.boxes[i], "scores": dets.scores[i], "classes": dets.classes[i],
                       "valid": dets.valid[i]} for i in range(3)]
    per_image_gts = [{"boxes": boxes[i], "classes": classes[i], "valid": valid[i]} for i in range(3)]
    for method in ("voc07", "voc2010"):
        assert evaluate_detections(per_image_dets, per_image_gts, num_classes=4, method=method).mean_ap == 1.0
    loss, _ = yolo_loss(perfect, targets, spec=spec)
    assert float(loss) < 1e-10
    worse = perfect.at[1, 2, 3, 4].add(0.25)  # one confidence off by 0.25
    assert float(yolo_loss(worse, targets, spec=spec)[0]) > 0.01


# The one-box example worked by hand. Image 100x100, S = 2 (50 px cells), B = 2, C = 2.
# Ground truth xyxy (10, 20, 46, 84), class 1: centre (28, 52) -> row 1, col 0;
#   x = 28/50 = 0.56, y = 52/50 - 1 = 0.04, w = 0.36, h = 0.64 (sqrt: 0.6, 0.8).
# Predictor 0 of that cell: (x, y, sqrt w, sqrt h, C) = (0.5, 0.1, 0.5, 0.7, 0.8): centre
#   ((0 + 0.5)/2, (1 + 0.1)/2) = (25, 55) px, size 25 x 49 px -> xyxy (12.5, 30.5, 37.5, 79.5),
#   inside the truth: IoU = 25*49 / (36*64) = 1225/2304.
# Predictor 1: (0.9, 0.9, 0.2, 0.2, 0.3): xyxy (43, 93, 47, 97), disjoint: IoU 0.
# Class probabilities (0.2, 0.6); other confidences: cell (0,0) predictor 1: 0.4, cell (1,1)
#   predictor 0: -0.2; cell (0,1) has class probabilities (0.7, 0.7), ignored (no object).
def one_box_example(swap_predictors=False):
    spec = YoloSpec(grid_size=2, boxes_per_cell=2, num_classes=2)
    targets = encode_targets(np.array([[10, 20, 46, 84.0]]), [1], spec=spec, image_size=(100, 100))
    p = np.zeros((2, 2, 12), np.float32)
    first, second = [0.5, 0.1, 0.5, 0.7, 0.8], [0.9, 0.9, 0.2, 0.2, 0.3]
    if swap_predictors:
        first, second = second, first
    p[1, 0, :10] = first + second
    p[1, 0, 10:] = [0.2, 0.6]
    p[0, 0, 9] = 0.4
    p[1, 1, 4] = -0.2
    p[0, 1, 10:] = [0.7, 0.7]
    return spec, jnp.asarray(p)[None], targets[None]


HAND_TERMS = {
    "coord_xy": 5 * ((0.5 - 0.56) ** 2 + (0.1 - 0.04) ** 2),  # 0.036
    "coord_wh": 5 * ((0.5 - 0.6) ** 2 + (0.7 - 0.8) ** 2),  # 0.1
    "object": (0.8 - 1225 / 2304) ** 2,
    "no_object": 0.5 * (0.3**2 + 0.4**2 + 0.2**2),  # 0.145
    "classes": (0.2 - 0.0) ** 2 + (0.6 - 1.0) ** 2,  # 0.2
}


@pytest.mark.parametrize("swap", [False, True], ids=["responsible_first", "responsible_second"])
def test_each_loss_term_on_the_one_box_example(swap):
    spec, predictions, targets = one_box_example(swap)
    np.testing.assert_allclose(np.asarray(targets[0, 1, 0, :5]), [0.56, 0.04, 0.36, 0.64, 1.0], rtol=1e-6)
    index, ious = responsible_predictor(predictions, targets, spec)
    assert int(index[0, 1, 0]) == (1 if swap else 0)
    np.testing.assert_allclose(np.asarray(ious[0, 1, 0]), [0, 1225 / 2304][:: 1 if swap else -1], rtol=1e-5)
    loss, terms = yolo_loss(predictions, targets, spec=spec)
    for name, value in HAND_TERMS.items():
        np.testing.assert_allclose(float(terms[name]), value, rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(float(loss), sum(HAND_TERMS.values()), rtol=1e-5)
    # the paper's weights are parameters: lambda_coord = 1, lambda_noobj = 1, no rescoring
    _, plain = yolo_loss(predictions, targets, spec=spec, lambda_coord=1.0, lambda_noobj=1.0, rescore=False)
    np.testing.assert_allclose(float(plain["coord_xy"]), HAND_TERMS["coord_xy"] / 5, rtol=1e-5)
    np.testing.assert_allclose(float(plain["no_object"]), HAND_TERMS["no_object"] / 0.5, rtol=1e-5)
    np.testing.assert_allclose(float(plain["object"]), (0.8 - 1.0) ** 2, rtol=1e-5)


def test_loss_averages_over_the_batch_and_has_finite_gradients():
    spec, predictions, targets = one_box_example()
    perfect = detection.targets_to_predictions(targets, spec)
    batch_loss, _ = yolo_loss(jnp.concatenate([predictions, perfect]), jnp.concatenate([targets, targets]), spec=spec)
    np.testing.assert_allclose(float(batch_loss), sum(HAND_TERMS.values()) / 2, rtol=1e-5)
    grads = jax.grad(lambda p: yolo_loss(p, targets, spec=spec)[0])(predictions)
    assert np.all(np.isfinite(np.asarray(grads)))
    # d/dC of (C - IoU)^2 at the responsible predictor: 2 (0.8 - IoU) (IoU held constant)
    np.testing.assert_allclose(float(grads[0, 1, 0, 4]), 2 * (0.8 - 1225 / 2304), rtol=1e-5)


def test_nearest_predictor_is_responsible_when_no_box_overlaps():
    spec = YoloSpec(grid_size=1, boxes_per_cell=2, num_classes=1)
    targets = encode_targets(np.array([[40, 40, 60, 60.0]]), [0], spec=spec, image_size=(100, 100))
    far = [0.05, 0.05, 0.1, 0.1, 0.0]  # a 1 px box at (5, 5)
    near = [0.7, 0.7, 0.1, 0.1, 0.0]  # a 1 px box at (70, 70)
    predictions = jnp.asarray([[[far + near + [1.0]]]])
    index, ious = responsible_predictor(predictions, targets[None], spec)
    assert np.all(np.asarray(ious) == 0) and int(index[0, 0, 0]) == 1


def test_decoding_scores_are_class_probability_times_confidence():
    spec = YoloSpec(grid_size=1, boxes_per_cell=2, num_classes=2)
    cell = [0.5, 0.5, 0.5, 0.5, 0.9,   0.5, 0.5, 0.25, 0.25, 1.3,   0.5, -0.1]  # noqa: E241
    boxes, scores = detection.decode_predictions(jnp.asarray([[cell]]), spec=spec, image_size=(40, 80))
    np.testing.assert_allclose(np.asarray(boxes), [[30, 15, 50, 25], [37.5, 18.75, 42.5, 21.25]])
    # clipped to [0, 1]: 0.9 * 0.5, 0.9 * 0; 1.0 * 0.5, 1.0 * 0
    np.testing.assert_allclose(np.asarray(scores), [[0.45, 0.0], [0.5, 0.0]], rtol=1e-6)


def test_bad_input_names_the_argument():
    spec = YoloSpec(grid_size=2, boxes_per_cell=1, num_classes=2)
    with pytest.raises(ValueError, match="predictions has shape"):
        detection.decode_predictions(jnp.zeros((2, 2, 8)), spec=spec, image_size=(10, 10))
    with pytest.raises(ValueError, match="image_size="):
        encode_targets(np.zeros((1, 4)), [0], spec=spec, image_size=(0, 10))
    with pytest.raises(ValueError, match="classes has shape"):
        encode_targets(np.zeros((2, 4)), [0], spec=spec, image_size=(10, 10))
    with pytest.raises(ValueError, match="targets has shape"):
        yolo_loss(jnp.zeros((1, 2, 2, 7)), jnp.zeros((1, 2, 2, 6)), spec=spec)
    with pytest.raises(ValueError, match="YoloSpec.grid_size=0"):
        YoloSpec(grid_size=0)
