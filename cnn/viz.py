"""Looking inside a CNN: first-layer filters, feature maps of any layer, saliency maps.

    viz.plot_filters(viz.first_conv_kernel(variables["params"]), run_dir / "viz" / "filters.png")
    viz.plot_feature_maps(model, variables, image, "Conv_1", run_dir / "viz" / "conv1.png")
    viz.plot_saliency(model, variables, images, run_dir / "viz" / "saliency.png")

Feature maps are read with Flax's `capture_intermediates`: every submodule's output is
available under its "/"-joined path (`layer_names` lists them, e.g. "features/conv1_1",
"features/pool2" for VGG, "Conv_0", "BatchNorm_0" for simple_cnn). Saliency is the gradient of
a class score with respect to the input pixels (Simonyan, Vedaldi & Zisserman 2014), shown as
its largest absolute value over the channels.

Figures are drawn with matplotlib's Agg backend and written as PNG files (directories are
created); every `plot_*` function returns the path it wrote.
"""

from __future__ import annotations

import math
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Variables = Mapping[str, Any]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path: str | os.PathLike) -> pathlib.Path:
    plt = _pyplot()
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)
    return path


def _grid(count: int, columns: int | None = None) -> tuple[int, int]:
    columns = columns or max(1, math.ceil(math.sqrt(count)))
    return math.ceil(count / columns), columns


# ------------------------------------------------------------------------------------------------
# Filters


def first_conv_kernel(params: Mapping[str, Any]) -> np.ndarray:
    """The kernel `[kh, kw, in, out]` of the first convolution created in a parameter tree.

    Flax stores parameters in creation order, so this is the layer that reads the image.

    Raises:
      ValueError: the tree has no 4-D `kernel`.
    """
    for path, value in flax.traverse_util.flatten_dict(flax.core.unfreeze(params)).items():
        if path[-1] == "kernel" and np.ndim(value) == 4:
            return np.asarray(value)
    raise ValueError("params has no convolution kernel (a 4-D leaf named 'kernel')")


def filter_images(kernel: np.ndarray) -> np.ndarray:
    """Conv filters as displayable images: `[kh, kw, in, out] -> [out, kh, kw, 3 or 1]` in [0, 1].

    Filters reading 3 channels are shown in colour, others by their mean over the input
    channels; each filter is scaled to [0, 1] on its own (min-max) so that its pattern shows.
    """
    kernel = np.asarray(kernel, np.float32)
    if kernel.ndim != 4:
        raise ValueError(f"kernel must be [height, width, in_channels, out_channels], got shape {kernel.shape}")
    filters = np.transpose(kernel, (3, 0, 1, 2))
    if filters.shape[-1] != 3:
        filters = filters.mean(axis=-1, keepdims=True)
    low = filters.min(axis=(1, 2, 3), keepdims=True)
    high = filters.max(axis=(1, 2, 3), keepdims=True)
    return (filters - low) / np.maximum(high - low, 1e-12)


def plot_filters(kernel: np.ndarray, path: str | os.PathLike, *, max_filters: int = 64, title: str = "") -> pathlib.Path:
    """Saves a grid of the first `max_filters` filters of a conv kernel `[kh, kw, in, out]`."""
    if max_filters < 1:
        raise ValueError(f"max_filters must be >= 1, got max_filters={max_filters}")
    images = filter_images(kernel)[:max_filters]
    rows, columns = _grid(len(images))
    plt = _pyplot()
    figure, axes = plt.subplots(rows, columns, figsize=(columns * 0.9, rows * 0.9 + (0.4 if title else 0.0)), squeeze=False)
    for index, axis in enumerate(axes.flat):
        axis.axis("off")
        if index < len(images):
            image = images[index]
            axis.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray", interpolation="nearest")
    figure.suptitle(title or f"first-layer filters {tuple(np.shape(kernel))}")
    return _save(figure, path)


# ------------------------------------------------------------------------------------------------
# Feature maps


def layer_outputs(
    model: nn.Module, variables: Variables, images: jnp.ndarray, **call_kwargs: Any
) -> dict[str, jnp.ndarray]:
    """Every submodule's output for `images [batch, H, W, C]`, keyed by "/"-joined module path.

    Runs `model.apply(..., train=False, capture_intermediates=True)`; only array outputs are
    kept (for a module called several times, its first call).
    """
    _, state = model.apply(
        dict(variables), jnp.asarray(images, jnp.float32), train=False, capture_intermediates=True,
        mutable=["intermediates"], **call_kwargs,
    )
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(state["intermediates"]))
    outputs = {}
    for path, value in flat.items():
        if path[-1] != "__call__" or not isinstance(value, tuple) or not value:
            continue
        name = "/".join(path[:-1]) or "output"
        if isinstance(value[0], jax.Array):
            outputs[name] = value[0]
    return outputs


