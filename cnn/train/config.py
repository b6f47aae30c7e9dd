"""The trainer's config: every field `fit` reads, how a partial config is completed and checked,
and the objects built from it (the model, the augmentation hook).

    config = resolve_config(experiment_config)      # default_config() updated field by field
    validate_config(config)                         # before anything is compiled
    model = create_model(config, task)              # built once per run
"""

from __future__ import annotations

import inspect
import pathlib
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from cnn.train import optim, parallel as parallel_lib, steps as steps_lib
from cnn.train.task import Task

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
FREE_FORM_FIELDS = ("model_options", "augment_options", "task_options")


def default_config() -> ml_collections.ConfigDict:
    """Every field `fit` reads, with defaults (experiment configs override what they need)."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.data_seed = -1  # -1: use `seed` for the input order too
    config.dataset = "digits"
    config.data_dir = ""  # "": the loader's default (CNN_DATA_DIR or ~/.cache/cnn/data)
    config.train_split = "train"
    config.eval_split = "test"
    config.num_classes = 10
    config.batch_size = 64  # global, over all devices and processes
    config.eval_batch_size = 0  # 0: batch_size
    config.num_train_steps = 0  # 0: num_epochs * steps_per_epoch
    config.num_epochs = 1.0
    config.model = "simple_cnn"
    config.model_options = ml_collections.ConfigDict()
    config.dtype = "float32"  # computation dtype; "bfloat16" = mixed precision (params/BN stats f32)
    config.parallelism = "auto"  # "single" | "pmap" | "sharded" | "auto"
    config.augment = ""  # a `cnn.data.augment` op factory, e.g. "cifar_standard"; "" for none
    config.augment_options = ml_collections.ConfigDict()  # its keyword arguments
    config.task_options = ml_collections.ConfigDict()  # filled by fit: the task's name and options
    config.optimizer = ml_collections.ConfigDict(
        {
            "name": "sgd",
            "learning_rate": 0.1,
            "momentum": 0.9,
            "nesterov": False,
            "b1": 0.9,
            "b2": 0.999,
            "eps": 1e-8,
            "weight_decay": 0.0,
            "grad_clip_norm": 0.0,
            "schedule": "constant",
            "warmup_steps": 0,
            "warmup_epochs": 0.0,
            "decay_steps": (),
            "decay_epochs": (),
            "decay_factor": 0.1,
            "end_learning_rate": 0.0,
            "param_groups": ml_collections.ConfigDict(),
        }
    )
    # Classification's loss (the default task); GoogLeNet's auxiliary heads weigh aux_weight each.
    config.loss = ml_collections.ConfigDict({"label_smoothing": 0.0, "aux_weight": 0.3})
    config.input_pool = 1  # classification: average-pool images by this factor on device (train and eval)
    config.log_every_steps = 10
    config.eval_every_steps = 0  # 0: once per epoch (and always at the end)
    config.checkpoint = ml_collections.ConfigDict(
        {
            "every_steps": -1,  # -1: with every eval; 0: only the final checkpoint
            "max_to_keep": 3,
            "best_metric": "auto",  # "auto": the task's (eval/accuracy for classification); "" none
            "best_mode": "auto",  # "auto": the task's; else "max" | "min"
            "keep_best": 1,
            "async_save": True,
        }
    )
    # M models trained as one program (cnn.train.ensemble): seeds seed .. seed+M-1 (or `seeds`);
    # data "shared" (paired: same batches for every member) or "per_member" (each its own order);
    # shard "auto" | "member" | "batch": what a "sharded" run splits over the devices.
    config.ensemble = ml_collections.ConfigDict({"size": 1, "seeds": (), "data": "shared", "shard": "auto"})
    config.on_mismatch = "error"  # a workdir made by another config: "error" | "restart" | "extend"
    config.deterministic = True  # GPU: needs XLA_FLAGS=--xla_gpu_deterministic_ops=true (the CLI sets it)
    config.progress = True  # tqdm bar (process 0)
    config.plot = True  # plots/learning_curve.png at the end
    return config


def resolve_config(config: ml_collections.ConfigDict | Mapping[str, Any]) -> ml_collections.ConfigDict:
    """`default_config()` updated with `config`, field by field (nested one level).

    `model_options`, `augment_options`, `task_options` and `optimizer.param_groups` are taken as
    given (they are free-form).

    Raises:
      ValueError: `config` has a field that `default_config()` does not know (a typo); the
        message names the closest known fields.
    """
    import difflib

    merged = default_config().to_dict()
    given = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
    unknown = sorted(set(given) - set(merged))
    if unknown:
        hints = {name: difflib.get_close_matches(name, list(merged), n=2) for name in unknown}
        raise ValueError(f"unknown config fields {unknown} (closest known: {hints}); known fields: {sorted(merged)}")
    for key, value in given.items():
        if isinstance(merged[key], dict) and key not in FREE_FORM_FIELDS:
            value = dict(value or {})
            extra = sorted(set(value) - set(merged[key]))
            if extra:
                raise ValueError(f"unknown config fields {key}.{extra}; known: {sorted(merged[key])}")
            merged[key].update(value)
        else:
            merged[key] = value
    return ml_collections.ConfigDict(merged)


def _known_datasets() -> list[str]:
    import cnn.data

    return sorted(cnn.data.available())


def validate_config(
    config: ml_collections.ConfigDict,
    data_parallel: parallel_lib.DataParallel | None = None,
    *,
    check_optimizer: bool = True,
    check_dataset: bool = True,
) -> None:
    """Checks a resolved config (`resolve_config`) before anything is compiled.

    `check_optimizer=False` leaves the optimizer fields to the caller, which builds the optimizer
    itself before compiling (as `fit` does, once it knows the epoch length); `check_dataset=False`
    skips the dataset name (a run whose data come from its own factory).

    Raises:
      ValueError: an unknown model/dataset/dtype/parallelism/optimizer/augmentation, a batch size
        that does not split over the devices/processes, non-positive step counts. The message
        names the field and what would be valid.
      FileNotFoundError: `config.data_dir` is set but does not exist.
    """
    import cnn.models

    if config.parallelism not in parallel_lib.MODES:
        raise ValueError(f"config.parallelism={config.parallelism!r} is not one of {parallel_lib.MODES}")
    if config.dtype not in DTYPES:
        raise ValueError(f"config.dtype={config.dtype!r} is not one of {sorted(DTYPES)}")
    if config.model.lower() not in cnn.models.available():
        raise ValueError(
            f"config.model={config.model!r} is not a registered model; choose one of {cnn.models.available()}"
        )
    if check_dataset and config.dataset not in _known_datasets():
        raise ValueError(f"config.dataset={config.dataset!r} is unknown; choose one of {_known_datasets()}")
    if config.data_dir and not pathlib.Path(config.data_dir).expanduser().is_dir():
        raise FileNotFoundError(
            f"config.data_dir={config.data_dir!r} does not exist; point it at the directory holding the "
            f"{config.dataset!r} files, or set it to '' to use the default data directory"
        )
    for name in ("num_classes", "batch_size", "log_every_steps"):
        if int(config[name]) < 1:
            raise ValueError(f"config.{name} must be >= 1, got {config[name]}")
    if int(config.num_train_steps) < 0 or (int(config.num_train_steps) == 0 and float(config.num_epochs) <= 0):
        raise ValueError(
            f"set config.num_train_steps > 0 or config.num_epochs > 0 (got {config.num_train_steps}, "
            f"{config.num_epochs})"
        )
    if not 0 <= float(config.loss.label_smoothing) < 1:
        raise ValueError(f"config.loss.label_smoothing must be in [0, 1), got {config.loss.label_smoothing}")
    if config.on_mismatch not in ("error", "restart", "extend"):
        raise ValueError(f"config.on_mismatch={config.on_mismatch!r} must be 'error', 'restart' or 'extend'")
    data_parallel = data_parallel or parallel_lib.DataParallel.create(config.parallelism)
    data_parallel.check_batch_size(int(config.batch_size), "config.batch_size")
    data_parallel.check_batch_size(int(config.eval_batch_size) or int(config.batch_size), "config.eval_batch_size")
    if check_optimizer:  # the optimizer fields (names, schedule, groups) are checked by building it
        optim.make_optimizer(config.optimizer, steps_per_epoch=1000, total_steps=10**9)
    augment_fn_from_config(config)


def model_accepts(name: str, option: str) -> bool:
    """Whether the registered constructor of model `name` takes the keyword `option`."""
    import cnn.models

    parameters = inspect.signature(cnn.models.registry._REGISTRY[name.lower()]).parameters
    return option in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def model_options(config: ml_collections.ConfigDict, task: Task, data_parallel: parallel_lib.DataParallel) -> dict[str, Any]:
    """The constructor arguments of `config.model` for this run: `num_classes` (when the task
    takes it), the task's options, the dtypes (for models that take them), BatchNorm's pmap axis
    (for models that take it) and `config.model_options` (lists as tuples)."""
    options: dict[str, Any] = {"num_classes": int(config.num_classes)} if task.takes_num_classes else {}
    options.update(dict(task.model_options))
    for name, value in (("dtype", DTYPES[config.dtype]), ("param_dtype", jnp.float32)):
        if model_accepts(config.model, name):
            options[name] = value
    if config.dtype != "float32" and not model_accepts(config.model, "dtype"):
        raise ValueError(f"config.dtype={config.dtype!r}: model {config.model!r} has no dtype option; use 'float32'")
    for name, value in data_parallel.model_options().items():
        if model_accepts(config.model, name):
            options[name] = value
    given = config.model_options.to_dict() if hasattr(config.model_options, "to_dict") else dict(config.model_options)
    options.update({k: tuple(v) if isinstance(v, list) else v for k, v in given.items()})
    return options


def create_model(
    config: ml_collections.ConfigDict,
    task: Task,
    data_parallel: parallel_lib.DataParallel,
    input_shape: Sequence[int],
):
    """Builds `config.model` and traces its init abstractly (`jax.eval_shape`, nothing compiled).

    Raises:
      ValueError: the model rejects its options (e.g. an unknown scheme) or the input shape.
    """
    import cnn.models

    options = model_options(config, task, data_parallel)
    try:
        model = cnn.models.create(config.model, **options)
        jax.eval_shape(
            lambda: model.init(
                {"params": jax.random.key(0), "dropout": jax.random.key(1)},
                jnp.zeros(tuple(input_shape), jnp.float32),
                train=False,
            )
        )
    except (TypeError, ValueError, KeyError) as error:
        raise ValueError(
            f"config.model={config.model!r} with config.model_options={dict(config.model_options)} "
            f"was rejected for inputs of shape {tuple(input_shape)}: {error}"
        ) from error
    if data_parallel.mode == "pmap" and not model_accepts(config.model, "bn_axis_name"):
        warnings.warn(
            f"model {config.model!r} does not take bn_axis_name; under pmap its BatchNorm normalizes with "
            "per-device statistics (running statistics are still averaged)",
            stacklevel=2,
        )
    return model


def _augment_factory(name: str):
    """A `cnn.data.augment` op factory by name, or any factory given as "package.module:function"
    (a task's own augmentation, e.g. "cnn.tasks.segmentation.task:segmentation_augmentation")."""
    import importlib

    from cnn.data import augment as augment_module

    if ":" in name:
        module_name, _, attribute = name.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attribute, None)
        except ImportError as error:
            raise ValueError(f"config.augment names {name!r}, whose module cannot be imported: {error}") from error
        if not callable(factory):
            raise ValueError(f"config.augment names {name!r}, but {module_name} has no callable {attribute!r}")
        return factory
    factory = getattr(augment_module, name, None)
    if not callable(factory) or name.startswith("_"):
        names = sorted(n for n in dir(augment_module) if n.startswith("random_") or n.endswith("_standard"))
        raise ValueError(
            f"config.augment={name!r} is not an op factory of cnn.data.augment; e.g. one of {names}, "
            "or 'package.module:function'"
        )
    return factory


