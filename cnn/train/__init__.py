"""Training engine: train state, jit/pmap/sharded steps, the loop, Orbax checkpoints, multi-host.

    from cnn import train
    result = train.fit(config, "runs/x")             # config: see train.default_config()
    result.final_eval, result.state.params

    # Or assemble a loop yourself:
    tx, schedule = train.make_optimizer(config.optimizer, steps_per_epoch=..., total_steps=...)
    state = train.create_train_state(model, tx, rng=0, input_shape=(1, 32, 32, 3))
    parallel = train.DataParallel.create("auto")       # "single" | "pmap" | "sharded"
    step = parallel.compile_train(train.make_train_step(axis_name=parallel.axis_name))
    device_state = parallel.put_state(state)
    device_state, metrics = step(device_state, parallel.put_batch(batch))

Command line: `python -m cnn.train --config experiments/configs/train_digits.py --workdir runs/x`.
"""

from cnn.train.checkpoint import Checkpointer, restore_state
from cnn.train.loop import (
    FitResult,
    NonFiniteLossError,
    default_config,
    evaluate,
    fit,
    plot_learning_curves,
    resolve_config,
    validate_config,
)
from cnn.train.optim import make_optimizer, make_schedule, param_group_labels, weight_decay_mask
from cnn.train.parallel import DataParallel, is_primary, make_mesh, maybe_initialize_distributed
from cnn.train.state import TrainState, create_train_state
from cnn.train.steps import (
    CPU_COMPILER_OPTIONS,
    compile_pmap,
    compile_sharded,
    compile_single,
    cross_entropy_loss,
    default_compiler_options,
    make_augment_fn,
    make_eval_step,
    make_train_step,
)

__all__ = [
    "CPU_COMPILER_OPTIONS",
    "Checkpointer",
    "DataParallel",
    "FitResult",
    "NonFiniteLossError",
    "TrainState",
    "compile_pmap",
    "compile_sharded",
    "compile_single",
    "create_train_state",
    "cross_entropy_loss",
    "default_compiler_options",
    "default_config",
    "evaluate",
    "fit",
    "is_primary",
    "make_augment_fn",
    "make_eval_step",
    "make_mesh",
    "make_optimizer",
    "make_schedule",
    "make_train_step",
    "maybe_initialize_distributed",
    "param_group_labels",
    "plot_learning_curves",
    "resolve_config",
    "restore_state",
    "validate_config",
    "weight_decay_mask",
]
