"""Devices, meshes and processes: where the state and the batches live.

    maybe_initialize_distributed()          # multi-host: jax.distributed.initialize from the env
    parallel = DataParallel.create("auto")  # "single" | "pmap" | "sharded" | "auto"
    step = parallel.compile_train(make_train_step(axis_name=parallel.axis_name))
    device_state = parallel.put_state(host_state)
    device_state, metrics = step(device_state, parallel.put_batch(local_batch))
    host_state = parallel.get_state(device_state)

Multi-host: every process runs the same program on its share of every global batch
(`BatchIterator(shard_index=process_index(), num_shards=process_count())`); the sharded-jit
path assembles the global batch with `jax.make_array_from_process_local_data`, the pmap path
maps over the local devices with collectives spanning all processes (as in flax examples).
Only the primary process (`is_primary()`) writes logs; Orbax coordinates checkpoint writes.

Environment read by `maybe_initialize_distributed` (first found wins):
  CNN_COORDINATOR / JAX_COORDINATOR_ADDRESS   "host:port" of process 0's coordinator
  CNN_NUM_PROCESSES / JAX_NUM_PROCESSES       number of processes
  CNN_PROCESS_ID / JAX_PROCESS_ID             this process's index
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MODES = ("auto", "single", "pmap", "sharded")
PMAP_AXIS = "batch"
DATA_AXIS = "data"

_ENV = {
    "coordinator_address": ("CNN_COORDINATOR", "JAX_COORDINATOR_ADDRESS"),
    "num_processes": ("CNN_NUM_PROCESSES", "JAX_NUM_PROCESSES"),
    "process_id": ("CNN_PROCESS_ID", "JAX_PROCESS_ID"),
}
_initialized = False


def _from_env(names: Sequence[str], environ: Mapping[str, str]) -> str | None:
    for name in names:
        if environ.get(name):
            return environ[name]
    return None


def distributed_settings(environ: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """The `jax.distributed.initialize` arguments the environment asks for, or None.

    Raises:
      ValueError: a coordinator is set but the process count or id is missing or invalid.
    """
    environ = os.environ if environ is None else environ
    address = _from_env(_ENV["coordinator_address"], environ)
    if address is None:
        return None
    raw = {key: _from_env(names, environ) for key, names in _ENV.items() if key != "coordinator_address"}
    missing = [_ENV[key][0] for key, value in raw.items() if value is None]
    if missing:
        raise ValueError(f"coordinator {address!r} is set but {', '.join(missing)} is not; set all three variables")
    num_processes, process_id = int(raw["num_processes"]), int(raw["process_id"])
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise ValueError(
            f"CNN_PROCESS_ID={process_id} must be in [0, CNN_NUM_PROCESSES={num_processes})"
        )
    return {"coordinator_address": address, "num_processes": num_processes, "process_id": process_id}


def maybe_initialize_distributed(environ: Mapping[str, str] | None = None) -> bool:
    """Calls `jax.distributed.initialize` once when the environment names a coordinator.

    Must run before anything touches the JAX backend. Returns True when running multi-process.
    """
    global _initialized
    settings = distributed_settings(environ)
    if settings is None or settings["num_processes"] == 1:
        return False
    if not _initialized:
        jax.distributed.initialize(**settings)
        _initialized = True
    return True


DETERMINISTIC_GPU_FLAG = "--xla_gpu_deterministic_ops=true"


def request_deterministic_gpu(environ: dict[str, str] | None = None) -> None:
    """Adds `--xla_gpu_deterministic_ops=true` to `XLA_FLAGS` (no effect on CPU, deterministic
    anyway). XLA reads the flags when the backend starts, so call this before any JAX array
    exists; the CLI does. Without it, GPU runs are not bit-reproducible (cuDNN/atomic reductions),
    so neither determinism nor exact resume hold there."""
    environ = os.environ if environ is None else environ
    flags = environ.get("XLA_FLAGS", "")
    if "xla_gpu_deterministic_ops" not in flags:
        environ["XLA_FLAGS"] = f"{flags} {DETERMINISTIC_GPU_FLAG}".strip()


def gpu_determinism_missing() -> bool:
    """True on a GPU backend started without `--xla_gpu_deterministic_ops=true`."""
    return jax.default_backend() == "gpu" and DETERMINISTIC_GPU_FLAG not in os.environ.get("XLA_FLAGS", "")


def is_primary() -> bool:
    """True in the process that writes logs, plots and the config (process 0)."""
    return jax.process_index() == 0


def make_mesh(devices: Sequence[jax.Device] | None = None, axis_name: str = DATA_AXIS) -> Mesh:
    """A 1-D mesh over `devices` (default: all devices of all processes) named `axis_name`."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (axis_name,))


