"""Convert between torchvision-layout state dicts and this package's Flax variables.

This is how pretrained ImageNet weights come in: on a machine with torch, save a torchvision
model's weights as numpy arrays,

    sd = torchvision.models.resnet50(weights="IMAGENET1K_V1").state_dict()
    numpy.savez("resnet50.npz", **{k: v.numpy() for k, v in sd.items()})

then here

    variables = convert.from_torchvision("resnet50", convert.load_state_dict("resnet50.npz"))
    logits = cnn.models.create("resnet50").apply(variables, images_nhwc, train=False)

Families: AlexNet, VGG (11/13/16/19, with and without BN), GoogLeNet (with or without aux
heads; use `transform_input=True` with torchvision's pretrained weights), ResNet 18..152. The
LeCun nets have no torchvision counterpart.

Layout rules (torch -> Flax):
- conv `weight` [out, in, kh, kw] (OIHW) -> `kernel` [kh, kw, in, out] (HWIO);
- linear `weight` [out, in] -> `kernel` [in, out];
- a linear that reads a flattened map (VGG/AlexNet fc6, GoogLeNet aux fc1): torch flattens
  NCHW in (c, h, w) order, Flax flattens NHWC in (h, w, c) order, so the input axis is
  reshaped to (c, h, w), permuted to (h, w, c) and flattened again;
- BatchNorm `weight`, `bias` -> params `scale`, `bias`; `running_mean`, `running_var` ->
  batch_stats `mean`, `var`; `num_batches_tracked` is dropped (and written as 0 on export).

Inference with converted weights matches torch (BatchNorm momentum 0.1 and eps as in
torchvision). One training-time difference remains: Flax updates `var` with the biased batch
variance, torch `running_var` with the unbiased one (a factor n/(n-1) on the update).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cnn.models.alexnet import ALEXNET_CONVS, AlexNet
from cnn.models.googlenet import GoogLeNet
from cnn.models.registry import create
from cnn.models.resnet import ResNet
from cnn.models.vgg import CONVS_PER_BLOCK, VGG

StateDict = dict[str, np.ndarray]
ModulePath = tuple[str, ...]
# torch prefix of a Flax module, and the (h, w, c) map a linear layer reads flattened (or None).
TorchName = tuple[str, "tuple[int, int, int] | None"]


# ----------------------------------------------------------------------------- family rules


def _resnet_name(path: ModulePath) -> TorchName:
    if len(path) == 1:  # conv1, bn1, fc
        return path[0], None
    stage, module, *rest = path
    if module == "shortcut":
        return f"{stage}.0.downsample.{ {'conv': 0, 'bn': 1}[rest[0]] }", None
    block = re.fullmatch(r"block(\d+)", module)
    if block is None or len(rest) != 1:
        raise KeyError(path)
    return f"{stage}.{block.group(1)}.{rest[0]}", None


def _vgg_feature_indices(depth: int, batch_norm: bool) -> dict[str, int]:
    """Index in torchvision's `features` Sequential of each conv (and BN) of a VGG trunk."""
    indices, index = {}, 0
    for block, count in enumerate(CONVS_PER_BLOCK[depth], start=1):
        for i in range(1, count + 1):
            indices[f"conv{block}_{i}"] = index
            if batch_norm:
                indices[f"bn{block}_{i}"] = index + 1
            index += 3 if batch_norm else 2  # conv, [bn,] relu
        index += 1  # max pool
    return indices


def _vgg_rule(model: VGG) -> Callable[[ModulePath], TorchName]:
    indices = _vgg_feature_indices(model.depth, model.batch_norm)
    classifier = {"fc6": ("classifier.0", (7, 7, 512)), "fc7": ("classifier.3", None), "fc8": ("classifier.6", None)}

    def rule(path: ModulePath) -> TorchName:
        part, module = path
        if part == "features":
            return f"features.{indices[module]}", None
        return classifier[module]

    return rule


def _alexnet_name(path: ModulePath) -> TorchName:
    part, module = path
    if part == "features":
        index, position = {}, 0
        for name, *_, pool in ALEXNET_CONVS:
            index[name] = position
            position += 3 if pool else 2  # conv, relu[, pool]
        return f"features.{index[module]}", None
    return {"fc6": ("classifier.1", (6, 6, 256)), "fc7": ("classifier.4", None), "fc8": ("classifier.6", None)}[module]


_GOOGLENET_BRANCHES = {
    "branch1": "branch1",
    "branch2_reduce": "branch2.0",
    "branch2_conv": "branch2.1",
    "branch3_reduce": "branch3.0",
    "branch3_conv": "branch3.1",
    "branch4_proj": "branch4.1",
}


