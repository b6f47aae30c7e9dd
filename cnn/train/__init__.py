"""Training engine: one loop (`fit`) for every task, jit/pmap/sharded steps, Orbax checkpoints.

    from cnn import train
    result = train.fit(config, "runs/x")                       # classification (the default task)
    result = train.fit(config, "runs/y", task=my_task)         # any train.Task
    result.final_eval, result.state.params
    config.ensemble.size = 8                                   # 8 seeds as one compiled program
    train.ensemble.member(train.fit(config, "runs/z").state, 3)  # member 3 as a single-model state

    # Or assemble a loop yourself:
    tx, schedule = train.make_optimizer(config.optimizer, steps_per_epoch=..., total_steps=...)
    state = train.create_train_state(model, tx, rng=0, input_shape=(1, 32, 32, 3))
    parallel = train.DataParallel.create("auto")       # "single" | "pmap" | "sharded"
    step = parallel.compile_train(train.make_train_step(train.CLASSIFICATION, axis_name=parallel.axis_name))
    device_state = parallel.put_state(state)
    device_state, metrics = step(device_state, parallel.put_batch(batch))

Files: task.py (what differs between tasks), steps.py (the pure steps), parallel.py (devices and
compilation), ensemble.py (members vmapped in one program), config.py (the config `fit` reads),
loop.py (`fit`, `evaluate`), run_log.py (metrics.jsonl, TensorBoard, plots), checkpoint.py
(Orbax), state.py, optim.py.
Command line: `python -m cnn.train --config experiments/configs/train_digits.py --workdir runs/x`.
"""

from cnn.train import ensemble
from cnn.train.checkpoint import Checkpointer, restore_state
from cnn.train.config import DTYPES, default_config, resolve_config, validate_config
from cnn.train.loop import (
    FitResult,
    NonFiniteLossError,
    evaluate,
    fit,
    overlay_variables,
    task_from_config,
)
from cnn.train.optim import make_optimizer, make_schedule, param_group_labels, weight_decay_mask
from cnn.train.parallel import (
    CPU_COMPILER_OPTIONS,
    DataParallel,
    compile_pmap,
    compile_sharded,
    compile_single,
    default_compiler_options,
    is_primary,
    make_mesh,
    maybe_initialize_distributed,
)
from cnn.train.run_log import RunLogger, plot_learning_curves
from cnn.train.state import TrainState, create_train_state
from cnn.train.steps import make_augment_fn, make_eval_step, make_train_step
from cnn.train.task import CLASSIFICATION, PADDING_KEY, Task, classification, cross_entropy_loss

__all__ = [
    "CLASSIFICATION",
    "CPU_COMPILER_OPTIONS",
    "Checkpointer",
    "DTYPES",
    "DataParallel",
    "FitResult",
    "NonFiniteLossError",
    "PADDING_KEY",
    "RunLogger",
    "Task",
    "TrainState",
    "classification",
    "compile_pmap",
    "compile_sharded",
    "compile_single",
    "create_train_state",
    "cross_entropy_loss",
    "default_compiler_options",
    "default_config",
    "ensemble",
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
    "overlay_variables",
    "param_group_labels",
    "plot_learning_curves",
    "resolve_config",
    "restore_state",
    "task_from_config",
    "validate_config",
    "weight_decay_mask",
]