def layer_names(model: nn.Module, variables: Variables, input_shape: Sequence[int]) -> list[str]:
    """The layers `plot_feature_maps` can show, in forward order, for inputs `(height, width,
    channels)` (traced abstractly, nothing is computed)."""
    names: list[str] = []

    def outputs_in_order(x):
        outputs = layer_outputs(model, variables, x)
        names.extend(outputs)  # a returned dict would come back with sorted keys
        return [outputs[name] for name in outputs]

    shapes = jax.eval_shape(outputs_in_order, jax.ShapeDtypeStruct((1, *input_shape), jnp.float32))
    return [name for name, shape in zip(names, shapes) if len(shape.shape) == 4]


def plot_feature_maps(
    model: nn.Module,
    variables: Variables,
    image: np.ndarray,
    layer: str,
    path: str | os.PathLike,
    *,
    max_maps: int = 32,
) -> pathlib.Path:
    """Saves the maps of `layer` for one image `[H, W, C]` as a grid (first `max_maps` channels).

    Raises:
      ValueError: `layer` is not a layer with 4-D output (the message lists the valid ones).
    """
    image = np.asarray(image, np.float32)
    if image.ndim != 3:
        raise ValueError(f"image must be [height, width, channels], got shape {image.shape}")
    outputs = layer_outputs(model, variables, image[None])
    valid = [name for name, value in outputs.items() if value.ndim == 4]
    if layer not in valid:
        raise ValueError(f"layer={layer!r} is not a layer with feature maps; valid: {valid}")
    maps = np.asarray(outputs[layer][0])[..., :max_maps]
    rows, columns = _grid(maps.shape[-1] + 1)
    plt = _pyplot()
    figure, axes = plt.subplots(rows, columns, figsize=(columns * 1.2, rows * 1.2 + 0.4), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    axes.flat[0].imshow(np.clip(image[..., 0] if image.shape[-1] != 3 else image, 0, 1), cmap="gray")
    axes.flat[0].set_title("input", fontsize=7)
    for channel in range(maps.shape[-1]):
        axes.flat[channel + 1].imshow(maps[..., channel], cmap="viridis", interpolation="nearest")
        axes.flat[channel + 1].set_title(str(channel), fontsize=6)
    figure.suptitle(f"{layer}: {tuple(outputs[layer].shape[1:])}")
    return _save(figure, path)


# ------------------------------------------------------------------------------------------------
# Saliency


def saliency(
    model: nn.Module, variables: Variables, images: jnp.ndarray, labels: jnp.ndarray | None = None
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Input-gradient saliency: `max_c |d score_label / d x[h, w, c]|`.

    Args:
      model, variables: a classifier (`apply(variables, x, train=False) -> [batch, classes]`).
      images: `[batch, H, W, C]`.
      labels: `[batch]` classes whose score (logit) is differentiated; default the predicted ones.

    Returns:
      `(saliency [batch, H, W], labels [batch])`.
    """
    images = jnp.asarray(images, jnp.float32)
    if images.ndim != 4:
        raise ValueError(f"images must be [batch, height, width, channels], got shape {images.shape}")

    def scores(x):
        return model.apply(dict(variables), x, train=False)

    if labels is None:
        labels = jnp.argmax(scores(images), axis=-1)
    labels = jnp.asarray(labels, jnp.int32)

    def chosen_scores(x):
        # Each image's score depends only on that image (inference mode), so the gradient of the
        # sum is every image's own input gradient.
        return jnp.sum(jnp.take_along_axis(scores(x), labels[:, None], axis=-1))

    gradient = jax.grad(chosen_scores)(images)
    return jnp.max(jnp.abs(gradient), axis=-1), labels


def plot_saliency(
    model: nn.Module,
    variables: Variables,
    images: np.ndarray,
    path: str | os.PathLike,
    *,
    labels: np.ndarray | None = None,
    class_names: Sequence[str] | None = None,
) -> pathlib.Path:
    """Saves each image `[batch, H, W, C]` (values in [0, 1]) above its saliency map."""
    images = np.asarray(images, np.float32)
    maps, labels = saliency(model, variables, images, labels)
    maps, labels = np.asarray(maps), np.asarray(labels)
    plt = _pyplot()
    count = len(images)
    figure, axes = plt.subplots(2, count, figsize=(1.6 * count, 3.4), squeeze=False)
    for index in range(count):
        image = images[index]
        axes[0, index].imshow(np.clip(image[..., 0] if image.shape[-1] != 3 else image, 0, 1), cmap="gray")
        name = class_names[labels[index]] if class_names is not None else str(labels[index])
        axes[0, index].set_title(name, fontsize=8)
        axes[1, index].imshow(maps[index], cmap="hot")
        for row in range(2):
            axes[row, index].axis("off")
    figure.suptitle("saliency: |d score / d input|")
    return _save(figure, path)


__all__ = [
    "filter_images",
    "first_conv_kernel",
    "layer_names",
    "layer_outputs",
    "plot_feature_maps",
    "plot_filters",
    "plot_saliency",
    "saliency",
]