def _googlenet_name(path: ModulePath) -> TorchName:
    if path[0].startswith("inception"):
        name, branch, layer = path
        return f"{name}.{_GOOGLENET_BRANCHES[branch]}.{layer}", None
    if path[0].startswith("aux") and path[1] == "fc1":
        return f"{path[0]}.fc1", (4, 4, 128)
    return ".".join(path), None  # conv1.conv, conv2.bn, aux1.conv.conv, aux1.fc2, fc


def _family(model: nn.Module) -> tuple[Callable[[ModulePath], TorchName], dict[str, str]]:
    """(Flax module path -> torch name rule, {size option: torch weight whose rows give it})."""
    if isinstance(model, ResNet):
        return _resnet_name, {"num_classes": "fc.weight"}
    if isinstance(model, VGG):
        return _vgg_rule(model), {"num_classes": "classifier.6.weight", "classifier_width": "classifier.0.weight"}
    if isinstance(model, AlexNet):
        return _alexnet_name, {"num_classes": "classifier.6.weight", "classifier_width": "classifier.1.weight"}
    if isinstance(model, GoogLeNet):
        return _googlenet_name, {"num_classes": "fc.weight"}
    raise ValueError(
        f"model {type(model).__name__} has no torchvision counterpart; convertible families: "
        "alexnet, vgg*, googlenet, resnet*"
    )


# ----------------------------------------------------------------------------- leaf layouts


def _linear_to_torch(kernel: np.ndarray, flattened: tuple[int, int, int] | None) -> np.ndarray:
    if flattened is None:
        return kernel.T  # a view; torch layouts need no copy here
    h, w, c = flattened
    return kernel.reshape(h, w, c, -1).transpose(3, 2, 0, 1).reshape(kernel.shape[1], c * h * w)


def _linear_from_torch(weight: np.ndarray, flattened: tuple[int, int, int] | None) -> np.ndarray:
    if flattened is None:
        return weight.T
    h, w, c = flattened
    out = weight.shape[0]
    if weight.shape[1] != c * h * w:  # shape errors are reported by the caller
        return weight.T
    return weight.reshape(out, c, h, w).transpose(2, 3, 1, 0).reshape(h * w * c, out)


def _module_paths(tree: Mapping[str, Any], prefix: ModulePath = ()) -> Iterator[tuple[ModulePath, Mapping]]:
    """Yields (path, {leaf name: array}) for every module that holds arrays directly."""
    leaves = {k: v for k, v in tree.items() if not isinstance(v, Mapping)}
    if leaves:
        yield prefix, leaves
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from _module_paths(value, prefix + (key,))


def _get(tree: Mapping[str, Any], path: ModulePath) -> Mapping[str, Any]:
    for key in path:
        tree = tree.get(key, {})
    return tree


def _set(tree: dict, path: ModulePath, name: str, value: Any) -> None:
    for key in path:
        tree = tree.setdefault(key, {})
    tree[name] = value


# ----------------------------------------------------------------------------- public API


def to_torchvision(name: str, variables: Mapping[str, Any], **options: Any) -> StateDict:
    """Flax variables of `create(name, **options)` -> torchvision-named numpy state dict.

    Args:
      name: registered model name (e.g. "resnet50", "vgg16_bn", "googlenet").
      variables: `{"params": ..., "batch_stats": ...}` as returned by `model.init`.
      options: model options that change the architecture (e.g. `depth` for "vgg"/"resnet").

    Returns:
      `{torch key: array}` with torch layouts (OIHW conv weights, [out, in] linear weights).
    """
    rule, _ = _family(create(name, **options))
    params = variables["params"]
    stats = variables.get("batch_stats", {})
    state: StateDict = {}
    for path, leaves in _module_paths(params):
        prefix, flattened = rule(path)
        if "scale" in leaves:  # BatchNorm
            module_stats = _get(stats, path)
            state[f"{prefix}.weight"] = np.asarray(leaves["scale"])
            state[f"{prefix}.bias"] = np.asarray(leaves["bias"])
            state[f"{prefix}.running_mean"] = np.asarray(module_stats["mean"])
            state[f"{prefix}.running_var"] = np.asarray(module_stats["var"])
            state[f"{prefix}.num_batches_tracked"] = np.array(0, np.int64)
            continue
        kernel = np.asarray(leaves["kernel"])
        if kernel.ndim == 4:
            state[f"{prefix}.weight"] = kernel.transpose(3, 2, 0, 1)
        else:
            state[f"{prefix}.weight"] = _linear_to_torch(kernel, flattened)
        if "bias" in leaves:
            state[f"{prefix}.bias"] = np.asarray(leaves["bias"])
    return state