def augment_fn_from_config(config: ml_collections.ConfigDict) -> steps_lib.AugmentFn | None:
    """The train-step hook for `config.augment`, or None when it is empty.

    `config.augment` names one op factory (`cnn.data.augment.<name>` or "package.module:function")
    called with `config.augment_options`, or several separated by commas, composed in that order,
    each called with `config.augment_options[<name>]` (default: no arguments).
    """
    if not config.augment:
        return None
    from cnn.data import augment as augment_module

    names = [name.strip() for name in str(config.augment).split(",") if name.strip()]
    given = config.augment_options.to_dict() if hasattr(config.augment_options, "to_dict") else dict(config.augment_options)
    ops = []
    for name in names:
        options = given if len(names) == 1 else dict(given.get(name, {}))
        options = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
        try:
            ops.append(_augment_factory(name)(**options))
        except (TypeError, ValueError) as error:
            raise ValueError(f"config.augment={name!r} rejected its options {options}: {error}") from error
    ops = [op for op in ops if op is not None]  # a factory may return None: nothing to do
    if not ops:
        return None
    return steps_lib.make_augment_fn(ops[0] if len(ops) == 1 else augment_module.compose(ops))


__all__ = [
    "DTYPES",
    "augment_fn_from_config",
    "create_model",
    "default_config",
    "model_accepts",
    "model_options",
    "resolve_config",
    "validate_config",
]
