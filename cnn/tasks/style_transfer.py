"""Neural style transfer (Gatys, Ecker & Bethge 2016): optimize an image's pixels to match the
content features of one image and the feature statistics (Gram matrices) of another.

For a VGG trunk, let `F_l(x)` be the `[H_l, W_l, N_l]` map of layer `l` for image `x`, seen as a
matrix `[M_l = H_l W_l, N_l]`. Then

    Gram matrix    G_l(x) = F_l(x)^T F_l(x) / M_l                                   [N_l, N_l]
    content loss   L_c(x) = mean((F_c(x) - F_c(p))^2)       on one layer c (relu4_2)
    style loss     L_s(x) = sum_l w_l mean((G_l(x) - G_l(a))^2)   over several layers
    total          L(x)   = L_c(x) + alpha * L_s(x) + tv_weight * TV(x)

with `p` the content image, `a` the style image and `TV` the mean squared difference of
neighbouring pixels. The layers are the paper's: content "conv4_2", style "conv1_1" ...
"conv5_1" with `w_l = 1/5`, which in the paper's Caffe VGG (in-place ReLU) and in Gatys' own code
are the rectified maps -- `relu4_2` and `relu1_1 ... relu5_1` here (`cnn.models.vgg`); average
pooling as in the paper.

Relation to the paper's loss `alpha_p L_content + beta_p L_style`, with `L_content = 1/2
sum (F - P)^2` and `L_style = sum_l w_l E_l`, `E_l = sum (G^p - A^p)^2 / (4 N_l^2 M_l^2)` over
unnormalized Grams `G^p = F^T F = M_l G_l` (a style image of another size enters with its Gram
per position, `A_l`, i.e. `A^p = M_l A_l`):

    mean((G_l - A_l)^2) = sum (G^p - A^p)^2 / (M_l^2 N_l^2) = 4 E_l,   so  L_s = 4 L_style,
    L_c = sum (F - P)^2 / (N_c M_c) = 2 L_content / (N_c M_c),

and `L = (2 / (N_c M_c)) (L_content + 2 N_c M_c alpha L_style)`: the code's `alpha` is the
paper's `beta_p / alpha_p` divided by `2 N_c M_c` (the number of entries of the content map,
twice), so it depends on the image size. `StyleObjective.create(..., content_style_ratio=r)`
sets `alpha = 1 / (2 N_c M_c r)` (`alpha_for_content_style_ratio`): then `L` is the paper's
loss with `alpha_p / beta_p = r` up to the constant factor `2 / (N_c M_c r)` (same minimizer;
Adam and the L-BFGS search direction do not see the factor), so the paper's ratios 1e-3 and 1e-4
mean what they mean there.

The paper also normalizes the VGG weights "by scaling the weights such that the mean activation
of each convolutional filter over images and positions is equal to one";
`rescale_to_unit_mean_activation(extractor, images)` does that (each filter divided by its mean
rectified activation, the next layer compensating). ReLU and pooling are positively
homogeneous, so every map is rescaled per channel: the relative weight of channels and layers
in the losses changes, not what the network computes.

The pixels (RGB in [0, 1], normalized with the feature extractor's mean/std inside the loss)
are optimized with Optax: Adam, or L-BFGS (`optax.lbfgs`, zoom line search) as in the paper.

The feature extractor is any VGG trunk of the zoo (`cnn.models.vgg.VGGFeatures`, depth 11 to
19, with average pooling by default). Weights: a torchvision-layout VGG file converted by
`cnn.models.convert` (e.g. `vgg19.npz` saved from `torchvision.models.vgg19(weights=...)`), a
VGG run of the project's training engine, or random weights. Results look like the paper's only
with ImageNet-pretrained weights; `FeatureExtractor.pretrained` says which case applies and the
experiment prints it.

Example images ship with scikit-image (`example_image("chelsea")`), so everything runs offline.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import flax
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from cnn.models import convert
from cnn.models.vgg import VGGFeatures, vgg_layer_names

# The paper's layers: Caffe's "conv4_2" etc. hold the rectified maps (in-place ReLU).
CONTENT_LAYER = "relu4_2"
STYLE_LAYERS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision's normalization of its pretrained VGGs
IMAGENET_STD = (0.229, 0.224, 0.225)
OPTIMIZERS = ("adam", "lbfgs")
INITS = ("content", "noise", "style")
# RGB photographs bundled inside scikit-image's package (no download needed).
EXAMPLE_IMAGES = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field", "retina")

NOT_PRETRAINED_WARNING = (
    "NOTE: the VGG feature extractor does not have ImageNet-pretrained weights ({source}). Style "
    "transfer runs and its losses decrease, but the result will not look like Gatys et al.'s: that "
    "needs pretrained VGG features. Convert torchvision's VGG16/19 weights to .npz (see "
    "cnn.models.convert) and pass the file as the weights."
)


# ------------------------------------------------------------------------------------------------
# Images


def example_image(name: str, size: int | None = 256) -> np.ndarray:
    """An RGB photograph bundled with scikit-image, as float32 `[H, W, 3]` in [0, 1].

    Args:
      name: one of `EXAMPLE_IMAGES` (e.g. "chelsea", "astronaut", "coffee", "hubble_deep_field").
      size: resize so the shorter side is `size` pixels (anti-aliased); None keeps the original.

    Raises:
      ValueError: an unknown `name` or `size < 8`.
    """
    if name not in EXAMPLE_IMAGES:
        raise ValueError(f"name={name!r} is not a bundled example image; valid: {list(EXAMPLE_IMAGES)}")
    import skimage.data

    image = np.asarray(getattr(skimage.data, name)(), np.float32) / 255.0
    return image if size is None else resize_image(image, size)


def resize_image(image: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resizes `[H, W, C]` so the shorter side is `size` (an int), or to exactly `(height, width)`."""
    from skimage.transform import resize

    image = np.asarray(image, np.float32)
    if isinstance(size, int):
        if size < 8:
            raise ValueError(f"size={size} must be at least 8 pixels")
        scale = size / min(image.shape[:2])
        shape = (max(8, round(image.shape[0] * scale)), max(8, round(image.shape[1] * scale)))
    else:
        shape = (int(size[0]), int(size[1]))
    return resize(image, shape + image.shape[2:], anti_aliasing=True, preserve_range=True).astype(np.float32)


