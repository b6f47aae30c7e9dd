"""Transfer learning: feature extraction, fine-tuning and training from scratch, by parameter labels.

The three regimes of the lecture's M2CAI tool-recognition study, for any classifier of the zoo:

    mode          trunk (everything but the classifier layer)       classifier layer ("head")
    extraction    pretrained, frozen (`optax.set_to_zero`),         new, trained
                  BatchNorm statistics frozen too
    finetune      pretrained, trained at `trunk_lr_fraction` x lr   new, trained at lr
    scratch       random init, trained at lr                        new, trained at lr

Every parameter gets a label, "head" or "trunk" (`param_labels`), from a regex on its "/"-joined
path; the optimizer is `optax.multi_transform` over those labels. It is built by the training
engine from `config.optimizer.param_groups` (`transfer_param_groups` writes them), so a transfer
run is an ordinary `cnn.train.fit` run:

    head = head_pattern(head_paths("simple_cnn", input_shape=(28, 28, 1), widths=(32, 64)))
    source, _ = load_run_variables("runs/pretrain")               # Orbax checkpoint of another run
    config = transfer_config(base_config, "finetune", head=head, trunk_lr_fraction=0.1)
    model = cnn.models.create(config.model, num_classes=10, **config.model_options)
    variables = swap_head(source, model, rng=0, input_shape=(28, 28, 1), head=head)
    result = cnn.train.fit(config, "runs/finetune", init_variables=variables)   # pretrained trunk

Frozen BatchNorm statistics in extraction mode (a choice, documented here): the engine's train
step runs the model with `train=True`, which would normalize the frozen trunk with the
statistics of each small target batch and overwrite the running averages learned on the source
data. A frozen trunk is meant to be a fixed feature map, so in extraction mode the model is
wrapped in `FrozenStatistics`, which runs it in inference mode during training too: BatchNorm
normalizes with the pretraining run's running statistics and never updates them, the features
the head is trained on are exactly those it sees at test time, and a few hundred target images
cannot corrupt the statistics. (Dropout inside the wrapped network is off as well; the zoo's
classifier layers have none after them.) Fine-tuning and scratch training update BatchNorm as
usual.

Pretrained weights come from an Orbax checkpoint of another run of the engine
(`load_run_variables`) or from a torchvision-layout file converted by `cnn.models.convert`
(`load_torchvision_variables`); `swap_head` keeps every trunk parameter and initializes a new
classifier layer for the target's number of classes.

Train-time cost (`step_costs`): all three modes run the engine's one train step, which
differentiates every parameter (frozen gradients are zeroed by the optimizer), so their step
costs are alike; `trainable_step` differentiates only the trainable parameters, the cost a
feature-extraction run needs at least (trunk forward only, no trunk backward).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

import cnn.models
from cnn.models import convert
from cnn.models.registry import register
from cnn.train import optim as optim_lib
from cnn.train import steps as steps_lib
from cnn.train.checkpoint import ITEMS
from cnn.train.config import resolve_config
from cnn.train.state import TrainState, create_train_state

MODES = ("extraction", "finetune", "scratch")
HEAD = "head"
TRUNK = "trunk"
Variables = dict[str, Any]


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not a transfer mode; valid modes: {list(MODES)}")


# ------------------------------------------------------------------------------------------------
# The frozen-statistics wrapper (registered as model "transfer")


class FrozenStatistics(nn.Module):
    """Runs `base` in inference mode whatever `train` says (BatchNorm: running statistics, no updates).

    The wrapper shares its scope with `base`, so its variables are exactly `base`'s (same tree,
    same names): checkpoints and head patterns carry over unchanged.
    `[batch, height, width, channels] -> [batch, num_classes]`.
    """

    base: nn.Module

    def setup(self):
        nn.share_scope(self, self.base)

    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        del train  # the frozen trunk is a fixed feature map: always inference mode
        return self.base(x, train=False)


@register("transfer")
def transfer_model(*, base: str, freeze_statistics: bool = False, **options: Any) -> nn.Module:
    """`create(base, **options)`, wrapped in `FrozenStatistics` when `freeze_statistics`.

    This is how a transfer run names its model in an engine config:
    `config.model = "transfer"`, `config.model_options = {"base": "simple_cnn",
    "freeze_statistics": True, "widths": (32, 64)}`.
    """
    if not isinstance(base, str) or base.lower() == "transfer":
        raise ValueError(f"base={base!r} must name a registered classifier other than 'transfer'")
    model = cnn.models.create(base, **options)
    return FrozenStatistics(model) if freeze_statistics else model


# ------------------------------------------------------------------------------------------------
# Head and trunk labels


def _flat(tree: Mapping[str, Any]) -> dict[str, Any]:
    return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep="/")


def head_paths(model_name: str, *, input_shape: Sequence[int], **options: Any) -> tuple[str, ...]:
    """The module paths of the classifier layer(s): those whose parameter shapes follow `num_classes`.

    Found by tracing the model's init abstractly (`jax.eval_shape`, nothing is computed) for two
    class counts and comparing: e.g. `("Dense_0",)` for simple_cnn, `("classifier/fc8",)` for
    VGG, `("fc",)` for ResNet, `("output",)` for LeNet-5.

    Args:
      model_name: a registered model name.
      input_shape: `(height, width, channels)` of one input.
      options: model options other than `num_classes`.

    Raises:
      ValueError: no parameter depends on the number of classes.
    """
    options = {k: v for k, v in options.items() if k != "num_classes"}

    def shapes(num_classes: int) -> dict[str, Any]:
        model = cnn.models.create(model_name, num_classes=num_classes, **options)
        dummy = jax.ShapeDtypeStruct((1, *tuple(int(d) for d in input_shape)), jnp.float32)
        tree = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), dummy)
        return _flat(tree["params"])

    two, three = shapes(2), shapes(3)
    changed = sorted({path.rsplit("/", 1)[0] for path in two if two[path].shape != three[path].shape})
    if not changed:
        raise ValueError(f"model_name={model_name!r}: no parameter depends on num_classes, cannot find its head")
    return tuple(changed)


def head_pattern(paths: Sequence[str]) -> str:
    """A regex matching the "/"-joined parameter paths under the given module paths."""
    if not paths:
        raise ValueError("paths must name at least one head module")
    return "^(?:" + "|".join(re.escape(p.strip("/")) for p in paths) + ")/"


def param_labels(params: Any, head: str) -> Any:
    """`"head"` or `"trunk"` for every parameter leaf: head where `head` (a regex) matches its path.

    The labels `optax.multi_transform` uses (the engine derives the same ones from
    `transfer_param_groups(...)`).
    """
    return optim_lib.param_group_labels(params, {HEAD: {"pattern": head}, TRUNK: {"pattern": ""}})


def transfer_param_groups(mode: str, *, head: str, trunk_lr_fraction: float = 0.1) -> dict[str, dict[str, Any]]:
    """`config.optimizer.param_groups` for a mode (the engine turns them into `optax.multi_transform`).

    Groups are tried in order: "head" (the classifier layer, full learning rate) first, then
    "trunk" (everything else): frozen (`optax.set_to_zero`) in extraction mode, at
    `trunk_lr_fraction` of the learning rate in fine-tuning, at the full rate from scratch.

    Raises:
      ValueError: unknown mode, or `trunk_lr_fraction` not in (0, 1].
    """
    _check_mode(mode)
    if not 0.0 < float(trunk_lr_fraction) <= 1.0:
        raise ValueError(f"trunk_lr_fraction={trunk_lr_fraction!r} must lie in (0, 1]")
    trunk: dict[str, Any] = {"pattern": "", "lr_scale": 1.0, "frozen": False}
    if mode == "extraction":
        trunk["frozen"] = True
    elif mode == "finetune":
        trunk["lr_scale"] = float(trunk_lr_fraction)
    return {HEAD: {"pattern": head, "lr_scale": 1.0, "frozen": False}, TRUNK: trunk}


def make_optimizer(
    optimizer_config: Any,
    mode: str,
    *,
    head: str,
    trunk_lr_fraction: float = 0.1,
    steps_per_epoch: int | None = None,
    total_steps: int | None = None,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The engine's optimizer (`cnn.train.make_optimizer`) with the mode's head/trunk groups.

    Args:
      optimizer_config: an engine optimizer config (`name`, `learning_rate`, `schedule`, ...).
      mode: "extraction", "finetune" or "scratch".
      head: regex of the head's parameter paths (`head_pattern`).
      trunk_lr_fraction: the trunk's learning rate as a fraction of the head's (fine-tuning).
    Returns:
      `(tx, schedule)`; `tx` is `optax.multi_transform` over "head" / "trunk" labels.
    """
    config = ml_collections.ConfigDict(
        optimizer_config.to_dict() if hasattr(optimizer_config, "to_dict") else dict(optimizer_config)
    )
    config.param_groups = transfer_param_groups(mode, head=head, trunk_lr_fraction=trunk_lr_fraction)
    return optim_lib.make_optimizer(config, steps_per_epoch=steps_per_epoch, total_steps=total_steps)


