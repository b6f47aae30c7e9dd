"""Optax optimizers and learning-rate schedules built from a config.

The optimizer config (`config.optimizer`, an `ml_collections.ConfigDict` or a plain mapping):

    name            "sgd" | "adamw" | "adam"
    learning_rate   base (peak) learning rate, e.g. 0.1 for SGD on CIFAR (He et al. 2016)
    momentum        SGD momentum (0.9); `nesterov` (False)
    b1, b2, eps     Adam(W) moments
    weight_decay    L2 coefficient (see "Weight decay" below)
    grad_clip_norm  clip gradients to this global norm before anything else; 0 disables
    schedule        "constant" | "piecewise" | "cosine"
    warmup_steps / warmup_epochs   linear warmup from 0 (cosine and piecewise)
    decay_steps / decay_epochs     piecewise boundaries (steps win over epochs when both set):
                                   the update after `b` updates is the first at the lower rate;
                                   He et al. CIFAR: lr 0.1, /10 at 32k and 48k iterations
    decay_factor    piecewise multiplier at each boundary (0.1)
    end_learning_rate  cosine floor (0.0)
    param_groups    optional {group_name: {pattern: regex, lr_scale: float, frozen: bool}}; a
                    parameter whose "/"-joined path matches `pattern` (`re.search`, groups tried
                    in order, first match wins) is optimized with its own copy of the optimizer
                    whose schedule is scaled by `lr_scale`, or not at all when `frozen`
                    (`optax.set_to_zero`); unmatched parameters use the base optimizer.

Weight decay: applied to the conv and dense weights (parameters named `kernel`) only; biases,
BatchNorm scales/offsets and the learnable scheme coefficients such as LM-ResNet's `k_t` are not
decayed (as in flax `examples/imagenet`, which decays only rank >= 2 weights, and Goyal et al.
2017: decaying them only shrinks the normalization or the scheme coefficient without
regularizing the function class). The rule goes by name because `nn.scan` stacks per-block
parameters, so rank does not tell a stacked BatchNorm scale from a kernel. For SGD the decay is coupled L2 (`wd * w` added to the
gradient before momentum, as in He et al.); for AdamW it is decoupled (Loshchilov & Hutter);
for Adam it is coupled.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ("sgd", "adamw", "adam")
SCHEDULES = ("constant", "piecewise", "cosine")
DEFAULT_GROUP = "default"
FROZEN = "frozen"


def _get(config: Any, name: str, default: Any) -> Any:
    """`config.name` for ConfigDicts and mappings, `default` when absent or None."""
    if config is None:
        return default
    value = config.get(name, default) if hasattr(config, "get") else getattr(config, name, default)
    return default if value is None else value


def _is_set(value: Any) -> bool:
    return value is not None and not (isinstance(value, (list, tuple)) and not value) and value != 0


def _steps(config: Any, steps_name: str, epochs_name: str, steps_per_epoch: int | None) -> Any:
    """A step count (or list of them) given in the config either in steps or in epochs.

    `<steps_name>` wins when set (non-zero / non-empty); else `<epochs_name>` is converted
    with `steps_per_epoch`; else 0.
    """
    steps = _get(config, steps_name, None)
    if _is_set(steps):
        return steps
    epochs = _get(config, epochs_name, None)
    if not _is_set(epochs):
        return 0
    if not steps_per_epoch:
        raise ValueError(
            f"optimizer.{epochs_name}={epochs!r} needs steps_per_epoch (got {steps_per_epoch!r}); "
            f"give optimizer.{steps_name} instead"
        )
    if isinstance(epochs, (int, float)):
        return int(round(epochs * steps_per_epoch))
    return [int(round(e * steps_per_epoch)) for e in epochs]


def make_schedule(
    config: Any, *, steps_per_epoch: int | None = None, total_steps: int | None = None
) -> optax.Schedule:
    """The learning-rate schedule `step -> lr` described by an optimizer config.

    Args:
      config: the optimizer config (see the module docstring).
      steps_per_epoch: converts `*_epochs` fields to steps.
      total_steps: length of the run (the cosine schedule decays over it).

    Raises:
      ValueError: unknown `schedule`, or a field it needs is missing/invalid.
    """
    base_lr = float(_get(config, "learning_rate", 0.1))
    name = str(_get(config, "schedule", "constant")).lower()
    warmup = int(_steps(config, "warmup_steps", "warmup_epochs", steps_per_epoch))
    if warmup < 0:
        raise ValueError(f"optimizer.warmup_steps must be >= 0, got {warmup}")
    if name == "constant":
        schedule = optax.constant_schedule(base_lr)
    elif name == "piecewise":
        boundaries = _steps(config, "decay_steps", "decay_epochs", steps_per_epoch) or []
        if isinstance(boundaries, int):
            boundaries = [boundaries]
        boundaries = sorted(int(b) for b in boundaries)
        if any(b <= warmup for b in boundaries):
            raise ValueError(
                f"optimizer.decay_steps={boundaries} must all lie after the warmup ({warmup} steps)"
            )
        factor = float(_get(config, "decay_factor", 0.1))
        # A boundary b means: the update with 0-based index b (after b updates, i.e. the first of
        # epoch b / steps_per_epoch) is the first at the decayed rate. Written out rather than
        # with optax.piecewise_constant_schedule, whose boundary convention changed across
        # versions. The part after the warmup counts from the end of the warmup.
        shifted = jnp.asarray([b - warmup for b in boundaries], jnp.int32)

        def schedule(count):
            decays = jnp.sum(jnp.asarray(count)[..., None] >= shifted, axis=-1)
            return base_lr * jnp.power(factor, decays.astype(jnp.float32))

    elif name == "cosine":
        if not total_steps or total_steps <= warmup:
            raise ValueError(
                f"optimizer.schedule='cosine' needs more steps than its warmup: the run has total_steps="
                f"{total_steps} (num_train_steps or num_epochs) and optimizer.warmup_steps={warmup}; "
                "shorten the warmup or train longer"
            )
        end_lr = float(_get(config, "end_learning_rate", 0.0))
        schedule = optax.cosine_decay_schedule(base_lr, total_steps - warmup, alpha=end_lr / base_lr if base_lr else 0.0)
    else:
        raise ValueError(f"optimizer.schedule={name!r} is not one of {SCHEDULES}")
    if warmup:
        return optax.join_schedules([optax.linear_schedule(0.0, base_lr, warmup), schedule], [warmup])
    return schedule


def weight_decay_mask(params: Any) -> Any:
    """True for the leaves that get weight decay: those named `kernel` (conv and dense weights).

    Decided by name rather than by rank because `nn.scan` stacks the parameters of identical
    blocks along a leading axis, which turns BatchNorm scales `[C]` into `[blocks, C]`.
    """
    return jax.tree_util.tree_map_with_path(lambda path, _: param_path(path).rsplit("/", 1)[-1] == "kernel", params)


def _base_optimizer(config: Any, learning_rate: optax.ScalarOrSchedule) -> optax.GradientTransformation:
    name = str(_get(config, "name", "sgd")).lower()
    weight_decay = float(_get(config, "weight_decay", 0.0))
    if weight_decay < 0:
        raise ValueError(f"optimizer.weight_decay must be >= 0, got {weight_decay}")
    decay = [optax.add_decayed_weights(weight_decay, mask=weight_decay_mask)] if weight_decay else []
    if name == "sgd":
        return optax.chain(
            *decay,
            optax.sgd(
                learning_rate,
                momentum=float(_get(config, "momentum", 0.9)) or None,
                nesterov=bool(_get(config, "nesterov", False)),
            ),
        )
    b1, b2 = float(_get(config, "b1", 0.9)), float(_get(config, "b2", 0.999))
    eps = float(_get(config, "eps", 1e-8))
    if name == "adamw":
        return optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=weight_decay_mask)
    if name == "adam":
        return optax.chain(*decay, optax.adam(learning_rate, b1=b1, b2=b2, eps=eps))
    raise ValueError(f"optimizer.name={name!r} is not one of {OPTIMIZERS}")


def _groups(groups: Any) -> list[tuple[str, dict[str, Any]]]:
    """Parses `param_groups` ({name: {pattern, lr_scale, frozen}}) into an ordered list."""
    if not groups:
        return []
    items = groups.items() if hasattr(groups, "items") else groups
    result = []
    for group_name, spec in items:
        spec = dict(spec.items()) if hasattr(spec, "items") else dict(spec)
        unknown = set(spec) - {"pattern", "lr_scale", "frozen"}
        if unknown or "pattern" not in spec:
            raise ValueError(
                f"optimizer.param_groups.{group_name}={spec!r} must have a 'pattern' and optionally "
                f"'lr_scale' and 'frozen' (unknown keys: {sorted(unknown)})"
            )
        if group_name in (DEFAULT_GROUP, FROZEN):
            raise ValueError(f"optimizer.param_groups may not use the reserved name {group_name!r}")
        try:
            re.compile(spec["pattern"])
        except re.error as error:
            raise ValueError(f"optimizer.param_groups.{group_name}.pattern={spec['pattern']!r} is not a regex: {error}")
        result.append((str(group_name), spec))
    return result


def param_path(path: tuple[Any, ...]) -> str:
    """"Stage_0/Conv_1/kernel": the "/"-joined names of a key path (as used by param_groups)."""
    parts = []
    for key in path:
        for attribute in ("key", "name", "idx"):
            if hasattr(key, attribute):
                parts.append(str(getattr(key, attribute)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def param_group_labels(params: Any, param_groups: Any) -> Any:
    """The group name of every parameter leaf: the first group whose pattern matches its path.

    Args:
      params: a parameter pytree.
      param_groups: `{group_name: {"pattern": regex, ...}}` (e.g. `config.optimizer.param_groups`).
    Returns:
      A pytree like `params` of group names (`"default"` where no pattern matches).
    """
    parsed = _groups(param_groups)
    compiled = [(name, re.compile(spec["pattern"])) for name, spec in parsed]

    def label(path, _leaf):
        name = param_path(path)
        for group_name, pattern in compiled:
            if pattern.search(name):
                return group_name
        return DEFAULT_GROUP

    return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(
    config: Any, *, steps_per_epoch: int | None = None, total_steps: int | None = None
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Builds `(tx, learning_rate_schedule)` from an optimizer config (see the module docstring).

    The chain is: global-norm clipping (if `grad_clip_norm > 0`) -> per-group optimizer
    (`optax.multi_transform` when `param_groups` is set) -> update. The returned schedule is the
    base one (before any group `lr_scale`), for logging.

    Raises:
      ValueError: unknown optimizer/schedule name, negative weight decay or clip norm, or a
        malformed `param_groups` entry; the message names the config field.
    """
    schedule = make_schedule(config, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
    param_groups = _get(config, "param_groups", None)
    groups = _groups(param_groups)
    if groups:
        transforms = {DEFAULT_GROUP: _base_optimizer(config, schedule)}
        for group_name, spec in groups:
            if bool(spec.get("frozen", False)):
                transforms[group_name] = optax.set_to_zero()
            else:
                scale = float(spec.get("lr_scale", 1.0))
                transforms[group_name] = _base_optimizer(config, lambda step, s=scale: s * schedule(step))
        tx = optax.multi_transform(transforms, lambda params: param_group_labels(params, param_groups))
    else:
        tx = _base_optimizer(config, schedule)
    clip = float(_get(config, "grad_clip_norm", 0.0))
    if clip < 0:
        raise ValueError(f"optimizer.grad_clip_norm must be >= 0 (0 disables clipping), got {clip}")
    if clip:
        tx = optax.chain(optax.clip_by_global_norm(clip), tx)
    return tx, schedule


def frozen_mask(params: Any, param_groups: Any) -> Any:
    """True for the parameters of frozen groups (handy to check a transfer-learning setup)."""
    frozen_groups = {name for name, spec in _groups(param_groups) if spec.get("frozen", False)}
    return jax.tree_util.tree_map(lambda label: label in frozen_groups, param_group_labels(params, param_groups))


__all__ = [
    "OPTIMIZERS",
    "SCHEDULES",
    "frozen_mask",
    "make_optimizer",
    "make_schedule",
    "param_group_labels",
    "param_path",
    "weight_decay_mask",
]
