"""Learning a dynamical system from trajectories: the `Task` and the data of `cnn.train.fit`.

    task = dynamics(context=1)                                   # a cnn.train.Task
    datasets = window_datasets({"train": make_windows(train, 3), "test": test_trajectories})
    result = cnn.train.fit(config, workdir, task=task, datasets=datasets)   # config.model: "mlp_integrator"
    result.final_eval["rollout_relative_l2"]

Batch: `{"window": [batch, time, *state]}`, float32 true states `x_0 .. x_{time-1}` (`state` is
`[d]` for an ODE, `[height, width, 1]` for a grid field). The model (`cnn.models.dynamics`) starts
from the true `x_0 .. x_context` and predicts the rest on its own predictions. Training windows
are short (`context + 1 + horizon` states: teacher-forced one-step targets for `horizon = 1`);
evaluation windows are whole test trajectories, so the eval sums give the rollout error.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cnn.data import BatchIterator
from cnn.train.task import Task, options_tuple


def _per_example(value: jax.Array) -> jax.Array:
    """Sum over every axis but the batch axis."""
    return jnp.sum(value.reshape(value.shape[0], -1), axis=1)


def dynamics(*, context: int = 0) -> Task:
    """The dynamics task: mean squared error of the predicted states; rollout error in eval.

    Args:
      context: index of the true state the model starts from (`context` true past states seed a
        multistep scheme); passed to the model's constructor as `context`.

    Loss: MSE of `outputs.rollout [batch, horizon, *state]` against `window[:, context + 1:]`.
    Summary (over the eval split, per trajectory from `x_context`): `rollout_relative_l2` =
    ||X_pred - X_true|| / ||X_true||, `rollout_relative_change` = ||X_pred - X_true|| /
    ||X_true - x_context||, `rollout_final_error` = mean over trajectories of |x_pred - x_true| at
    the last time, `one_step_rmse` (teacher-forced, every scalar), `one_step_relative` =
    ||one-step error|| / ||x_{t+1} - x_t||, `count`. A non-finite rollout scores inf.
    """
    if int(context) < 0:
        raise ValueError(f"context={context!r} must be >= 0")
    c = int(context)

    def loss(outputs: Any, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
        target = batch["window"][:, c + 1 :]
        return jnp.mean(jnp.square(outputs.rollout - target)), {}

    def eval_sums(outputs: Any, batch: Mapping[str, jax.Array], weight: jax.Array) -> dict[str, jax.Array]:
        window = batch["window"]
        truth, before = window[:, c + 1 :], window[:, c:-1]
        error, one_step_error = outputs.rollout - truth, outputs.one_step - truth
        real = weight > 0

        def total(per_example: jax.Array) -> jax.Array:  # padding rows count 0, even if not finite
            return jnp.sum(jnp.where(real, per_example * weight, 0.0))

        final = jnp.sqrt(_per_example(jnp.square(error[:, -1])))
        return {
            "rollout_sq": total(_per_example(jnp.square(error))),
            "truth_sq": total(_per_example(jnp.square(truth))),
            "change_sq": total(_per_example(jnp.square(truth - window[:, c : c + 1]))),
            "final_error": total(final),
            "one_step_sq": total(_per_example(jnp.square(one_step_error))),
            "increment_sq": total(_per_example(jnp.square(truth - before))),
            "entries": jnp.sum(weight) * math.prod(truth.shape[1:]),
            "count": jnp.sum(weight),
        }

    return Task(
        name="dynamics",
        options=options_tuple(context=c),
        batch_keys=("window",),
        loss=loss,
        eval_sums=eval_sums,
        summarize=summarize_dynamics,
        best_metric="rollout_relative_l2",
        best_mode="min",
        prepare=dict,  # no image to scale
        augment_keys=(),
        input_key="window",
        model_options=(("context", c),),
        takes_num_classes=False,
        progress_metric="",
    )


def summarize_dynamics(totals: Mapping[str, Any]) -> dict[str, float]:
    """The summary of `dynamics()` from its summed eval entries (non-finite ratios -> inf).

    Raises:
      ValueError: nothing was evaluated (count 0).
    """
    count = float(totals["count"])
    if count <= 0:
        raise ValueError(f"no trajectories were evaluated (count={count})")

    def ratio(numerator: str, denominator: str, root: bool = True) -> float:
        with np.errstate(divide="ignore", invalid="ignore"):
            value = float(np.float64(totals[numerator]) / np.float64(totals[denominator]))
        value = math.sqrt(value) if root and value >= 0 else value
        return value if math.isfinite(value) else math.inf

    return {
        "rollout_relative_l2": ratio("rollout_sq", "truth_sq"),
        "rollout_relative_change": ratio("rollout_sq", "change_sq"),
        "rollout_final_error": ratio("final_error", "count", root=False),
        "one_step_rmse": ratio("one_step_sq", "entries"),
        "one_step_relative": ratio("one_step_sq", "increment_sq"),
        "count": count,
    }


def make_windows(trajectories: np.ndarray, length: int) -> np.ndarray:
    """All windows of `length` consecutive states: `[n, T, ...] -> [n * (T - length + 1), length, ...]`
    (trajectory-major: the windows of trajectory 0 first, by start time)."""
    n, steps = trajectories.shape[:2]
    if not 1 <= length <= steps:
        raise ValueError(f"window length={length} must be in [1, {steps}] (the trajectory length)")
    index = np.arange(steps - length + 1)[:, None] + np.arange(length)[None, :]
    return trajectories[:, index].reshape((-1, length) + trajectories.shape[2:])


def window_datasets(splits: Mapping[str, np.ndarray]) -> Callable[..., BatchIterator]:
    """A `fit(datasets=...)` factory over in-memory windows: `{split: [n, time, *state]}`.

    `factory(split, *, batch_size, shuffle, seed, drop_remainder, num_epochs, shard_index,
    num_shards)` returns a `BatchIterator` of `{"window": float32 [batch, time, *state]}`, whose
    order is a function of `(seed, epoch)`: a resumed run sees the batches it would have seen.

    Raises:
      ValueError: an unknown split (the factory names the known ones).
    """
    arrays = {name: np.asarray(windows, np.float32) for name, windows in splits.items()}
    return functools.partial(_window_iterator, arrays)


def _window_iterator(arrays: Mapping[str, np.ndarray], split: str, *, batch_size: int, **options: Any) -> BatchIterator:
    if split not in arrays:
        raise ValueError(f"split={split!r} is not one of the window splits {sorted(arrays)}")
    return BatchIterator({"window": arrays[split]}, batch_size, **options)


__all__ = ["dynamics", "make_windows", "summarize_dynamics", "window_datasets"]