def transfer_config(
    base_config: ml_collections.ConfigDict,
    mode: str,
    *,
    head: str,
    trunk_lr_fraction: float = 0.1,
) -> ml_collections.ConfigDict:
    """An engine config for one transfer mode, derived from a config for the target task.

    `base_config.model` / `model_options` name the architecture (e.g. "simple_cnn"); the result
    uses model "transfer" with `base` = that name and `freeze_statistics` in extraction mode, and
    the mode's `optimizer.param_groups`. Everything else (data, steps, optimizer) is kept.
    """
    _check_mode(mode)
    config = resolve_config(base_config)
    options = config.model_options.to_dict()
    if config.model.lower() == "transfer":
        base = options.pop("base")
        options.pop("freeze_statistics", None)
    else:
        base = config.model
    config.model = "transfer"
    config.model_options = ml_collections.ConfigDict(
        {"base": base, "freeze_statistics": mode == "extraction", **options}
    )
    config.optimizer.param_groups = ml_collections.ConfigDict(
        transfer_param_groups(mode, head=head, trunk_lr_fraction=trunk_lr_fraction)
    )
    return config


# ------------------------------------------------------------------------------------------------
# Pretrained variables: from a run's Orbax checkpoint, from a torchvision-layout file


def load_run_variables(run_dir: str | os.PathLike, step: int | None = None) -> tuple[Variables, dict[str, Any]]:
    """The model variables saved by another `cnn.train.fit` run, and that run's config.

    Reads `run_dir/checkpoints/<step>` (Orbax, written by `cnn.train.Checkpointer`) without a
    template, so no model needs to be rebuilt, and `run_dir/config.json`.

    Args:
      run_dir: the other run's directory.
      step: the checkpoint step (default: the latest).

    Returns:
      `({"params": ..., "batch_stats": ...}, config dict)` with numpy arrays (`batch_stats`
      only when the model has BatchNorm).

    Raises:
      FileNotFoundError: no checkpoints (or not that step) in `run_dir`.
    """
    import orbax.checkpoint as ocp

    run_dir = pathlib.Path(run_dir).expanduser().absolute()
    directory = run_dir / "checkpoints"
    if not directory.is_dir():
        raise FileNotFoundError(f"run_dir={str(run_dir)!r} has no checkpoints/ directory (is it a cnn.train run?)")
    manager = ocp.CheckpointManager(directory, item_names=ITEMS)
    try:
        steps = sorted(manager.all_steps())
        chosen = manager.latest_step() if step is None else int(step)
        if chosen is None or chosen not in steps:
            raise FileNotFoundError(
                f"run_dir={str(run_dir)!r} has no checkpoint step={step}; available steps: {steps or 'none'}"
            )
        restored = manager.restore(chosen, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    finally:
        manager.close()
    tree = jax.tree_util.tree_map(np.asarray, restored.state)
    variables: Variables = {"params": tree["params"]}
    if tree.get("batch_stats"):
        variables["batch_stats"] = tree["batch_stats"]
    config_path = run_dir / "config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    return variables, config


def load_torchvision_variables(path: str | os.PathLike, model_name: str, **options: Any) -> Variables:
    """Variables of `model_name` from a torchvision-layout state dict file (.npz, or .pt with torch).

    A thin wrapper of `cnn.models.convert.load_state_dict` + `from_torchvision`; the classifier
    keeps the file's number of classes (swap it with `swap_head`).
    """
    return convert.from_torchvision(model_name, convert.load_state_dict(path), **options)


def swap_head(
    source: Mapping[str, Any],
    model: nn.Module,
    *,
    rng: jax.Array | int,
    input_shape: Sequence[int],
    head: str,
) -> Variables:
    """Variables for `model` (the target classifier) with `source`'s trunk and a fresh head.

    Every variable of `model` whose path does not match `head` is copied from `source` (which
    must hold it with the same shape); the head's parameters (e.g. a classifier layer for a
    different number of classes) keep `model`'s random initialization.

    Args:
      source: pretrained `{"params": ..., "batch_stats": ...}` of the same architecture.
      model: the target model (e.g. `create(name, num_classes=new)`).
      rng: key or seed of the head's initialization.
      input_shape: `(height, width, channels)` of one target input.
      head: regex of the head's "/"-joined parameter paths (`head_pattern`).

    Returns:
      `{"params": ..., "batch_stats": ...}` as jnp arrays, in the target model's tree.

    Raises:
      ValueError: a trunk variable is missing from `source` or has another shape, or `head`
        matches no parameter of `model`.
    """
    key = jax.random.key(rng) if isinstance(rng, (int, np.integer)) else rng
    dummy = jax.ShapeDtypeStruct((1, *tuple(int(d) for d in input_shape)), jnp.float32)
    target = flax.core.unfreeze(jax.eval_shape(lambda x: model.init(key, x, train=False), dummy))
    pattern = re.compile(head)
    head_leaves = [p for p in _flat(target["params"]) if pattern.search(p)]
    if not head_leaves:
        raise ValueError(
            f"head={head!r} matches no parameter of the target model; its paths: {list(_flat(target['params']))}"
        )

    @jax.jit
    def init_head(k):
        # Only the head's initial values are returned: XLA drops the rest of the init (the
        # trunk's random draws and the forward pass) as dead code, which keeps this compile small.
        variables = model.init(k, jnp.zeros(dummy.shape, dummy.dtype), train=False)
        return {p: v for p, v in _flat(variables["params"]).items() if pattern.search(p)}

    fresh_head = init_head(key)
    result: Variables = {}
    problems: list[str] = []
    for collection, tree in target.items():
        flat_source = _flat(source.get(collection, {}))
        flat = {}
        for path, value in _flat(tree).items():
            if collection == "params" and pattern.search(path):
                flat[path] = fresh_head[path]
            elif collection != "params" and pattern.search(path):
                raise ValueError(f"head={head!r} matches {collection}/{path}; a head with BatchNorm is not supported")
            elif path not in flat_source:
                problems.append(f"{collection}/{path} is missing")
            elif tuple(np.shape(flat_source[path])) != tuple(value.shape):
                problems.append(
                    f"{collection}/{path} has shape {tuple(np.shape(flat_source[path]))}, target needs {tuple(value.shape)}"
                )
            else:
                flat[path] = jnp.asarray(flat_source[path], value.dtype)
        result[collection] = flax.traverse_util.unflatten_dict(flat, sep="/")
    if problems:
        raise ValueError(f"source does not fit the target's trunk: {'; '.join(problems[:10])}")
    return result


# ------------------------------------------------------------------------------------------------
# Data: few labels per class


def balanced_subset(
    source: Mapping[str, np.ndarray] | Any, per_class: int, *, seed: int = 0, num_classes: int | None = None
) -> dict[str, np.ndarray]:
    """`per_class` examples of every class, drawn without replacement (seeded), in shuffled order.

    Args:
      source: a dict of arrays with "image" and "label", or a random-access source of examples.
      per_class: examples kept per class.

    Raises:
      ValueError: `per_class < 1`, or a class has fewer than `per_class` examples.
    """
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got per_class={per_class}")
    if isinstance(source, Mapping):
        labels = np.asarray(source["label"])
    else:
        labels = np.asarray([int(source[i]["label"]) for i in range(len(source))])
    classes = range(num_classes) if num_classes is not None else np.unique(labels)
    generator = np.random.default_rng(seed)
    chosen = []
    for label in classes:
        indices = np.flatnonzero(labels == label)
        if len(indices) < per_class:
            raise ValueError(f"class {label} has {len(indices)} examples, fewer than per_class={per_class}")
        chosen.append(generator.choice(indices, per_class, replace=False))
    order = generator.permutation(np.concatenate(chosen))
    if isinstance(source, Mapping):
        return {key: np.asarray(value)[order] for key, value in source.items()}
    records = [source[int(i)] for i in order]
    return {key: np.stack([np.asarray(r[key]) for r in records]) for key in ("image", "label")}


def few_label_datasets(
    name: str, per_class: int, *, seed: int = 0, data_dir: str | os.PathLike | None = None
) -> Callable[..., Any]:
    """A `fit(..., datasets=)` factory: `per_class` labelled training examples per class, full test set.

    The subset is drawn once (from `seed`), so every mode of a comparison trains on the same images.
    """
    from cnn import data as data_lib

    subset = balanced_subset(data_lib.get_source(name, "train", data_dir=data_dir), per_class, seed=seed)

    def factory(split: str, **kwargs: Any):
        if split.startswith("train"):
            return data_lib.BatchIterator(subset, **kwargs)
        return data_lib.load(name, split, data_dir=data_dir, **kwargs)

    return factory


# ------------------------------------------------------------------------------------------------
# Train-time cost per mode


def trainable_step(
    labels: Any, *, frozen: Sequence[str] = (TRUNK,), frozen_statistics: bool = False
) -> Callable[[TrainState, Mapping[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
    """A train step that differentiates only the parameters whose label is not in `frozen`.

    The engine's step (`cnn.train.make_train_step`) takes the gradient of every parameter and
    lets the optimizer zero the frozen ones; this step never computes them, so with a frozen
    trunk XLA runs the trunk forward only. Used to measure what feature extraction needs.

    Args:
      labels: a pytree like the params of label strings (`param_labels`).
      frozen: the labels held fixed.
      frozen_statistics: run the model in inference mode (BatchNorm running statistics).
    Returns:
      `step(state, batch) -> (state, {"loss"})`; the state's `tx` must accept the full params tree
      (zero updates for frozen leaves, e.g. `make_optimizer(..., "extraction")`).
    """
    flat_labels = _flat(labels)
    is_frozen = {path: label in frozen for path, label in flat_labels.items()}

    def step(state: TrainState, batch: Mapping[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
        flat_params = _flat(state.params)
        trainable = {p: v for p, v in flat_params.items() if not is_frozen[p]}
        fixed = {p: jax.lax.stop_gradient(v) for p, v in flat_params.items() if is_frozen[p]}
        images = steps_lib.prepare_images(batch["image"])

        def loss_fn(trainable_params):
            params = flax.traverse_util.unflatten_dict({**fixed, **trainable_params}, sep="/")
            if frozen_statistics:
                logits = state.apply_fn(state.variables(params), images, train=False)
                updates = {}
            else:
                logits, updates = state.apply_fn(state.variables(params), images, train=True, mutable=["batch_stats"])
            return steps_lib.cross_entropy_loss(logits, batch["label"]), updates

        (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
        full_grads = {p: grads[p] if p in grads else jnp.zeros_like(v) for p, v in flat_params.items()}
        new_state = state.apply_gradients(
            grads=flax.traverse_util.unflatten_dict(full_grads, sep="/"),
            batch_stats=updates.get("batch_stats", state.batch_stats),
        )
        return new_state, {"loss": loss}

    return step


def compiled_flops(compiled: Any) -> float:
    """FLOPs from XLA's cost analysis of a compiled (or lowered) computation; nan when unavailable."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else {}
    return float((analysis or {}).get("flops", float("nan")))


@dataclasses.dataclass(frozen=True)
class StepCost:
    """Train-time cost of one step of a mode.

    Attributes:
      flops: XLA's FLOP count of the step (forward, backward, optimizer update).
      seconds: median wall time of one step (after compilation).
    """

    flops: float
    seconds: float


def measure_step(
    step: Callable, state: TrainState, batch: Mapping[str, Any], *, repeats: int = 10, timed: bool = True
) -> StepCost:
    """Compiles `step` for `(state, batch)`, reads its FLOPs and times it (median of `repeats`).

    With `timed=False` nothing is compiled: the FLOPs come from the lowered (not yet optimized)
    program and `seconds` is nan.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got repeats={repeats}")
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    lowered = jax.jit(step).lower(state, batch)
    if not timed:
        return StepCost(flops=compiled_flops(lowered), seconds=float("nan"))
    compiled = lowered.compile()
    flops = compiled_flops(compiled)
    jax.block_until_ready(compiled(state, batch))  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(state, batch))
        times.append(time.perf_counter() - start)
    return StepCost(flops=flops, seconds=float(np.median(times)))


def step_costs(
    config: ml_collections.ConfigDict,
    batch: Mapping[str, Any],
    *,
    head: str,
    repeats: int = 10,
    timed: bool = True,
) -> dict[str, StepCost]:
    """Cost of a train step of one mode's config: the engine's step and the trainable-only step.

    Args:
      config: a `transfer_config(...)` (its optimizer groups say what is frozen).
      batch: one training batch `{"image": [B, H, W, C], "label": [B]}`.
      head: the head regex used to build `config`.
      repeats: timed calls per step.
      timed: compile and time the steps; False only counts FLOPs of the unoptimized programs.

    Returns:
      `{"engine": StepCost, "trainable": StepCost}`.
    """
    config = resolve_config(config)
    options = {k: tuple(v) if isinstance(v, list) else v for k, v in config.model_options.to_dict().items()}
    model = cnn.models.create(config.model, num_classes=int(config.num_classes), **options)
    tx, _ = optim_lib.make_optimizer(config.optimizer, steps_per_epoch=1000, total_steps=10**6)
    state = create_train_state(model, tx, rng=0, input_shape=(1,) + tuple(np.shape(batch["image"])[1:]))
    frozen_groups = tuple(
        name for name, spec in config.optimizer.param_groups.to_dict().items() if spec.get("frozen", False)
    )
    labels = param_labels(state.params, head)
    frozen_statistics = bool(config.model_options.get("freeze_statistics", False))
    return {
        "engine": measure_step(steps_lib.make_train_step(), state, batch, repeats=repeats, timed=timed),
        "trainable": measure_step(
            trainable_step(labels, frozen=frozen_groups, frozen_statistics=frozen_statistics), state, batch,
            repeats=repeats, timed=timed,
        ),
    }


def count_by_label(params: Any, labels: Any) -> dict[str, int]:
    """Number of parameter scalars per label (e.g. `{"head": 1290, "trunk": 93_248}`)."""
    counts: dict[str, int] = {}
    for value, label in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(labels)):
        counts[label] = counts.get(label, 0) + int(np.prod(np.shape(value)))
    return counts


__all__ = [
    "HEAD",
    "MODES",
    "TRUNK",
    "FrozenStatistics",
    "StepCost",
    "balanced_subset",
    "compiled_flops",
    "count_by_label",
    "few_label_datasets",
    "head_paths",
    "head_pattern",
    "load_run_variables",
    "load_torchvision_variables",
    "make_optimizer",
    "measure_step",
    "param_labels",
    "step_costs",
    "swap_head",
    "trainable_step",
    "transfer_config",
    "transfer_model",
    "transfer_param_groups",
]