def _first_shard(x: Any) -> np.ndarray:
    if isinstance(x, jax.Array):
        return np.asarray(x.addressable_shards[0].data)
    return np.asarray(x)


# ------------------------------------------------------------------------------------------------
# Compilation: one device, pmap, sharded jit


def _donate() -> tuple[int, ...]:
    # Buffer donation saves memory on accelerators; the CPU backend ignores it with a warning.
    return (0,) if jax.default_backend() != "cpu" else ()


# XLA CPU options for every compiled step (benchmarks/RESULTS.md, "XLA CPU options"). In this
# JAX, XLA CPU hands some convolutions and the elementwise fusions to YNNPACK by default, among
# them every kernel-gradient convolution (a whole-image window with the batch as features), which
# YNNPACK runs 2.5-3x slower than XLA's Eigen convolution on 2 cores. Keeping YNNPACK for dots
# and reductions only makes the CIFAR ResNet train step 1.2x (one core) to 1.5x (two cores)
# faster and eval 1.35x, with the same numbers up to rounding.
CPU_COMPILER_OPTIONS: Mapping[str, str] = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE",
}


@functools.lru_cache(maxsize=None)
def _compiler_options_accepted(options: tuple[tuple[str, str], ...]) -> bool:
    # Option names and enum values come and go between XLA versions: probe once per process.
    try:
        jax.jit(lambda x: x + 1, compiler_options=dict(options)).lower(np.float32(0)).compile()
    except (jax.errors.JaxRuntimeError, TypeError, ValueError):
        return False
    return True


def default_compiler_options(backend: str | None = None) -> dict[str, str] | None:
    """The XLA options `compile_single`/`compile_sharded` use by default, or None for XLA's own.

    `CPU_COMPILER_OPTIONS` on the CPU backend when the installed jaxlib accepts them; None on
    GPU/TPU, when the jaxlib rejects them, or when `XLA_FLAGS` already sets one of them (the
    user's flag wins).
    """
    if (backend or jax.default_backend()) != "cpu":
        return None
    flags = os.environ.get("XLA_FLAGS", "")
    if any(f"--{name}" in flags for name in CPU_COMPILER_OPTIONS):
        return None
    if not _compiler_options_accepted(tuple(sorted(CPU_COMPILER_OPTIONS.items()))):
        return None
    return dict(CPU_COMPILER_OPTIONS)


CompilerOptions = Mapping[str, str] | None | str


def donated_arguments() -> tuple[int, ...]:
    """The arguments a compiled train step donates: the state (argument 0), except on CPU."""
    return _donate()


def resolve_compiler_options(compiler_options: CompilerOptions) -> dict[str, Any]:
    """`jax.jit` keyword arguments for `compiler_options` ("auto", None or a mapping)."""
    return _resolve_options(compiler_options)


def _resolve_options(compiler_options: CompilerOptions) -> dict[str, Any]:
    """`jax.jit` keyword arguments for `compiler_options` ("auto", None or a mapping)."""
    if isinstance(compiler_options, str):
        if compiler_options != "auto":
            raise ValueError(f'compiler_options must be "auto", None or a mapping, got {compiler_options!r}')
        compiler_options = default_compiler_options()
    return {"compiler_options": dict(compiler_options)} if compiler_options else {}


def compile_single(
    step_fn: Callable, *, donate_state: bool = True, compiler_options: CompilerOptions = "auto"
) -> Callable:
    """`jax.jit(step_fn)` for one device (state donated on accelerators).

    `compiler_options`: XLA options for this compilation; "auto" is `default_compiler_options()`
    (faster convolution gradients on CPU), None XLA's defaults.
    """
    return jax.jit(step_fn, donate_argnums=_donate() if donate_state else (), **_resolve_options(compiler_options))


def _shard_map(fn, mesh, in_specs, out_specs):
    if hasattr(jax, "shard_map"):
        try:
            return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
        except TypeError:  # older signature
            pass
    from jax.experimental.shard_map import shard_map

    return shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


def pmap_via_shard_map(
    step_fn: Callable, *, axis_name: str, devices: Any = None, compiler_options: CompilerOptions = "auto"
) -> Callable:
    """A `jax.pmap(step_fn, axis_name)` look-alike built on `shard_map` + `jit`.

    Same calling convention as pmap (every argument carries a leading device axis; collectives
    over `axis_name` work inside `step_fn`), for JAX versions where `jax.pmap` is deprecated or
    removed. Single-process only: `devices` (default: local devices) form a 1-D mesh.
    """
    devices = np.asarray(jax.local_devices() if devices is None else devices)
    mesh = Mesh(devices, (axis_name,))
    spec = PartitionSpec(axis_name)

    def per_device(*args):
        squeezed = jax.tree_util.tree_map(lambda x: x[0], args)
        return jax.tree_util.tree_map(lambda x: x[None], step_fn(*squeezed))

    @functools.wraps(step_fn)
    def wrapper(*args):
        mapped = _shard_map(per_device, mesh, in_specs=(spec,) * len(args), out_specs=spec)
        return mapped(*args)

    return jax.jit(wrapper, **_resolve_options(compiler_options))


