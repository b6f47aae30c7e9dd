import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from cnn import ops


def test_dilated_3x3_stack_grows_exponentially():
    sizes = [rf.size for rf in ops.receptive_fields([(3, 1, 1), (3, 1, 2), (3, 1, 4)])]
    assert sizes == [3, 7, 15]
    # Continuing the doubling: 2^(l+2) - 1.
    sizes = [rf.size for rf in ops.receptive_fields([(3, 1, 2**i) for i in range(6)])]
    assert sizes == [2 ** (i + 2) - 1 for i in range(6)]


def test_vgg16_receptive_fields_are_the_known_values():
    """VGG16 (13 3x3 convs, 5 2x2 poolings): conv5_3 sees 196 pixels, pool5 212."""
    stack = []
    for block, convs in enumerate([2, 2, 3, 3, 3]):
        stack += [(3, 1, 1, 1)] * convs + [(2, 2, 1, 0)]
    fields = ops.receptive_fields(stack)
    assert fields[-2].size == 196 and fields[-1].size == 212 and fields[-1].jump == 32


def _apply_stack(stack):
    """A linear stack with positive all-ones kernels (no dead units): 'conv' or 'pool' layers."""

    def fn(x):
        for kind, kernel, stride, dilation in stack:
            if kind == "conv":
                x = ops.conv2d(x, jnp.ones((kernel, kernel, x.shape[-1], 1)), stride=stride, dilation=dilation)
            else:
                x = ops.avg_pool2d(x, kernel, stride)
        return x

    return fn


@pytest.mark.parametrize(
    "stack",
    [
        [("conv", 3, 1, 1), ("conv", 3, 1, 2), ("conv", 3, 1, 4)],
        [("conv", 5, 2, 1), ("pool", 2, 2, 1), ("conv", 3, 1, 1)],
        [("conv", 3, 1, 2), ("conv", 3, 2, 1), ("conv", 2, 1, 3), ("pool", 3, 1, 1)],
        [("conv", 7, 2, 1), ("pool", 3, 2, 1), ("conv", 3, 1, 1), ("conv", 3, 1, 1)],
    ],
)
def test_calculator_agrees_with_gradient_measurement(stack):
    predicted = ops.receptive_field_size([(kernel, stride, dilation) for _, kernel, stride, dilation in stack])
    measured = ops.empirical_receptive_field(_apply_stack(stack), (64, 64, 1))
    assert measured == (predicted, predicted)


def test_receptive_field_start_offsets_locate_units():
    """The first unit of a stride-2, pad-1, 3x3 conv is centred on input pixel 0 (start 0.5)."""
    rf = ops.receptive_fields([(3, 2, 1, 1)])[0]
    assert (rf.size, rf.jump, rf.start) == (3, 2, 0.5)
    # 3x3/2 then 2x2/2, no padding: the first unit pools conv units centred at 1.5 and 3.5,
    # i.e. input pixels 0..4, centred at 2.5.
    rf = ops.receptive_fields([(3, 2, 1, 0), (2, 2, 1, 0)])[-1]
    assert (rf.size, rf.jump, rf.start) == (5, 4, 2.5)


def test_empirical_rejects_dead_outputs():
    with pytest.raises(ValueError, match="does not depend"):
        ops.empirical_receptive_field(lambda x: jnp.zeros_like(x), (8, 8, 1))
