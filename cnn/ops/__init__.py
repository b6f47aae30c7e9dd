"""Convolution primitives as pure functions on NHWC arrays.

Arithmetic (`conv_output_size`, `same_padding`, `conv_transpose_output_size`, ...), `conv2d`
(padding, stride, dilation, groups), `conv1x1`, `conv_matrix` and `conv_transpose2d` (its
transpose), max/mean pooling, `max_pool_with_argmax` + `max_unpool`, receptive fields, and
Dense -> convolution conversion.
"""

from cnn.ops.arithmetic import (
    conv_output_shape,
    conv_output_size,
    conv_transpose_output_size,
    effective_kernel_size,
    pool_output_size,
    same_padding,
)
from cnn.ops.conv import conv1x1, conv2d, conv_general_dilated, conv_matrix, conv_transpose2d
from cnn.ops.fc_to_conv import dense_to_conv1x1_kernel, dense_to_conv_kernel
from cnn.ops.pooling import avg_pool2d, max_pool2d, max_pool_with_argmax, max_unpool
from cnn.ops.receptive_field import (
    LayerGeometry,
    ReceptiveField,
    empirical_receptive_field,
    receptive_field_size,
    receptive_fields,
)

__all__ = [
    "LayerGeometry",
    "ReceptiveField",
    "avg_pool2d",
    "conv1x1",
    "conv2d",
    "conv_general_dilated",
    "conv_matrix",
    "conv_output_shape",
    "conv_output_size",
    "conv_transpose2d",
    "conv_transpose_output_size",
    "dense_to_conv1x1_kernel",
    "dense_to_conv_kernel",
    "effective_kernel_size",
    "empirical_receptive_field",
    "max_pool2d",
    "max_pool_with_argmax",
    "max_unpool",
    "pool_output_size",
    "receptive_field_size",
    "receptive_fields",
    "same_padding",
]