def compile_pmap(
    step_fn: Callable, *, axis_name: str = "batch", use_shard_map: bool | None = None, donate_state: bool = True
) -> Callable:
    """The pmap-compiled step: state replicated, batch `[local_devices, batch/devices, ...]`.

    `step_fn` must be built with the same `axis_name` (e.g. `make_train_step(axis_name="batch")`).
    Uses `jax.pmap` when the installed JAX has it (jax 0.10/0.11 implement it on `jit` +
    `shard_map` themselves); `use_shard_map=True` (or a JAX without `pmap`) uses
    `pmap_via_shard_map`, which keeps the same API (and, unlike `jax.pmap`, takes
    `default_compiler_options()`).
    """
    if use_shard_map is None:
        use_shard_map = not hasattr(jax, "pmap")
    if use_shard_map:
        return pmap_via_shard_map(step_fn, axis_name=axis_name)
    return jax.pmap(step_fn, axis_name=axis_name, donate_argnums=_donate() if donate_state else ())


def compile_sharded(
    step_fn: Callable,
    mesh: Mesh,
    *,
    data_axis: str = "data",
    returns_state: bool = True,
    compiler_options: CompilerOptions = "auto",
) -> Callable:
    """`jax.jit` with the state replicated and the batch sharded over `mesh` axis `data_axis`.

    Args:
      step_fn: `train_step` (returns `(state, metrics)`) or `eval_step` (returns metrics; pass
        `returns_state=False`), written for the global batch (no axis name).
      mesh: the device mesh (`cnn.train.parallel.make_mesh`).
      compiler_options: as in `compile_single`.
    """
    replicated = NamedSharding(mesh, PartitionSpec())
    batch_sharding = NamedSharding(mesh, PartitionSpec(data_axis))
    out_shardings = (replicated, replicated) if returns_state else replicated
    return jax.jit(
        step_fn,
        in_shardings=(replicated, batch_sharding),
        out_shardings=out_shardings,
        donate_argnums=_donate() if returns_state else (),
        **_resolve_options(compiler_options),
    )


