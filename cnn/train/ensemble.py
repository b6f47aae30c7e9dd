"""Ensembles: M independently initialized models trained as one compiled program.

    config.ensemble.size = 8                  # members seeded seed, seed + 1, ..., seed + 7
    config.ensemble.data = "shared"           # every member sees the same batches (paired design)
    result = cnn.train.fit(config, "runs/ens")
    one = cnn.train.ensemble.member(result.state, 3)     # an ordinary single-model TrainState

The state carries a leading member axis on every leaf (params, batch_stats, opt_state, step,
rng); the task's train and eval steps are `jax.vmap`ped over it, so M small networks fill an
accelerator (or amortize a CPU's per-op overhead) in one program. Member `i` starts from exactly
the state a single run with seed `seeds[i]` starts from, draws its own dropout keys, and:

* `data="shared"`: sees the batches and augmentation of seed `seeds[0]` (the data order of
  `config.data_seed` when set): members differ only by their init, as paired studies want. Such
  a member equals a single run with `seed=seeds[i]`, `data_seed=seeds[0]`, `augment_seed=seeds[0]`.
* `data="per_member"`: its own shuffle and augmentation, seeded like its single run: member `i`
  equals a single run with `seed=seeds[i]`.

Devices (`config.parallelism`): "single" runs the whole ensemble on one device; "sharded" splits
either the member axis over the devices (`config.ensemble.shard="member"`: each device trains
M/N members, no gradient all-reduce between them; the default when N divides M) or every
member's batch (`"batch"`, as a single run is sharded). "pmap" is not supported for ensembles.

Speed: on an accelerator the members share every launch. On a CPU the arithmetic is the same as
M separate runs: the ResNets' stride-1 convolutions (`cnn.ops.conv_general_dilated`) run once
per member under the vmap instead of as one grouped convolution, which XLA CPU runs up to 3.4x
slower, and an ensemble step then costs what its members' separate steps cost
(benchmarks/RESULTS.md, "Ensembles vs separate runs").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from cnn.ops.conv import MEMBER_AXIS
from cnn.train import parallel as parallel_lib

DATA_MODES = ("shared", "per_member")
SHARD_MODES = ("auto", "member", "batch")


@dataclasses.dataclass(frozen=True)
class Ensemble:
    """The members of an ensemble run: their seeds, how they share data, how they are placed."""

    seeds: tuple[int, ...]
    data: str = "shared"
    shard: str = "member"

    @property
    def size(self) -> int:
        return len(self.seeds)

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, num_devices: int) -> Ensemble | None:
        """The ensemble `config.ensemble` asks for, or None for a single run (size 1, no seeds).

        Raises:
          ValueError: a bad size, seeds that disagree with the size, an unknown data or shard
            mode, or a member axis that does not split over the devices.
        """
        spec = config.ensemble
        size, seeds = int(spec.size), tuple(int(s) for s in spec.seeds)
        if size < 1:
            raise ValueError(f"config.ensemble.size must be >= 1, got {size}")
        if seeds and size not in (1, len(seeds)):
            raise ValueError(f"config.ensemble.seeds has {len(seeds)} seeds but config.ensemble.size={size}")
        if spec.data not in DATA_MODES:
            raise ValueError(f"config.ensemble.data={spec.data!r} must be one of {DATA_MODES}")
        if spec.shard not in SHARD_MODES:
            raise ValueError(f"config.ensemble.shard={spec.shard!r} must be one of {SHARD_MODES}")
        seeds = seeds or tuple(int(config.seed) + i for i in range(size))
        if len(seeds) == 1:
            return None
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"config.ensemble.seeds={seeds} repeats a seed")
        shard = spec.shard
        if shard == "auto":
            shard = "member" if len(seeds) % num_devices == 0 else "batch"
        if shard == "member" and len(seeds) % num_devices:
            raise ValueError(
                f"config.ensemble.shard='member' needs the {len(seeds)} members to split over the {num_devices} "
                "devices; use a multiple of the device count or config.ensemble.shard='batch'"
            )
        return cls(seeds=seeds, data=str(spec.data), shard=shard)


def stack(states: Sequence[Any]) -> Any:
    """Host pytrees of equal structure -> one pytree with a leading member axis."""
    return jax.tree_util.tree_map(lambda *leaves: np.stack([np.asarray(x) for x in leaves]), *states)


def member(state: Any, index: int) -> Any:
    """Member `index` of an ensemble state (or of any member-stacked pytree) as an ordinary one.

    The result is what a single run's `FitResult.state` is: eval, the converter and the
    notebooks take it as is.
    """
    leaves = jax.tree_util.tree_leaves(state)
    size = np.shape(leaves[0])[0] if leaves else 0
    if not 0 <= index < size:
        raise IndexError(f"member index {index} is outside the ensemble of {size} members")
    return jax.tree_util.tree_map(lambda x: np.asarray(x)[index], state)


class MemberBatches:
    """One resumable iterator per member (`data="per_member"`), yielding batches stacked on a
    leading member axis `[members, batch, ...]`."""

    def __init__(self, iterators: Sequence[Any]):
        self.iterators = list(iterators)
        self.steps_per_epoch = self.iterators[0].steps_per_epoch

    def __next__(self) -> dict[str, np.ndarray]:
        return stack([next(iterator) for iterator in self.iterators])

    def __iter__(self):
        return self

    def get_state(self) -> dict[str, Any]:
        return {"members": [iterator.get_state() for iterator in self.iterators]}

    def set_state(self, state: Mapping[str, Any]) -> None:
        positions = state.get("members")
        if positions is None or len(positions) != len(self.iterators):
            raise ValueError(
                f"the checkpoint's input position {dict(state)} is not that of {len(self.iterators)} member iterators "
                "(was the run started with another config.ensemble?)"
            )
        for iterator, position in zip(self.iterators, positions):
            iterator.set_state(position)


def vmap_train_step(train_step: Callable, *, shared_data: bool) -> Callable:
    """`(state[M], batch, augment_rng) -> (state[M], metrics[M])` from a single-model train step
    that takes `(state, batch, augment_rng)`; the batch is shared or has a member axis. The
    vmap's axis is `MEMBER_AXIS`, under which the package convolutions run per member on CPU."""
    return jax.vmap(train_step, in_axes=(0, None if shared_data else 0, None if shared_data else 0),
                    axis_name=MEMBER_AXIS)