def from_torchvision(
    name: str, state_dict: Mapping[str, Any], *, strict: bool = True, **options: Any
) -> dict[str, Any]:
    """torchvision-named state dict -> Flax variables `{"params": ..., "batch_stats": ...}`.

    Args:
      name: registered model name (e.g. "resnet50", "vgg16").
      state_dict: `{torch key: array-like}` (numpy arrays, or anything `np.asarray` accepts).
      strict: raise on keys the model does not use (besides `num_batches_tracked`).
      options: model options (`num_classes`, VGG/AlexNet's `classifier_width` and GoogLeNet's
        `aux_logits` are read from the state dict unless given; `param_dtype` sets the dtype of
        the returned params).

    Returns:
      Variables for `create(name, **options).apply`, jnp arrays.

    Raises:
      ValueError: the family has no torchvision counterpart, a key is missing or unexpected, or
        an array's shape does not match the model's.
    """
    probe = create(name, **options)
    _, size_keys = _family(probe)
    for option, key in size_keys.items():
        if option not in options and key in state_dict:
            options[option] = int(np.shape(state_dict[key])[0])
    if isinstance(probe, GoogLeNet) and "aux_logits" not in options:
        options["aux_logits"] = any(key.startswith("aux1.") for key in state_dict)
    model = create(name, **options)
    rule, _ = _family(model)
    template = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, *model.canonical_input_shape)), train=False)
    )
    used: set[str] = set()
    missing: list[str] = []
    variables: dict[str, Any] = {}

    def fetch(key: str, convert: Callable[[np.ndarray], np.ndarray], like: jax.ShapeDtypeStruct) -> Any:
        if key not in state_dict:
            missing.append(key)
            return None
        used.add(key)
        value = convert(np.asarray(state_dict[key]))
        if value.shape != like.shape:
            raise ValueError(
                f"state_dict[{key!r}] has shape {np.shape(state_dict[key])}, which converts to {value.shape}; "
                f"{name} expects {like.shape} there"
            )
        return jnp.asarray(value, like.dtype)

    params, stats = template["params"], template.get("batch_stats", {})
    for path, leaves in _module_paths(params):
        prefix, flattened = rule(path)
        if "scale" in leaves:
            _set(variables, ("params", *path), "scale", fetch(f"{prefix}.weight", lambda a: a, leaves["scale"]))
            _set(variables, ("params", *path), "bias", fetch(f"{prefix}.bias", lambda a: a, leaves["bias"]))
            module_stats = _get(stats, path)
            for flax_name, torch_name in (("mean", "running_mean"), ("var", "running_var")):
                value = fetch(f"{prefix}.{torch_name}", lambda a: a, module_stats[flax_name])
                _set(variables, ("batch_stats", *path), flax_name, value)
            used.add(f"{prefix}.num_batches_tracked")
            continue
        kernel = leaves["kernel"]
        if len(kernel.shape) == 4:
            convert = lambda a: a.transpose(2, 3, 1, 0) if a.ndim == 4 else a  # noqa: E731
        else:
            convert = lambda a, f=flattened: _linear_from_torch(a, f) if a.ndim == 2 else a  # noqa: E731
        _set(variables, ("params", *path), "kernel", fetch(f"{prefix}.weight", convert, kernel))
        if "bias" in leaves:
            _set(variables, ("params", *path), "bias", fetch(f"{prefix}.bias", lambda a: a, leaves["bias"]))
    if missing:
        raise ValueError(f"state_dict lacks {len(missing)} keys that {name} needs: {', '.join(missing[:20])}")
    unexpected = sorted(set(state_dict) - used - {k for k in state_dict if k.endswith("num_batches_tracked")})
    if strict and unexpected:
        raise ValueError(
            f"state_dict has {len(unexpected)} keys that {name} does not use: {', '.join(unexpected[:20])} "
            "(pass strict=False to ignore them)"
        )
    return variables


def load_state_dict(path: str | os.PathLike) -> StateDict:
    """Reads a state dict saved as `.npz` (numpy.savez of `{key: array}`), or `.pt`/`.pth` if torch is installed.

    Raises:
      FileNotFoundError: `path` does not exist.
      ValueError: unsupported extension, or a torch file without torch installed.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"path={path!r} does not exist")
    if path.endswith(".npz"):
        with np.load(path) as archive:
            return {key: archive[key] for key in archive.files}
    if path.endswith((".pt", ".pth")):
        try:
            import torch  # noqa: PLC0415  (optional dependency)
        except ImportError as error:
            raise ValueError(
                f"path={path!r} is a torch file but torch is not installed; convert it to .npz with "
                "numpy.savez(out, **{k: v.numpy() for k, v in state_dict.items()}) where torch is available"
            ) from error
        state = torch.load(path, map_location="cpu", weights_only=True)
        return {key: value.numpy() for key, value in state.items()}
    raise ValueError(f"path={path!r} must end in .npz, .pt or .pth")
