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

ResNets read as ODEs (`scheme=...`, see `cnn.models.resnet`) convert too, so an ODE-ResNet can
start from pretrained weights:

    variables = convert.from_torchvision("resnet50", sd, scheme="euler")            # scanned stages
    variables = convert.from_torchvision("resnet50", sd, scheme="euler", scan=False)  # blocks_{i}
    variables = convert.from_torchvision("resnet50", sd, scheme="lm", knobs={"k": 0.0})

torchvision's block 0 and `downsample` of a stage with a transition become `layer{s}/entry/
{block,shortcut}`, the other blocks `layer{s}/blocks_{i}/block` (unrolled) or, stacked along a
leading axis, `layer{s}/blocks/block` (scanned; `cnn.ode.stack_unrolled` / `unstack_scanned`
convert between the two). `scheme="euler"` then computes exactly torchvision's network; every
other scheme steps the same residual functions differently. Learnable knobs (LM-ResNet's `k_t`)
have no torchvision counterpart: `from_torchvision` sets them from `knobs` (a value per knob name,
the same for every block; `{"k": 0.0}` makes LM-ResNet compute the pretrained Euler network), and
`to_torchvision` refuses them. Tied stages (`tied=True`, one weight set per stage) are not
convertible.

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

import dataclasses
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
from cnn.ode.norm import is_evaluation_name
from cnn.ode.schemes import get_scheme
from cnn.ode.stage import fold_stage_options, stack_unrolled, unstack_scanned

StateDict = dict[str, np.ndarray]
ModulePath = tuple[str, ...]
# torch prefix of a Flax module, and the (h, w, c) map a linear layer reads flattened (or None).
TorchName = tuple[str, "tuple[int, int, int] | None"]


# ----------------------------------------------------------------------------- family rules


def _resnet_name(path: ModulePath) -> TorchName:
    """torchvision-layout ResNet (`scheme=None`): `layer{s}/block{t}/...`, `layer{s}/shortcut`."""
    if len(path) == 1:  # conv1, bn1, fc
        return path[0], None
    stage, module, *rest = path
    if module == "shortcut":
        return f"{stage}.0.downsample.{ {'conv': 0, 'bn': 1}[rest[0]] }", None
    block = re.fullmatch(r"block(\d+)", module)
    if block is None or len(rest) != 1:
        raise KeyError(path)
    return f"{stage}.{block.group(1)}.{rest[0]}", None


def _ode_resnet_rule(model: ResNet) -> Callable[[ModulePath], TorchName]:
    """ResNet with a scheme, unrolled (`scan=False`) layout: `layer{s}/entry/{block,shortcut}/...`
    is torchvision's block 0 and downsample; `layer{s}/blocks_{i}/block/...` is torchvision's block
    `i + 1` in a stage with an entry block, block `i` in one without."""
    has_entry = model.transitions()

    def rule(path: ModulePath) -> TorchName:
        if len(path) == 1:  # conv1, bn1, fc
            return path[0], None
        stage, module, *rest = path
        stage_index = re.fullmatch(r"layer([1-4])", stage)
        if stage_index is None or len(rest) != 2:
            raise KeyError(path)
        part, layer = rest
        offset = int(has_entry[int(stage_index.group(1)) - 1])
        if module == "entry" and part == "shortcut":
            return f"{stage}.0.downsample.{ {'conv': 0, 'bn': 1}[layer] }", None
        if module == "entry" and part == "block":
            return f"{stage}.0.{layer}", None
        unrolled = re.fullmatch(r"blocks_(\d+)", module)
        if unrolled is None or part != "block":
            raise KeyError(path)
        return f"{stage}.{int(unrolled.group(1)) + offset}.{layer}", None

    return rule


def _is_ode_resnet(model: nn.Module) -> bool:
    return isinstance(model, ResNet) and model.scheme is not None


def _check_untied(model: ResNet) -> None:
    if model.stage.tied:
        raise ValueError(
            "tied=True: a tied stage holds one weight set for all its identical blocks, torchvision one per "
            "block; convert with tied=False"
        )


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
        return (_ode_resnet_rule(model) if model.scheme is not None else _resnet_name), {"num_classes": "fc.weight"}
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
      options: model options that change the architecture (e.g. `depth` for "vgg"/"resnet";
        `scheme`, `scan` for a ResNet read as an ODE).

    Returns:
      `{torch key: array}` with torch layouts (OIHW conv weights, [out, in] linear weights).
      A multi-evaluation scheme's per-evaluation BatchNorm statistics (`eval{k}`, `cnn.ode.norm`)
      have no torchvision place: each BatchNorm exports those of evaluation 0.

    Raises:
      ValueError: the family has no torchvision counterpart, or a ResNet with a scheme is tied
        or has learnable knobs (which torchvision's ResNet cannot hold).
    """
    model = create(name, **options)
    rule, _ = _family(model)
    params = variables["params"]
    stats = variables.get("batch_stats", {})
    if _is_ode_resnet(model):
        _check_untied(model)
        knob_names = get_scheme(model.scheme).knob_names
        if knob_names:
            raise ValueError(
                f"scheme={get_scheme(model.scheme).name!r} has learnable knobs {list(knob_names)} (layer{{s}}/knobs) "
                "that torchvision's ResNet cannot hold; export a knob-free scheme such as 'euler'"
            )
        if model.stage.scan:
            params, stats = unstack_scanned(params), unstack_scanned(stats)
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
    name: str,
    state_dict: Mapping[str, Any],
    *,
    strict: bool = True,
    knobs: Mapping[str, float] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """torchvision-named state dict -> Flax variables `{"params": ..., "batch_stats": ...}`.

    Args:
      name: registered model name (e.g. "resnet50", "vgg16").
      state_dict: `{torch key: array-like}` (numpy arrays, or anything `np.asarray` accepts).
      strict: raise on keys the model does not use (besides `num_batches_tracked`).
      knobs: for a ResNet whose scheme has learnable knobs: `{knob name: value}`, the value every
        block's knob gets (e.g. `{"k": 0.0}` for "lm": the pretrained Euler network exactly).
      options: model options (`num_classes`, VGG/AlexNet's `classifier_width` and GoogLeNet's
        `aux_logits` are read from the state dict unless given; `param_dtype` sets the dtype of
        the returned params; a ResNet's `scheme`, `scheme_options`, `scan` pick the ODE layout).

    Returns:
      Variables for `create(name, **options).apply`, jnp arrays.

    Raises:
      ValueError: the family has no torchvision counterpart, a key is missing or unexpected, an
        array's shape does not match the model's, or (ResNet with a scheme) the stages are tied
        or `knobs` does not give exactly the scheme's knobs.
    """
    probe = create(name, **options)
    knob_raw = _knob_raw_values(probe, knobs)
    if _is_ode_resnet(probe) and probe.stage.scan:
        # Convert into the unrolled layout, then stack each stage's identical blocks.
        unrolled_options = {**fold_stage_options(options), "stage": dataclasses.replace(probe.stage, scan=False)}
        unrolled = from_torchvision(name, state_dict, strict=strict, knobs=knobs, **unrolled_options)
        return {collection: stack_unrolled(tree) for collection, tree in unrolled.items()}
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
        if knob_raw and path[-1] == "knobs":  # scheme knobs: no torchvision counterpart
            for knob_name, like in leaves.items():
                _set(variables, ("params", *path), knob_name, jnp.full(like.shape, knob_raw[knob_name], like.dtype))
            continue
        prefix, flattened = rule(path)
        if "scale" in leaves:
            _set(variables, ("params", *path), "scale", fetch(f"{prefix}.weight", lambda a: a, leaves["scale"]))
            _set(variables, ("params", *path), "bias", fetch(f"{prefix}.bias", lambda a: a, leaves["bias"]))
            module_stats = _get(stats, path)
            for flax_name, torch_name in (("mean", "running_mean"), ("var", "running_var")):
                value = fetch(f"{prefix}.{torch_name}", lambda a: a, module_stats[flax_name])
                _set(variables, ("batch_stats", *path), flax_name, value)
                # Multi-evaluation schemes keep statistics per F evaluation (cnn.ode.norm):
                # each starts from the one torchvision has.
                for child in module_stats:
                    if is_evaluation_name(child):
                        _set(variables, ("batch_stats", *path, child), flax_name, value)
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


def _knob_raw_values(model: nn.Module, knobs: Mapping[str, float] | None) -> dict[str, float]:
    """`{knob name: stored (raw) parameter value}` for `model`'s scheme knobs, from their values.

    Also rejects what a ResNet with a scheme cannot take from torchvision (tied stages)."""
    scheme_knobs = ()
    if _is_ode_resnet(model):
        _check_untied(model)
        scheme_knobs = get_scheme(model.scheme).knobs
    given = dict(knobs or {})
    expected = [knob.name for knob in scheme_knobs]
    if sorted(given) != sorted(expected):
        if not expected:
            raise ValueError(f"knobs={knobs!r}: this model has no learnable scheme knobs; leave knobs unset")
        raise ValueError(
            f"knobs={knobs!r}: scheme={get_scheme(model.scheme).name!r} has learnable knobs {expected} with no "
            f"torchvision counterpart; give a value for each, e.g. knobs={ {name: 0.0 for name in expected} !r}"
        )
    raw = {}
    for knob in scheme_knobs:
        value = float(np.asarray(knob.to_raw(jnp.asarray(given[knob.name], jnp.float32))))
        if not np.isfinite(value):
            raise ValueError(
                f"knobs={given!r}: {knob.name}={given[knob.name]!r} lies outside the open interval "
                f"{knob.name}_bounds={knob.bounds} kept by the scheme's constraint"
            )
        raw[knob.name] = value
    return raw


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
