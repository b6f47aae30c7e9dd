"""OverFeat-style dense evaluation: a classifier with FC layers turned into a fully convolutional net.

A `Dense` layer that reads a flattened `h x w x c` map is an `h x w` convolution without
padding (`cnn.ops.dense_to_conv_kernel`); the Dense layers after it are 1x1 convolutions. With
every FC layer converted, the classifier accepts any image at least as large as its training
input and returns a map of class scores, one per window position, in one pass:

    fcn = to_fully_convolutional("lenet5", variables)            # trained LeNet-5 variables
    scores = fcn(images)                                         # [batch, H', W', classes]
    fcn.geometry.window, fcn.geometry.stride                     # 32, 4
    # scores[:, i, j] == classifier(images[:, 4i:4i+32, 4j:4j+32])

Position `(i, j)` of the map sees the input window with top-left corner
`(i * stride, j * stride)` and side `window` (the classifier's input size); `stride` is the
product of the strides before the first FC layer. The windows overlap, and the dense pass
computes the convolutions of the overlapping parts once instead of once per crop, which is why
it is much cheaper than cropping (`compare_dense_and_crops`, `benchmarks/sliding_window.py`).

Families: LeNet-5 and the lecture's LeCun ConvNet (VALID convolutions: every position equals
the classifier on its crop exactly), AlexNet and VGG (window 224, stride 32; their convolutions
are zero-padded, so a position equals its crop exactly only for a single-window input: on a
larger image the pixels around a crop replace the padding the crop would see, as in OverFeat).
The adaptive average pool of AlexNet/VGG is the identity at the classifier's 6x6 / 7x7 map and
is dropped.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import cnn.models
from cnn import ops
from cnn.models.alexnet import AlexNet, AlexNetFeatures
from cnn.models.layers import AvgPool, MaxPool
from cnn.models.lecun import _ACTIVATIONS, LeCunConvNet, LeNet5
from cnn.models.vgg import VGG, VGGFeatures

Variables = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class DenseGeometry:
    """Where each output position of a dense evaluation looks in the input.

    Attributes:
      window: side of the input window one position classifies (the classifier's input size).
      stride: input pixels between neighbouring positions.
    """

    window: int
    stride: int

    def output_size(self, size: int) -> int:
        """Number of positions along a side of `size` pixels: `floor((size - window) / stride) + 1`."""
        if size < self.window:
            raise ValueError(f"size={size} is smaller than the classifier window {self.window}")
        return (size - self.window) // self.stride + 1

    def crop_box(self, i: int, j: int) -> tuple[int, int, int, int]:
        """`(top, left, bottom, right)` (exclusive) of the window of position `(i, j)`."""
        top, left = i * self.stride, j * self.stride
        return top, left, top + self.window, left + self.window


# ------------------------------------------------------------------------------------------------
# Fully convolutional forms (parameter names as in the classifiers, FC kernels reshaped)


class ConvClassifier(nn.Module):
    """fc6 as a `k x k` VALID convolution, fc7 and fc8 as 1x1 convolutions (ReLU between).

    `[batch, h, w, c] -> [batch, h - k + 1, w - k + 1, num_classes]`.
    """

    num_classes: int
    hidden: int
    kernel_size: int

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        k = self.kernel_size
        x = nn.relu(nn.Conv(self.hidden, (k, k), padding="VALID", name="fc6")(x))
        x = nn.relu(nn.Conv(self.hidden, (1, 1), name="fc7")(x))
        return nn.Conv(self.num_classes, (1, 1), name="fc8")(x)


class VGGDense(nn.Module):
    """VGG with its classifier as convolutions: `[b, h, w, 3] -> [b, (h-224)/32+1, (w-224)/32+1, classes]`."""

    depth: int
    batch_norm: bool
    num_classes: int
    hidden: int

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x = VGGFeatures(self.depth, self.batch_norm, name="features")(x, train=False)
        return ConvClassifier(self.num_classes, self.hidden, 7, name="classifier")(x)


class AlexNetDense(nn.Module):
    """AlexNet with its classifier as convolutions: `[b, h, w, 3] -> [b, (h-224)/32+1, ..., classes]`."""

    num_classes: int
    hidden: int

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x = AlexNetFeatures(name="features")(x, train=False)
        return ConvClassifier(self.num_classes, self.hidden, 6, name="classifier")(x)


class LeNet5Dense(nn.Module):
    """LeNet-5 with f6 and the output layer as 1x1 convolutions: `[b, h, w, c] -> [b, (h-32)/4+1, ..., classes]`."""

    num_classes: int
    activation: str

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        act = _ACTIVATIONS[self.activation]
        x = AvgPool(2, 2, name="s2")(act(nn.Conv(6, (5, 5), padding="VALID", name="c1")(x)))
        x = AvgPool(2, 2, name="s4")(act(nn.Conv(16, (5, 5), padding="VALID", name="c3")(x)))
        x = act(nn.Conv(120, (5, 5), padding="VALID", name="c5")(x))
        x = act(nn.Conv(84, (1, 1), name="f6")(x))
        return nn.Conv(self.num_classes, (1, 1), name="output")(x)


class LeCunConvNetDense(nn.Module):
    """The LeCun ConvNet with fc as a 1x1 convolution: `[b, h, w, c] -> [b, (h-83)/20+1, ..., classes]`."""

    num_classes: int
    connections: str
    use_bias: bool
    activation: str
    pooling: str

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        act = _ACTIVATIONS[self.activation]
        pool = MaxPool if self.pooling == "max" else AvgPool
        x = act(nn.Conv(64, (9, 9), padding="VALID", use_bias=self.use_bias, name="conv1")(x))
        x = pool(10, 5, name="pool1")(x)
        groups = x.shape[-1] if self.connections == "sparse" else 1
        conv2 = nn.Conv(256, (9, 9), padding="VALID", feature_group_count=groups, use_bias=self.use_bias, name="conv2")
        x = act(conv2(x))
        x = pool(6, 4, name="pool2")(x)
        return nn.Conv(self.num_classes, (1, 1), use_bias=self.use_bias, name="fc")(x)


# ------------------------------------------------------------------------------------------------
# Conversion


@dataclasses.dataclass(frozen=True)
class FullyConvolutional:
    """A classifier in fully convolutional form.

    Attributes:
      name: the registered name of the classifier it was made from.
      module: the fully convolutional Flax module (`apply(variables, images)`).
      variables: its variables (the classifier's, FC kernels reshaped to conv kernels).
      geometry: window and stride of the score map.
    """

    name: str
    module: nn.Module
    variables: Variables
    geometry: DenseGeometry

    def __call__(self, images: jnp.ndarray) -> jnp.ndarray:
        """Class scores of every window: `[batch, H, W, C] -> [batch, H', W', num_classes]`.

        Raises:
          ValueError: the image is smaller than the window, or not 4-D.
        """
        if np.ndim(images) != 4:
            raise ValueError(f"images must be [batch, height, width, channels], got shape {np.shape(images)}")
        for side in np.shape(images)[1:3]:
            self.geometry.output_size(int(side))
        return _apply_dense(self.module, self.variables, jnp.asarray(images, jnp.float32))


@functools.lru_cache(maxsize=16)
def _jitted_apply(module: nn.Module) -> Callable[[Variables, jnp.ndarray], jnp.ndarray]:
    # Keyed on the (hashable) module, so repeated calls reuse one compilation per input shape.
    return jax.jit(module.apply)


def _apply_dense(module: nn.Module, variables: Variables, images: jnp.ndarray) -> jnp.ndarray:
    return _jitted_apply(module)(variables, images)


def _convert_dense(params: Mapping[str, Any], dense_inputs: Mapping[str, tuple[int, int, int]]) -> Variables:
    """Reshapes the `kernel` of every Dense layer named in `dense_inputs` (path -> the `(h, w, c)`
    map it reads) into the equivalent conv kernel; every other parameter is kept."""
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep="/")
    for path, hwc in dense_inputs.items():
        key = f"{path}/kernel"
        if key not in flat:
            raise ValueError(f"variables lack the Dense kernel {key!r}; do they belong to this model?")
        flat[key] = ops.dense_to_conv_kernel(jnp.asarray(flat[key]), hwc)
    return flax.traverse_util.unflatten_dict(flat, sep="/")


def _dense_width(params: Mapping[str, Any], path: str) -> int:
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep="/")
    key = f"{path}/kernel"
    if key not in flat:
        raise ValueError(f"variables lack the Dense kernel {key!r}; do they belong to this model?")
    return int(np.shape(flat[key])[-1])


SUPPORTED = ("lenet5", "lenet", "lecun_convnet", "alexnet", "vgg11", "vgg13", "vgg16", "vgg19",
             "vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn", "vgg")


def to_fully_convolutional(name: str, variables: Mapping[str, Any], **options: Any) -> FullyConvolutional:
    """The fully convolutional form of a trained classifier of the zoo.

    Args:
      name: registered model name: "lenet5", "lecun_convnet", "alexnet" or a VGG ("vgg16", ...).
      variables: the classifier's `{"params": ..., "batch_stats": ...}`.
      options: the classifier's model options (e.g. `activation` for LeNet-5, `depth` for "vgg");
        the number of classes and the classifier width are read from `variables`.

    Returns:
      A `FullyConvolutional` whose score map at `(i, j)` is the classifier on the window at
      `(i * stride, j * stride)`.

    Raises:
      ValueError: a model family without FC layers to convert, or variables of another model.
    """
    options = {k: v for k, v in options.items() if k not in ("num_classes", "classifier_width")}
    if name.lower() not in SUPPORTED:
        raise ValueError(f"name={name!r} has no fully convolutional form here; supported: {list(SUPPORTED)}")
    model = cnn.models.create(name, **options)
    params = variables["params"]
    collections = {k: v for k, v in variables.items() if k != "params"}
    if isinstance(model, LeNet5):
        module = LeNet5Dense(num_classes=_dense_width(params, "output"), activation=model.activation)
        converted = _convert_dense(params, {"f6": (1, 1, 120), "output": (1, 1, 84)})
        geometry = DenseGeometry(window=32, stride=4)  # s2 and s4 halve; c1, c3, c5 are VALID 5x5
    elif isinstance(model, LeCunConvNet):
        module = LeCunConvNetDense(
            num_classes=_dense_width(params, "fc"), connections=model.connections, use_bias=model.use_bias,
            activation=model.activation, pooling=model.pooling,
        )
        converted = _convert_dense(params, {"fc": (1, 1, 256)})
        geometry = DenseGeometry(window=83, stride=20)  # pool1 stride 5, pool2 stride 4
    elif isinstance(model, AlexNet):
        hidden = _dense_width(params, "classifier/fc6")
        module = AlexNetDense(num_classes=_dense_width(params, "classifier/fc8"), hidden=hidden)
        converted = _convert_dense(
            params, {"classifier/fc6": (6, 6, 256), "classifier/fc7": (1, 1, hidden), "classifier/fc8": (1, 1, hidden)}
        )
        geometry = DenseGeometry(window=224, stride=32)  # conv1 stride 4, three 3x3/2 max pools
    elif isinstance(model, VGG):
        hidden = _dense_width(params, "classifier/fc6")
        module = VGGDense(model.depth, model.batch_norm, num_classes=_dense_width(params, "classifier/fc8"), hidden=hidden)
        converted = _convert_dense(
            params, {"classifier/fc6": (7, 7, 512), "classifier/fc7": (1, 1, hidden), "classifier/fc8": (1, 1, hidden)}
        )
        geometry = DenseGeometry(window=224, stride=32)  # five 2x2/2 pools
    else:  # pragma: no cover - SUPPORTED lists exactly the families above
        raise ValueError(f"name={name!r} has no fully convolutional form")
    return FullyConvolutional(name=name, module=module, variables={"params": converted, **collections}, geometry=geometry)


# ------------------------------------------------------------------------------------------------
# The baseline: the classifier on every crop


def crop_windows(images: jnp.ndarray, geometry: DenseGeometry) -> jnp.ndarray:
    """Every window of the dense evaluation as a separate image.

    `[batch, H, W, C] -> [H' * W' * batch, window, window, C]`, position-major: row
    `(i * W' + j) * batch + b` is image `b`'s window at position `(i, j)`.
    """
    _, height, width, _ = images.shape
    rows, cols = geometry.output_size(height), geometry.output_size(width)
    w = geometry.window
    crops = [images[:, i * geometry.stride : i * geometry.stride + w, j * geometry.stride : j * geometry.stride + w]
             for i in range(rows) for j in range(cols)]
    return jnp.concatenate(crops, axis=0)


def make_crop_scores(model: nn.Module, geometry: DenseGeometry) -> Callable[[Variables, jnp.ndarray], jnp.ndarray]:
    """A jitted `(variables, images) -> [batch, H', W', classes]` that runs `model` on every crop.

    The slow way OverFeat replaces: cut all windows out of the image and classify them as a batch.
    """

    @jax.jit
    def scores(variables: Variables, images: jnp.ndarray) -> jnp.ndarray:
        batch, height, width, _ = images.shape
        rows, cols = geometry.output_size(height), geometry.output_size(width)
        logits = model.apply(variables, crop_windows(images, geometry), train=False)
        return logits.reshape(rows, cols, batch, -1).transpose(2, 0, 1, 3)

    return scores


def crop_scores(
    name: str, variables: Mapping[str, Any], images: jnp.ndarray, geometry: DenseGeometry, **options: Any
) -> jnp.ndarray:
    """The classifier `create(name, **options)` applied to every window: `[batch, H', W', classes]`."""
    num_classes = int(np.shape(_last_kernel(variables["params"], name))[-1])
    model = cnn.models.create(name, num_classes=num_classes, **_width_option(name, variables, options))
    return make_crop_scores(model, geometry)(variables, jnp.asarray(images, jnp.float32))


def _last_kernel(params: Mapping[str, Any], name: str) -> Any:
    paths = {"lenet5": "output", "lenet": "output", "lecun_convnet": "fc"}
    path = paths.get(name.lower(), "classifier/fc8")
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep="/")
    return flat[f"{path}/kernel"]


def _width_option(name: str, variables: Mapping[str, Any], options: Mapping[str, Any]) -> dict[str, Any]:
    options = {k: v for k, v in options.items() if k != "num_classes"}
    if name.lower().startswith(("vgg", "alexnet")):
        flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables["params"]), sep="/")
        options["classifier_width"] = int(np.shape(flat["classifier/fc6/kernel"])[-1])
    return options


# ------------------------------------------------------------------------------------------------
# Cost: dense evaluation vs cropping


def _timed(function: Callable, *args: Any, repeats: int) -> tuple[float, float]:
    """(FLOPs from XLA's cost analysis, median seconds) of a jitted function."""
    from cnn.tasks.transfer import compiled_flops

    compiled = function.lower(*args).compile()
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return compiled_flops(compiled), float(np.median(times))


def compare_dense_and_crops(
    name: str,
    variables: Mapping[str, Any],
    image_size: int,
    *,
    batch: int = 1,
    channels: int | None = None,
    repeats: int = 5,
    seed: int = 0,
    **options: Any,
) -> dict[str, float]:
    """Times the dense (fully convolutional) pass against classifying every crop, on random images.

    Args:
      name, variables, options: the classifier, as for `to_fully_convolutional`.
      image_size: side of the square test images (>= the window).
      batch: images per call.
      channels: input channels (default: 1 for LeNet-5 / LeCun ConvNet, 3 otherwise).
      repeats: timed calls per method (median reported).

    Returns:
      `{"positions", "dense_seconds", "crops_seconds", "speedup", "dense_flops", "crops_flops",
      "flops_ratio", "max_abs_difference"}` (speedup = crops / dense time).
    """
    fcn = to_fully_convolutional(name, variables, **options)
    if channels is None:
        channels = 1 if name.lower() in ("lenet5", "lenet", "lecun_convnet") else 3
    images = jax.random.uniform(jax.random.key(seed), (batch, image_size, image_size, channels))
    num_classes = int(np.shape(_last_kernel(variables["params"], name))[-1])
    model = cnn.models.create(name, num_classes=num_classes, **_width_option(name, variables, options))
    crops_fn = make_crop_scores(model, fcn.geometry)
    dense_fn = _jitted_apply(fcn.module)
    dense_flops, dense_seconds = _timed(dense_fn, fcn.variables, images, repeats=repeats)
    crops_flops, crops_seconds = _timed(crops_fn, dict(variables), images, repeats=repeats)
    difference = float(jnp.max(jnp.abs(dense_fn(fcn.variables, images) - crops_fn(dict(variables), images))))
    side = fcn.geometry.output_size(image_size)
    return {
        "positions": float(side * side),
        "dense_seconds": dense_seconds,
        "crops_seconds": crops_seconds,
        "speedup": crops_seconds / dense_seconds,
        "dense_flops": dense_flops,
        "crops_flops": crops_flops,
        "flops_ratio": crops_flops / dense_flops if dense_flops else float("nan"),
        "max_abs_difference": difference,
    }


__all__ = [
    "SUPPORTED",
    "AlexNetDense",
    "ConvClassifier",
    "DenseGeometry",
    "FullyConvolutional",
    "LeCunConvNetDense",
    "LeNet5Dense",
    "VGGDense",
    "compare_dense_and_crops",
    "crop_scores",
    "crop_windows",
    "make_crop_scores",
    "to_fully_convolutional",
]