@dataclass(frozen=True)
class DataParallel:
    """How a run places its state and batches, and compiles its steps.

    Attributes:
      mode: "single" (one device), "pmap" (replicated state, per-device batch slices) or
        "sharded" (jit over a mesh; batch sharded over `"data"`, state replicated).
      mesh: the mesh of the sharded mode (and the local-device mesh used to place pmap inputs).
    """

    mode: str
    mesh: Mesh | None = None
    use_shard_map: bool = False

    @classmethod
    def create(cls, mode: str = "auto", *, use_shard_map: bool = False) -> DataParallel:
        """Picks the devices: "auto" is "sharded" with more than one device, else "single"."""
        if mode not in MODES:
            raise ValueError(f"parallelism={mode!r} is not one of {MODES}")
        if mode == "auto":
            mode = "sharded" if jax.device_count() > 1 else "single"
        if mode == "single" and jax.process_count() > 1:
            raise ValueError(
                "parallelism='single' cannot run with several processes; use 'sharded' or 'pmap'"
            )
        if mode == "sharded":
            return cls(mode, make_mesh())
        if mode == "pmap":
            return cls(mode, make_mesh(jax.local_devices(), PMAP_AXIS), use_shard_map=use_shard_map)
        return cls(mode)

    @property
    def axis_name(self) -> str | None:
        """The collective axis a pmap step must be built with (None otherwise)."""
        return PMAP_AXIS if self.mode == "pmap" else None

    @property
    def num_devices(self) -> int:
        """Devices that share one global batch."""
        return 1 if self.mode == "single" else jax.device_count()

    @property
    def num_local_devices(self) -> int:
        return 1 if self.mode == "single" else jax.local_device_count()

    def model_options(self) -> dict[str, Any]:
        """Extra model options this mode needs: BatchNorm sync across the pmap axis."""
        return {"bn_axis_name": PMAP_AXIS} if self.mode == "pmap" else {}

    def check_batch_size(self, batch_size: int, name: str = "batch_size") -> None:
        """Raises ValueError unless the global batch splits evenly over devices and processes."""
        for count, what in ((self.num_devices, "devices"), (jax.process_count(), "processes")):
            if batch_size % count:
                raise ValueError(
                    f"{name}={batch_size} is not divisible by the {count} {what} of parallelism="
                    f"{self.mode!r}; use a multiple of {count} (e.g. {count * max(1, round(batch_size / count))})"
                    + (" or parallelism='single'" if what == "devices" else "")
                )

    # --- placement -------------------------------------------------------------------------

    def put_state(self, host_state: Any) -> Any:
        """Host (numpy) state -> the mode's layout (replicated for pmap and sharded)."""
        if self.mode == "single":
            return jax.device_put(host_state, jax.local_devices()[0])
        if self.mode == "pmap":
            sharding = NamedSharding(self.mesh, PartitionSpec(PMAP_AXIS))
            n = self.num_local_devices
            return jax.tree_util.tree_map(
                lambda x: jax.device_put(np.stack([np.asarray(x)] * n), sharding), host_state
            )
        replicated = NamedSharding(self.mesh, PartitionSpec())
        return jax.tree_util.tree_map(
            lambda x: jax.make_array_from_process_local_data(replicated, np.asarray(x)), host_state
        )

    def get_state(self, device_state: Any) -> Any:
        """The mode's layout -> one numpy copy (replica 0) on the host."""
        if self.mode == "pmap":
            return jax.tree_util.tree_map(lambda x: _first_shard(x)[0], device_state)
        return jax.tree_util.tree_map(_first_shard, device_state)

    def put_batch(self, local_batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's rows of a global batch -> the mode's layout.

        single: as is; pmap: `[local_devices, rows / local_devices, ...]`; sharded: one global
        array per key, sharded over the "data" axis (rows of process i come i-th).
        """
        if self.mode == "single":
            return jax.device_put(dict(local_batch), jax.local_devices()[0])
        if self.mode == "pmap":
            n = self.num_local_devices
            sharding = NamedSharding(self.mesh, PartitionSpec(PMAP_AXIS))

            def split(x):
                x = np.asarray(x)
                if x.shape[0] % n:
                    raise ValueError(f"a local batch of {x.shape[0]} rows does not split over {n} local devices")
                return jax.device_put(x.reshape((n, x.shape[0] // n) + x.shape[1:]), sharding)

            return {key: split(value) for key, value in local_batch.items()}
        sharding = NamedSharding(self.mesh, PartitionSpec(DATA_AXIS))
        processes = jax.process_count()
        return {
            key: jax.make_array_from_process_local_data(
                sharding, np.asarray(value), (np.shape(value)[0] * processes,) + np.shape(value)[1:]
            )
            for key, value in local_batch.items()
        }

    def get_metrics(self, metrics: Any) -> dict[str, float]:
        """Device metrics (replicated) -> python floats."""
        if self.mode == "pmap":
            return {key: float(_first_shard(value)[0]) for key, value in metrics.items()}
        return {key: float(_first_shard(value)) for key, value in metrics.items()}

    def get_eval_outputs(self, outputs: Mapping[str, Any], gather_keys: Sequence[str]) -> dict[str, np.ndarray]:
        """An eval step's outputs -> numpy: summed entries as one value (replica 0), `gather_keys`
        entries as `[global batch, ...]` arrays in example order (all devices, all processes)."""
        fetched = {}
        for key, value in outputs.items():
            if key not in gather_keys:
                fetched[key] = _first_shard(value)[0] if self.mode == "pmap" else _first_shard(value)
                continue
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils

                value = multihost_utils.process_allgather(value, tiled=self.mode != "pmap")
            array = np.asarray(value)
            fetched[key] = array.reshape((-1,) + array.shape[2:]) if self.mode == "pmap" else array
        return fetched

    # --- compilation -----------------------------------------------------------------------

    def compile_train(self, train_step: Any) -> Any:
        """Compiles `train_step(state, batch) -> (state, metrics)` for this mode."""
        if self.mode == "single":
            return compile_single(train_step)
        if self.mode == "pmap":
            return compile_pmap(train_step, axis_name=PMAP_AXIS, use_shard_map=self.use_shard_map)
        return compile_sharded(train_step, self.mesh, data_axis=DATA_AXIS)

    def compile_eval(self, eval_step: Any) -> Any:
        """Compiles `eval_step(state, batch) -> metrics` for this mode."""
        if self.mode == "single":
            return compile_single(eval_step, donate_state=False)
        if self.mode == "pmap":
            return compile_pmap(
                eval_step, axis_name=PMAP_AXIS, use_shard_map=self.use_shard_map, donate_state=False
            )
        return compile_sharded(eval_step, self.mesh, data_axis=DATA_AXIS, returns_state=False)


__all__ = [
    "CPU_COMPILER_OPTIONS",
    "DATA_AXIS",
    "MODES",
    "PMAP_AXIS",
    "DataParallel",
    "distributed_settings",
    "is_primary",
    "make_mesh",
    "maybe_initialize_distributed",
    "request_deterministic_gpu",
    "compile_pmap",
    "compile_sharded",
    "compile_single",
    "default_compiler_options",
    "pmap_via_shard_map",
]