def save_image(image: np.ndarray, path: str | os.PathLike) -> pathlib.Path:
    """Writes `[H, W, 3]` floats in [0, 1] (clipped) as an 8-bit PNG; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    plt.imsave(path, np.clip(np.asarray(image, np.float32), 0.0, 1.0))
    return path


# ------------------------------------------------------------------------------------------------
# Feature extractor


@flax.struct.dataclass
class FeatureExtractor:
    """A VGG trunk with weights and input normalization.

    Attributes:
      module: the `VGGFeatures` module (depth, BN, pooling).
      variables: `{"params": ..., ["batch_stats": ...]}` of the trunk.
      mean, std: per-channel normalization of [0, 1] RGB inputs.
      pretrained: True for ImageNet-pretrained weights (a converted torchvision file).
      source: where the weights came from, for messages.
    """

    module: VGGFeatures = flax.struct.field(pytree_node=False)
    variables: Mapping[str, Any]
    mean: tuple[float, ...] = flax.struct.field(pytree_node=False, default=IMAGENET_MEAN)
    std: tuple[float, ...] = flax.struct.field(pytree_node=False, default=IMAGENET_STD)
    pretrained: bool = flax.struct.field(pytree_node=False, default=False)
    source: str = flax.struct.field(pytree_node=False, default="random initialization")

    def __call__(self, images: jnp.ndarray, layers: Sequence[str]) -> dict[str, jnp.ndarray]:
        """Maps of `layers` for RGB `images [batch, H, W, 3]` in [0, 1]: `{name: [batch, h, w, c]}`."""
        normalized = (images - jnp.asarray(self.mean, images.dtype)) / jnp.asarray(self.std, images.dtype)
        return self.module.apply(self.variables, normalized, train=False, outputs=tuple(layers))

    @property
    def warning(self) -> str | None:
        """The message to show when the weights are not pretrained (None when they are)."""
        return None if self.pretrained else NOT_PRETRAINED_WARNING.format(source=self.source)


@functools.partial(jax.jit, static_argnums=0)
def _init_trunk(module: VGGFeatures, key: jax.Array) -> dict[str, Any]:
    # Jitted per (hashable) module: one compilation per architecture and process.
    return module.init(key, jnp.zeros((1, 32, 32, 3)), train=False)


def _rgb_first_layer(params: dict[str, Any]) -> dict[str, Any]:
    """A trunk trained on grayscale (1 input channel) reading RGB: conv1_1's kernel repeated / 3,
    so that a gray image gives the same features as before."""
    kernel = np.asarray(params["conv1_1"]["kernel"])
    if kernel.shape[2] == 1:
        params = dict(params)
        params["conv1_1"] = dict(params["conv1_1"], kernel=np.repeat(kernel, 3, axis=2) / 3.0)
    return params


def vgg_extractor(
    weights: str | os.PathLike | None = None,
    *,
    depth: int = 19,
    batch_norm: bool = False,
    pooling: str = "avg",
    seed: int = 0,
) -> FeatureExtractor:
    """A VGG feature extractor from a torchvision file, a project run, or random weights.

    Args:
      weights: None or "random" (random init); a `.npz` / `.pt` torchvision-layout state dict of
        `vgg{depth}[_bn]` (ImageNet-pretrained; only the `features.*` keys are used); or
        "run:<run_dir>" for the latest checkpoint of a `cnn.train` run of a VGG model (the
        project's own trained trunk; a grayscale first layer is extended to RGB).
      depth: 11, 13, 16 or 19 (for a run, read from its config).
      batch_norm: the `_bn` variant (for a run, read from its config).
      pooling: "avg" (the paper's choice for synthesis) or "max".
      seed: the random initialization's seed.

    Raises:
      FileNotFoundError: the weights file or run does not exist.
      ValueError: an invalid depth/pooling, or a file/run that is not a VGG.
    """
    if weights is None or str(weights) == "random":
        module = VGGFeatures(depth=depth, batch_norm=batch_norm, pooling=pooling)
        variables = _init_trunk(module, jax.random.key(seed))
        return FeatureExtractor(module, flax.core.unfreeze(variables), source=f"random initialization, seed {seed}")
    weights = str(weights)
    if weights.startswith("run:"):
        from cnn.tasks.transfer import load_run_variables

        run_dir = weights[len("run:"):]
        variables, config = load_run_variables(run_dir)
        model_name = str(config.get("model", "")).lower()
        options = dict(config.get("model_options") or {})
        if model_name == "transfer":
            model_name = str(options.get("base", "")).lower()
        if not model_name.startswith("vgg") or "features" not in variables["params"]:
            raise ValueError(f"weights={weights!r}: the run trained model {model_name!r}, not a VGG")
        if model_name != "vgg":
            depth = int(model_name[3:5])
            batch_norm = model_name.endswith("_bn")
        else:
            depth, batch_norm = int(options.get("depth", 16)), bool(options.get("batch_norm", False))
        trunk = {"params": _rgb_first_layer(variables["params"]["features"])}
        if "batch_stats" in variables and "features" in variables["batch_stats"]:
            trunk["batch_stats"] = variables["batch_stats"]["features"]
        module = VGGFeatures(depth=depth, batch_norm=batch_norm, pooling=pooling)
        # The engine feeds images in [0, 1] without normalization (cnn.train.steps.prepare_images).
        return FeatureExtractor(
            module, jax.tree_util.tree_map(jnp.asarray, trunk), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
            pretrained=False, source=f"trained by the project in {run_dir}",
        )
    state = convert.load_state_dict(weights)
    name = f"vgg{depth}{'_bn' if batch_norm else ''}"
    features_only = {k: v for k, v in state.items() if k.startswith("features.")}
    if not features_only:
        raise ValueError(f"weights={weights!r} has no 'features.*' keys; is it a torchvision VGG state dict?")
    # from_torchvision needs the classifier keys too; give it zero placeholders of the right shape.
    variables = convert.from_torchvision(name, {**_placeholder_classifier(), **features_only}, strict=False)
    trunk = {"params": variables["params"]["features"]}
    if "batch_stats" in variables:
        trunk["batch_stats"] = variables["batch_stats"]["features"]
    module = VGGFeatures(depth=depth, batch_norm=batch_norm, pooling=pooling)
    return FeatureExtractor(module, trunk, pretrained=True, source=f"torchvision-layout file {weights}")


def _placeholder_classifier(width: int = 1, classes: int = 1) -> dict[str, np.ndarray]:
    return {
        "classifier.0.weight": np.zeros((width, 512 * 7 * 7), np.float32),
        "classifier.0.bias": np.zeros((width,), np.float32),
        "classifier.3.weight": np.zeros((width, width), np.float32),
        "classifier.3.bias": np.zeros((width,), np.float32),
        "classifier.6.weight": np.zeros((classes, width), np.float32),
        "classifier.6.bias": np.zeros((classes,), np.float32),
    }


def rescale_to_unit_mean_activation(extractor: FeatureExtractor, images: np.ndarray) -> FeatureExtractor:
    """The paper's normalization of VGG: each conv filter scaled so that its mean rectified
    activation over `images` and positions is 1, without changing what the network computes.

    With `m_l` the per-channel mean of `relu{l}` over the image set (one forward pass), filter
    `c` of layer `l` is divided by `m_l[c]` (kernel and bias; with BatchNorm, BN's scale and
    bias) and the next layer's weights on its input channel `c` are multiplied by `m_l[c]`.
    ReLU and pooling commute with positive per-channel scales, so every map becomes the original
    one divided by its channel's mean ("such re-scaling can be done for the VGG network without
    changing its output", Gatys et al.). Filters with mean 0 (never active) stay.

    Args:
      extractor: the feature extractor to rescale (its variables are not modified).
      images: `[batch, H, W, 3]` RGB in [0, 1] (all of one size), the image set.

    Returns:
      A `FeatureExtractor` with the rescaled variables (same module and normalization).
    """
    images = jnp.asarray(images, jnp.float32)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be [batch, height, width, 3], got shape {tuple(images.shape)}")
    module = extractor.module
    layers = tuple(name for name in vgg_layer_names(module.depth) if name.startswith("relu"))
    maps = _features(extractor, images, layers)
    variables = jax.tree_util.tree_map(lambda a: np.array(a, np.float64), flax.core.unfreeze(extractor.variables))
    params = variables["params"]
    previous = None  # the means the current layer's input channels were divided by
    for name in layers:
        mean = np.asarray(maps[name], np.float64).mean(axis=(0, 1, 2))
        divisor = np.where(mean > 0, mean, 1.0)
        suffix = name[len("relu"):]
        conv = params[f"conv{suffix}"]
        if previous is not None:  # undo the previous layer's scaling on this layer's inputs
            conv["kernel"] = conv["kernel"] * previous[None, None, :, None]
        output = params[f"bn{suffix}"] if module.batch_norm else conv
        for key in ("scale", "bias") if module.batch_norm else ("kernel", "bias"):
            output[key] = output[key] / divisor
        previous = divisor
    variables = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), variables)
    return dataclasses.replace(
        extractor, variables=variables,
        source=f"{extractor.source}, rescaled to mean activation 1 per filter over {images.shape[0]} images",
    )


# ------------------------------------------------------------------------------------------------
# Losses


def alpha_for_content_style_ratio(ratio: float, content_map_shape: Sequence[int]) -> float:
    """The code's `alpha` equivalent to the paper's `alpha_p / beta_p = ratio` (module docstring):
    `1 / (2 N_c M_c ratio)`, `N_c M_c` the number of entries of one image's content map
    (`content_map_shape` `[H, W, N]` or `[1, H, W, N]`)."""
    if not ratio > 0:
        raise ValueError(f"ratio={ratio!r}: the paper's alpha/beta must be > 0 (e.g. 1e-3 or 1e-4)")
    shape = tuple(int(d) for d in content_map_shape)
    if len(shape) == 4 and shape[0] == 1:
        shape = shape[1:]
    if len(shape) != 3:
        raise ValueError(f"content_map_shape={shape}: expected [height, width, channels]")
    return 1.0 / (2.0 * float(np.prod(shape)) * ratio)


def gram_matrix(features: jnp.ndarray) -> jnp.ndarray:
    """`[batch, H, W, C] -> [batch, C, C]`: `F^T F / (H W)` with `F` the `[H W, C]` map of each image."""
    if features.ndim != 4:
        raise ValueError(f"features must be [batch, height, width, channels], got shape {features.shape}")
    _, height, width, _ = features.shape
    return jnp.einsum("bhwc,bhwd->bcd", features, features) / (height * width)


def content_loss(features: jnp.ndarray, target: jnp.ndarray) -> jnp.ndarray:
    """`mean((F_x - F_c)^2)` over all entries (0 when the image is the content image)."""
    return jnp.mean(jnp.square(features - target))


def style_loss(
    grams: Mapping[str, jnp.ndarray], targets: Mapping[str, jnp.ndarray], weights: Mapping[str, float]
) -> jnp.ndarray:
    """`sum_l w_l mean((G_l(x) - G_l(a))^2)` over the style layers."""
    return sum(weights[name] * jnp.mean(jnp.square(grams[name] - targets[name])) for name in weights)


def total_variation(images: jnp.ndarray) -> jnp.ndarray:
    """Mean squared difference of vertically and horizontally neighbouring pixels of `[b, H, W, C]`."""
    return jnp.mean(jnp.square(images[:, 1:] - images[:, :-1])) + jnp.mean(jnp.square(images[:, :, 1:] - images[:, :, :-1]))


@flax.struct.dataclass
class StyleObjective:
    """The loss of Gatys et al. for one content image and one style image.

    Build with `StyleObjective.create`; call `loss(image)` / `terms(image)` on `[H, W, 3]` pixels.
    A pytree (weights, targets, alpha and tv_weight are leaves; the layer choice is static).
    """

    extractor: FeatureExtractor
    image_shape: tuple[int, int, int] = flax.struct.field(pytree_node=False)
    content_layer: str = flax.struct.field(pytree_node=False)
    style_layer_weights: tuple[tuple[str, float], ...] = flax.struct.field(pytree_node=False)
    alpha: jnp.ndarray
    tv_weight: jnp.ndarray
    content_target: jnp.ndarray
    style_targets: Mapping[str, jnp.ndarray]

    @property
    def style_weights(self) -> dict[str, float]:
        """`{layer: w_l}`."""
        return dict(self.style_layer_weights)

    @classmethod
    def create(
        cls,
        extractor: FeatureExtractor,
        content_image: np.ndarray,
        style_image: np.ndarray,
        *,
        content_layer: str = CONTENT_LAYER,
        style_layers: Sequence[str] = STYLE_LAYERS,
        style_layer_weights: Sequence[float] | None = None,
        alpha: float | None = None,
        content_style_ratio: float | None = None,
        tv_weight: float = 0.0,
    ) -> StyleObjective:
        """Computes the content features and the style Grams once.

        Args:
          extractor: the VGG feature extractor.
          content_image, style_image: `[H, W, 3]` in [0, 1] (sizes may differ).
          content_layer: the layer whose maps the result must match (the paper's conv4_2:
            `relu4_2`).
          style_layers: the layers whose Grams it must match (the paper's conv1_1 ... conv5_1:
            `relu1_1 ... relu5_1`).
          style_layer_weights: `w_l`, default `1 / len(style_layers)` each.
          alpha: weight of the style loss relative to the content loss in this module's
            normalization (default 1e3 when `content_style_ratio` is not given either).
          content_style_ratio: the paper's `alpha / beta` (1e-3 or 1e-4 there); sets
            `alpha = alpha_for_content_style_ratio(ratio, content map shape)`. Give `alpha` or
            this, not both.
          tv_weight: weight of the total-variation smoothness term (0 disables it).

        Raises:
          ValueError: unknown layer names, mismatched weights, negative weights, non-RGB images,
            both `alpha` and `content_style_ratio`.
        """
        if alpha is not None and content_style_ratio is not None:
            raise ValueError(
                f"alpha={alpha!r} and content_style_ratio={content_style_ratio!r}: give one (the ratio sets alpha)"
            )
        valid = vgg_layer_names(extractor.module.depth)
        unknown = sorted({content_layer, *style_layers} - set(valid))
        if unknown:
            raise ValueError(f"layers {unknown} are not layers of vgg{extractor.module.depth}; valid: {valid}")
        if not style_layers:
            raise ValueError("style_layers must name at least one layer")
        if style_layer_weights is None:
            style_layer_weights = [1.0 / len(style_layers)] * len(style_layers)
        if len(style_layer_weights) != len(style_layers):
            raise ValueError(
                f"style_layer_weights has {len(style_layer_weights)} entries for {len(style_layers)} style_layers"
            )
        if (alpha is not None and alpha < 0) or tv_weight < 0:
            raise ValueError(f"alpha={alpha} and tv_weight={tv_weight} must be >= 0")
        for argument, image in (("content_image", content_image), ("style_image", style_image)):
            if np.ndim(image) != 3 or np.shape(image)[-1] != 3:
                raise ValueError(f"{argument} must be an RGB image [height, width, 3], got shape {np.shape(image)}")
        content = _features(extractor, jnp.asarray(content_image, jnp.float32)[None], (content_layer,))[content_layer]
        style_maps = _features(extractor, jnp.asarray(style_image, jnp.float32)[None], tuple(style_layers))
        if content_style_ratio is not None:
            alpha = alpha_for_content_style_ratio(content_style_ratio, content.shape)
        elif alpha is None:
            alpha = 1e3
        return cls(
            extractor=extractor,
            image_shape=tuple(int(d) for d in np.shape(content_image)),
            content_layer=content_layer,
            style_layer_weights=tuple(zip(style_layers, (float(w) for w in style_layer_weights))),
            alpha=jnp.asarray(alpha, jnp.float32),
            tv_weight=jnp.asarray(tv_weight, jnp.float32),
            content_target=content,
            style_targets={name: gram_matrix(style_maps[name]) for name in style_layers},
        )

    def terms(self, image: jnp.ndarray) -> dict[str, jnp.ndarray]:
        """`{"content", "style", "tv", "total"}` for pixels `[H, W, 3]` (total = content + alpha style + tv_weight tv)."""
        images = image[None]
        maps = self.extractor(images, [self.content_layer, *self.style_weights])
        content = content_loss(maps[self.content_layer], self.content_target)
        style = style_loss({n: gram_matrix(maps[n]) for n in self.style_weights}, self.style_targets, self.style_weights)
        tv = total_variation(images)
        return {"content": content, "style": style, "tv": tv, "total": content + self.alpha * style + self.tv_weight * tv}

    def loss(self, image: jnp.ndarray) -> jnp.ndarray:
        """The total loss (a scalar) of pixels `[H, W, 3]`."""
        return self.terms(image)["total"]


# ------------------------------------------------------------------------------------------------
# Optimization


@dataclasses.dataclass(frozen=True)
class StyleResult:
    """What `stylize` returns.

    Attributes:
      image: the optimized pixels `[H, W, 3]`, clipped to [0, 1].
      history: `{"content", "style", "tv", "total"}`, each `[steps + 1]`: the terms before the
        first step and after every step.
    """

    image: np.ndarray
    history: dict[str, np.ndarray]


@jax.jit
def _terms(objective: StyleObjective, image: jnp.ndarray) -> dict[str, jnp.ndarray]:
    return objective.terms(image)


def initial_image(content_image: np.ndarray, style_image: np.ndarray, init: str, *, seed: int = 0) -> np.ndarray:
    """The starting pixels: the content image, white noise in [0, 1] (the paper), or the style
    image resized to the content image's size."""
    if init == "content":
        return np.asarray(content_image, np.float32)
    if init == "noise":
        return np.random.default_rng(seed).uniform(0.0, 1.0, np.shape(content_image)).astype(np.float32)
    if init == "style":
        return resize_image(style_image, tuple(np.shape(content_image)[:2]))
    raise ValueError(f"init={init!r} is not one of {list(INITS)}")


@functools.partial(jax.jit, static_argnums=2)
def _features(extractor: FeatureExtractor, images: jnp.ndarray, layers: tuple[str, ...]) -> dict[str, jnp.ndarray]:
    return extractor(images, layers)


def _terms_and_grad(objective: StyleObjective, image: jnp.ndarray):
    def loss_with_terms(x):
        terms = objective.terms(x)
        return terms["total"], terms

    (_, terms), grad = jax.value_and_grad(loss_with_terms, has_aux=True)(image)
    return terms, grad


@functools.lru_cache(maxsize=8)
def make_step(optimizer: str, learning_rate: float = 0.02):
    """`(tx, step)`: a jitted `step(objective, image, opt_state) -> (image, opt_state, terms)`.

    `terms` are the loss terms of the image before the step. Adam takes `learning_rate` steps in
    pixel units; L-BFGS (`optax.lbfgs`: memory 10, zoom line search) chooses its own step length.
    Cached per `(optimizer, learning_rate)`, so repeated runs reuse the compiled step.
    """
    if optimizer == "adam":
        tx = optax.adam(learning_rate)

        @jax.jit
        def step(objective, image, opt_state):
            terms, grad = _terms_and_grad(objective, image)
            updates, opt_state = tx.update(grad, opt_state, image)
            return optax.apply_updates(image, updates), opt_state, terms

        return tx, step
    if optimizer == "lbfgs":
        tx = optax.lbfgs()

        @jax.jit
        def step(objective, image, opt_state):
            # The line search has already evaluated the loss and gradient at the accepted point;
            # value_and_grad_from_state reuses them. The terms cost one extra forward pass.
            terms = objective.terms(image)
            value, grad = optax.value_and_grad_from_state(objective.loss)(image, state=opt_state)
            updates, opt_state = tx.update(grad, opt_state, image, value=value, grad=grad, value_fn=objective.loss)
            return optax.apply_updates(image, updates), opt_state, terms

        return tx, step
    raise ValueError(f"optimizer={optimizer!r} is not one of {list(OPTIMIZERS)}")


def stylize(
    objective: StyleObjective,
    initial: np.ndarray,
    *,
    optimizer: str = "lbfgs",
    steps: int = 200,
    learning_rate: float = 0.02,
    progress: bool = True,
) -> StyleResult:
    """Optimizes the pixels of `initial` (`[H, W, 3]`, [0, 1]) to minimize `objective`.

    Args:
      objective: the style-transfer loss (`StyleObjective.create`).
      initial: the starting image (`initial_image`), same size as the content image.
      optimizer: "lbfgs" (the paper) or "adam".
      steps: optimizer iterations.
      learning_rate: Adam's step size in pixel units (ignored by L-BFGS).
      progress: show a tqdm bar.

    Returns:
      A `StyleResult` with the clipped image and the loss terms at every step.

    Raises:
      ValueError: unknown optimizer, `steps < 1`, or `initial` of another shape than the content image.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got steps={steps}")
    tx, step = make_step(optimizer, float(learning_rate))
    image = jnp.asarray(initial, jnp.float32)
    if tuple(image.shape) != tuple(objective.image_shape):
        raise ValueError(
            f"initial has shape {tuple(image.shape)}; it must have the content image's shape {objective.image_shape}"
        )
    opt_state = tx.init(image)
    history: dict[str, list[float]] = {"content": [], "style": [], "tv": [], "total": []}
    bar = tqdm(range(steps), desc=f"style transfer ({optimizer})", disable=not progress, dynamic_ncols=True)
    for _ in bar:
        image, opt_state, terms = step(objective, image, opt_state)
        for key in history:
            history[key].append(float(terms[key]))
        bar.set_postfix(total=f"{history['total'][-1]:.4g}")
    final = _terms(objective, image)
    for key in history:
        history[key].append(float(final[key]))
    return StyleResult(image=np.clip(np.asarray(image), 0.0, 1.0), history={k: np.asarray(v) for k, v in history.items()})


def plot_losses(
    history: Mapping[str, np.ndarray], path: str | os.PathLike, *, alpha: float = 1.0, title: str = ""
) -> pathlib.Path:
    """Saves the loss curves (total, content, alpha x style, on a log scale) against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure, axis = plt.subplots(figsize=(6, 4))
    steps = np.arange(len(history["total"]))
    positive = lambda values: np.where(np.asarray(values) > 0, values, np.nan)  # noqa: E731  (log scale: 0 is not drawn)
    axis.semilogy(steps, positive(history["total"]), label="total")
    axis.semilogy(steps, positive(history["content"]), label="content")
    axis.semilogy(steps, positive(alpha * np.asarray(history["style"])), label=f"{alpha:g} x style")
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.set_title(title or "style transfer loss")
    axis.grid(alpha=0.3, which="both")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


__all__ = [
    "CONTENT_LAYER",
    "EXAMPLE_IMAGES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "INITS",
    "OPTIMIZERS",
    "STYLE_LAYERS",
    "FeatureExtractor",
    "StyleObjective",
    "StyleResult",
    "alpha_for_content_style_ratio",
    "content_loss",
    "example_image",
    "gram_matrix",
    "initial_image",
    "make_step",
    "plot_losses",
    "rescale_to_unit_mean_activation",
    "resize_image",
    "save_image",
    "stylize",
    "style_loss",
    "total_variation",
    "vgg_extractor",
]
