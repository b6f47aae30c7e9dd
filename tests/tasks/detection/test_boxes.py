"""Box formats and IoU against hand-computed cases and a numpy loop reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn.tasks.detection import boxes as box_ops

# Compiled once per shape: op-by-op dispatch would compile every primitive separately.
iou = jax.jit(box_ops.iou, static_argnames=("box_format",))
pairwise_iou = jax.jit(box_ops.pairwise_iou, static_argnames=("box_format",))


def reference_iou_xyxy(a, b):
    """IoU of two corner boxes, written out with Python floats."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area = lambda r: max(0.0, r[2] - r[0]) * max(0.0, r[3] - r[1])  # noqa: E731
    union = area(a) + area(b) - inter
    return inter / union if union > 0 else 0.0


def to_format(xyxy, fmt):
    """Independent numpy conversion of corner boxes into `fmt`."""
    x0, y0, x1, y1 = np.moveaxis(np.asarray(xyxy, np.float64), -1, 0)
    if fmt == "xyxy":
        return np.stack([x0, y0, x1, y1], -1)
    if fmt == "xywh":
        return np.stack([x0, y0, x1 - x0, y1 - y0], -1)
    return np.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], -1)


# (a, b, IoU worked out by hand)
HAND_CASES = [
    ((0, 0, 2, 2), (3, 3, 5, 5), 0.0),  # disjoint
    ((0, 0, 4, 4), (1, 1, 3, 3), 4 / 16),  # contained: inter 4, union 16
    ((0, 0, 2, 2), (2, 0, 4, 2), 0.0),  # touching edges: zero-width intersection
    ((0, 0, 2, 2), (2, 2, 4, 4), 0.0),  # touching corners
    ((1, 2, 5, 7), (1, 2, 5, 7), 1.0),  # identical
    ((0, 0, 2, 2), (1, 1, 3, 3), 1 / 7),  # inter 1, union 4 + 4 - 1
    ((0, 0, 3, 1), (1, 0, 2, 4), 1 / 6),  # cross: inter 1, union 3 + 4 - 1
    ((1, 1, 1, 1), (1, 1, 1, 1), 0.0),  # two zero-area boxes: union 0 -> 0, not NaN
    ((1, 1, 1, 3), (0, 0, 2, 2), 0.0),  # zero-width box inside another
    ((2, 2, 1, 1), (0, 0, 3, 3), 0.0),  # inverted (degenerate) box has area 0
]


@pytest.mark.parametrize("fmt", box_ops.BOX_FORMATS)
def test_iou_hand_cases_in_every_format(fmt):
    a = np.array([c[0] for c in HAND_CASES], np.float32)
    b = np.array([c[1] for c in HAND_CASES], np.float32)
    expected = np.array([c[2] for c in HAND_CASES], np.float32)
    if fmt != "xyxy":
        # the inverted box is only expressible in corner form
        a, b, expected = a[:-1], b[:-1], expected[:-1]
    got = iou(to_format(a, fmt), to_format(b, fmt), box_format=fmt)
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-6)
    assert np.all(np.isfinite(np.asarray(got)))


@pytest.mark.parametrize("fmt", box_ops.BOX_FORMATS)
def test_pairwise_and_elementwise_iou_match_loop_reference(fmt, rng):
    def random_boxes(n):
        corner = rng.uniform(0, 50, size=(n, 2))
        size = rng.uniform(0, 30, size=(n, 2))
        size[: n // 5] = 0.0  # some zero-area boxes
        return np.concatenate([corner, corner + size], axis=1)

    a, b = random_boxes(17), random_boxes(11)
    expected = np.array([[reference_iou_xyxy(x, y) for y in b] for x in a])
    got = pairwise_iou(to_format(a, fmt).astype(np.float32), to_format(b, fmt).astype(np.float32), box_format=fmt)
    assert got.shape == (17, 11)
    np.testing.assert_allclose(np.asarray(got), expected, atol=2e-6)
    elementwise = iou(to_format(a[:11], fmt), to_format(b, fmt), box_format=fmt)
    np.testing.assert_allclose(np.asarray(elementwise), np.diag(expected[:11]), atol=2e-6)
    # broadcasting: one box against a set
    broadcast = iou(to_format(a[:1], fmt), to_format(b, fmt), box_format=fmt)
    np.testing.assert_allclose(np.asarray(broadcast), expected[0], atol=2e-6)
    # a batch axis in front of the pairwise sets
    batched = pairwise_iou(np.stack([to_format(a, fmt)] * 2), np.stack([to_format(b, fmt)] * 2), box_format=fmt)
    assert batched.shape == (2, 17, 11)
    np.testing.assert_allclose(np.asarray(batched[1]), expected, atol=2e-6)


def test_conversions_round_trip_and_match_hand_values():
    xyxy = np.array([[1.0, 2.0, 5.0, 8.0]], np.float32)
    np.testing.assert_allclose(box_ops.convert(xyxy, "xyxy", "xywh"), [[1, 2, 4, 6]])
    np.testing.assert_allclose(box_ops.convert(xyxy, "xyxy", "cxcywh"), [[3, 5, 4, 6]])
    np.testing.assert_allclose(box_ops.convert([[1, 2, 4, 6]], "xywh", "cxcywh"), [[3, 5, 4, 6]])
    np.testing.assert_allclose(box_ops.convert([[3, 5, 4, 6]], "cxcywh", "xywh"), [[1, 2, 4, 6]])
    np.testing.assert_allclose(box_ops.convert([[3, 5, 4, 6]], "cxcywh", "xyxy"), xyxy)
    random = np.random.default_rng(1).uniform(0, 100, size=(5, 3, 4)).astype(np.float32)
    for source in box_ops.BOX_FORMATS:
        for target in box_ops.BOX_FORMATS:
            there = box_ops.convert(random, source, target)
            assert there.shape == random.shape
            np.testing.assert_allclose(box_ops.convert(there, target, source), random, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(box_ops.area([[0, 0, 2, 3], [2, 2, 1, 1]]), [6, 0])
    np.testing.assert_allclose(box_ops.area([[0, 0, 2, 3]], "xywh"), [6])


def test_empty_box_sets():
    assert pairwise_iou(np.zeros((0, 4)), np.ones((3, 4))).shape == (0, 3)
    assert pairwise_iou(np.ones((2, 4)), np.zeros((0, 4))).shape == (2, 0)
    assert iou(np.zeros((0, 4)), np.zeros((0, 4))).shape == (0,)


def test_iou_gradient_is_finite_on_degenerate_boxes():
    grad = jax.grad(lambda a: iou(a, jnp.zeros(4)).sum())(jnp.zeros(4))
    assert np.all(np.isfinite(np.asarray(grad)))


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="box_format='xxyy'"):
        box_ops.iou(np.zeros((1, 4)), np.zeros((1, 4)), box_format="xxyy")
    with pytest.raises(ValueError, match="a has shape"):
        box_ops.iou(np.zeros((1, 3)), np.zeros((1, 4)))
    with pytest.raises(ValueError, match="target='yolo'"):
        box_ops.convert(np.zeros((1, 4)), "xyxy", "yolo")
    with pytest.raises(ValueError, match="pairwise_iou needs"):
        box_ops.pairwise_iou(np.zeros(4), np.zeros((2, 4)))