def vmap_eval_step(eval_step: Callable) -> Callable:
    """`(state[M], batch) -> sums[M, ...]`: every member on the same evaluation batch."""
    return jax.vmap(eval_step, in_axes=(0, None), axis_name=MEMBER_AXIS)


@dataclasses.dataclass(frozen=True)
class EnsembleParallel:
    """Placement and compilation of ensemble states and batches (the ensemble's `DataParallel`).

    "single": everything on one device. "sharded" + shard "member": state leaves and per-member
    batches split on the member axis, shared batches replicated. "sharded" + shard "batch": the
    state replicated, every batch split on its example axis.
    """

    base: parallel_lib.DataParallel
    ensemble: Ensemble

    @classmethod
    def create(cls, base: parallel_lib.DataParallel, ensemble: Ensemble) -> EnsembleParallel:
        if base.mode == "pmap":
            raise ValueError("config.parallelism='pmap' does not train ensembles; use 'sharded' or 'single'")
        return cls(base, ensemble)

    mode = property(lambda self: self.base.mode)
    axis_name = property(lambda self: None)
    use_shard_map = property(lambda self: False)

    @property
    def num_devices(self) -> int:
        """Devices that share one batch (1 when members, not examples, are split)."""
        return self.base.num_devices if self.ensemble.shard == "batch" else 1

    def model_options(self) -> dict[str, Any]:
        return {}

    def check_batch_size(self, batch_size: int, name: str = "batch_size") -> None:
        if self.ensemble.shard == "batch" or jax.process_count() > 1:
            self.base.check_batch_size(batch_size, name)

    def _sharding(self, spec: PartitionSpec):
        return NamedSharding(self.base.mesh, spec)

    def _state_spec(self) -> PartitionSpec:
        return PartitionSpec(parallel_lib.DATA_AXIS) if self.ensemble.shard == "member" else PartitionSpec()

    def _batch_spec(self, member_axis: bool) -> PartitionSpec:
        axis = parallel_lib.DATA_AXIS
        if self.ensemble.shard == "member":
            return PartitionSpec(axis) if member_axis else PartitionSpec()
        return PartitionSpec(None, axis) if member_axis else PartitionSpec(axis)

    def put_state(self, host_state: Any) -> Any:
        if self.mode == "single":
            return jax.device_put(host_state, jax.local_devices()[0])
        sharding = self._sharding(self._state_spec())
        return jax.tree_util.tree_map(lambda x: jax.device_put(np.asarray(x), sharding), host_state)

    def get_state(self, device_state: Any) -> Any:
        return jax.tree_util.tree_map(_to_numpy, device_state)

    def put_batch(self, batch: Mapping[str, np.ndarray], *, member_axis: bool | None = None) -> dict[str, jax.Array]:
        """A global batch (shared `[b, ...]`, or per member `[M, b, ...]`) on the devices."""
        if member_axis is None:
            member_axis = self.ensemble.data == "per_member"
        if self.mode == "single":
            return jax.device_put(dict(batch), jax.local_devices()[0])
        sharding = self._sharding(self._batch_spec(member_axis))
        return {key: jax.device_put(np.asarray(value), sharding) for key, value in batch.items()}

    def put_augment_rng(self, host_rng: np.ndarray) -> jax.Array:
        """The run keys the members draw augmentation from: member 0's `[2]` for shared data
        (every member draws the same), each member's own `[M, 2]` otherwise."""
        shared = self.ensemble.data == "shared"
        rng = np.asarray(host_rng)[0] if shared else np.asarray(host_rng)
        if self.mode == "single":
            return jax.device_put(rng, jax.local_devices()[0])
        return jax.device_put(rng, self._sharding(PartitionSpec() if shared else self._state_spec()))

    def get_metrics(self, metrics: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Device metrics `[M]` -> numpy arrays `[M]`."""
        return {key: _to_numpy(value) for key, value in metrics.items()}

    def get_eval_outputs(self, outputs: Mapping[str, Any], gather_keys: Sequence[str]) -> dict[str, np.ndarray]:
        """Eval outputs with a leading member axis, as numpy (`[M, ...]`, gathered `[M, b, ...]`)."""
        return {key: _to_numpy(value) for key, value in outputs.items()}

    def _compile(self, step: Callable, *, returns_state: bool, member_batch: bool) -> Callable:
        options = parallel_lib.resolve_compiler_options("auto")
        donate = parallel_lib.donated_arguments() if returns_state else ()
        if self.mode == "single":
            return jax.jit(step, donate_argnums=donate, **options)
        # State, per-member keys and per-member outputs share one sharding (members split or not).
        members = self._sharding(self._state_spec())
        batch = self._sharding(self._batch_spec(member_batch))
        replicated = self._sharding(PartitionSpec())
        in_shardings = (members, batch) if not returns_state else (members, batch, members if member_batch else replicated)
        out_shardings = (members, members) if returns_state else members
        return jax.jit(step, in_shardings=in_shardings, out_shardings=out_shardings, donate_argnums=donate, **options)

    def compile_train(self, train_step: Callable) -> Callable:
        """Compiles a single-model `train_step(state, batch, augment_rng)` vmapped over members."""
        shared = self.ensemble.data == "shared"
        return self._compile(vmap_train_step(train_step, shared_data=shared), returns_state=True,
                             member_batch=not shared)

    def compile_eval(self, eval_step: Callable) -> Callable:
        return self._compile(vmap_eval_step(eval_step), returns_state=False, member_batch=False)


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


__all__ = [
    "DATA_MODES",
    "MEMBER_AXIS",
    "SHARD_MODES",
    "Ensemble",
    "EnsembleParallel",
    "MemberBatches",
    "member",
    "stack",
    "vmap_eval_step",
    "vmap_train_step",
]
