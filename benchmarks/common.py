"""Helpers shared by the benchmark scripts: arguments, machine record, interleaved timing,
XLA's compiled memory analysis, and writing `<out>/<name>.json` + `<out>/<name>.md`.

Timing rule for every script: this kind of machine is shared and loaded, so whatever is
compared is measured *side by side in one run*: the candidates take turns (A, B, C, A, B, C,
...), each turn timing a few steps, and the reported time per step is the median over turns.
A burst of load then hits every candidate alike instead of one of them.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import importlib
import json
import os
import pathlib
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from cnn import models  # noqa: E402
from cnn.train import optim, parallel, steps  # noqa: E402
from cnn.train.state import TrainState  # noqa: E402

SGD = {"name": "sgd", "learning_rate": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "schedule": "constant"}


# ----------------------------------------------------------------------------------- arguments


def parser(doc: str, default_out: str) -> argparse.ArgumentParser:
    """An argparse parser with the options every script has: `--out DIR`, `--quick`."""
    result = argparse.ArgumentParser(description=doc.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    result.add_argument("--out", type=pathlib.Path, default=pathlib.Path(default_out), help="results directory")
    result.add_argument("--quick", action="store_true", help="tiny sizes: a CPU smoke run in well under a minute")
    return result


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be an integer >= 1")
    return value


# ------------------------------------------------------------------------------------ machine


def usable_cores() -> int:
    """CPU cores this process may run on (respects `taskset`; `os.cpu_count()` does not)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def machine_record(quick: bool, script: str, argv: Sequence[str] | None) -> dict[str, Any]:
    """What the numbers were measured on: device, versions, CPU, load, date, and the command
    (`python benchmarks/<script> <argv>`; `argv=None` means `sys.argv[1:]`)."""
    device = jax.devices()[0]
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    import flax

    return {
        "device": getattr(device, "device_kind", device.platform),
        "platform": device.platform,
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "usable_cores": usable_cores(),
        "load_average_1_5_15min": load,
        "python": platform.python_version(),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "compiler_options": parallel.default_compiler_options(),
        "date": f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        "quick": quick,
        "command": " ".join(
            ["python", f"benchmarks/{script}"] + [shlex.quote(str(a)) for a in (sys.argv[1:] if argv is None else argv)]
        ),
    }


# ----------------------------------------------------------------------------- models, states


@functools.lru_cache(maxsize=None)
def sgd() -> Any:
    """SGD with momentum 0.9, weight decay 1e-4 on kernels, constant learning rate 0.1. One
    object per process: `tx` is a static field of the state, so states built with the same
    optimizer object and equal models share `jit_train_step`'s compilations."""
    tx, _ = optim.make_optimizer(SGD, steps_per_epoch=1, total_steps=1)
    return tx


def random_train_state(model: Any, input_shape: Sequence[int], *, seed: int = 0) -> TrainState:
    """A `TrainState` at step 0 whose variables have the model's shapes, drawn with numpy.

    Kernels are He-normal (conv, fan-out) or LeCun-normal (dense), BatchNorm scales 1 and
    biases 0, running means 0 and variances 1, LM-ResNet knobs `k ~ U[-0.1, 0]`, anything else
    0. The cost of a step does not depend on the values, and this skips compiling `model.init`
    (the slowest compilation of a small model on CPU; `jax.eval_shape` gives the shapes).
    """
    shapes = jax.eval_shape(
        lambda: model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, jnp.zeros(input_shape), train=False)
    )
    generator = np.random.default_rng(seed)

    def fill(path: tuple[Any, ...], leaf: Any) -> jax.Array:
        name = optim.param_path(path).rsplit("/", 1)[-1]
        shape = tuple(leaf.shape)
        if name == "kernel" and len(shape) >= 4:  # conv [(blocks,) kh, kw, in, out]
            value = generator.standard_normal(shape) * np.sqrt(2.0 / (shape[-4] * shape[-3] * shape[-1]))
        elif name == "kernel":  # dense [(blocks,) in, out]
            value = generator.standard_normal(shape) / np.sqrt(shape[-2])
        elif name in ("scale", "var"):
            value = np.ones(shape)
        elif name == "k":
            value = generator.uniform(-0.1, 0.0, shape)
        else:
            value = np.zeros(shape)
        return jnp.asarray(value, leaf.dtype)

    variables = jax.tree_util.tree_map_with_path(fill, shapes)
    return TrainState.from_variables(model.apply, variables, sgd(), seed)


def cifar_model(depth: int, scheme: str, **options: Any) -> Any:
    """`cnn.models.create("cifar_resnet", depth=..., scheme=..., num_classes=10, **options)`,
    one object per configuration and process: a state's `apply_fn` is the bound `model.apply`,
    and bound methods compare equal only for the same module object, so equal configurations
    must share the object to share `jit_train_step`'s compilations (options must be hashable)."""
    return _cifar_model(depth, scheme, tuple(sorted(options.items())))


@functools.lru_cache(maxsize=None)
def _cifar_model(depth: int, scheme: str, options: tuple[tuple[str, Any], ...]) -> Any:
    return models.create("cifar_resnet", depth=depth, scheme=scheme, num_classes=10, **dict(options))


def cifar_state(depth: int, scheme: str, *, image_size: int = 32, channels: int = 3, **options: Any) -> TrainState:
    """`random_train_state` of `cifar_model(depth, scheme, **options)` for `[1, size, size, channels]` input."""
    return random_train_state(cifar_model(depth, scheme, **options), (1, image_size, image_size, channels))


def random_batch(batch_size: int, image_size: int = 32, channels: int = 3, *, seed: int = 0) -> dict[str, np.ndarray]:
    """`{"image": float32 [batch, size, size, channels] in [0, 1], "label": int32 [batch] in 0..9}`."""
    rng = np.random.default_rng(seed)
    return {
        "image": rng.random((batch_size, image_size, image_size, channels), dtype=np.float32),
        "label": rng.integers(0, 10, (batch_size,), dtype=np.int32),
    }


def fresh_jit_train_step(donate: bool = True, xla_defaults: bool = False) -> Callable:
    """The package's full train step (forward, backward, SGD update, BatchNorm statistics),
    jitted with the state donated (its buffers are reused for the new state) and the package's
    XLA options (`cnn.train.default_compiler_options()`; `xla_defaults=True`: XLA's own). A new
    function object each call, so nothing is reused from JAX's compilation cache."""
    options = None if xla_defaults else parallel.default_compiler_options()
    return jax.jit(steps.make_train_step(), donate_argnums=(0,) if donate else (), compiler_options=options)


@functools.lru_cache(maxsize=None)
def jit_train_step(donate: bool = True) -> Callable:
    """`fresh_jit_train_step`, one per process: equal models and batch shapes compile once."""
    return fresh_jit_train_step(donate)


class JaxStepper:
    """Runs a compiled train step `k` times and waits for the result; keeps the state."""

    def __init__(self, compiled: Callable, state: TrainState, batch: Mapping[str, Any]):
        self.compiled, self.state = compiled, state
        self.batch = {k: jax.device_put(v) for k, v in batch.items()}

    def __call__(self, k: int) -> None:
        metrics = None
        for _ in range(k):
            self.state, metrics = self.compiled(self.state, self.batch)
        jax.block_until_ready((self.state.params, metrics))


# ------------------------------------------------- JAX's own convolution gradients (the old default)

_SCANNED_MODEL_MODULES = ("cnn.models.cifar_resnet", "cnn.models.resnet")


@contextlib.contextmanager
def lax_conv_gradients():
    """While active, the ResNets' convolutions are plain `jax.lax.conv_general_dilated`, whose
    gradients come from JAX's transpose rules, instead of `cnn.ops.conv_general_dilated` (same
    values, backward written in XLA CPU's fast layout). Trace (`jitted.lower(...)`) inside the
    block with a fresh `jax.jit`: jit's cache does not see the swap. For measuring what the
    package's convolution buys; the package itself is unchanged."""
    with contextlib.ExitStack() as stack:
        for name in _SCANNED_MODEL_MODULES:
            module = importlib.import_module(name)
            stack.enter_context(mock.patch.object(module, "conv_general_dilated", jax.lax.conv_general_dilated))
        yield


@contextlib.contextmanager
def grouped_member_convolutions():
    """While active, a vmapped package convolution (`cnn.ops.conv_general_dilated` with input and
    kernel both mapped, as in an ensemble) takes JAX's own batching rule, one grouped convolution
    for all members, instead of the per-member loop the package uses on CPU. Trace inside the
    block with a fresh `jax.jit`. For measuring what the loop buys; the package is unchanged."""
    with mock.patch.object(importlib.import_module("cnn.ops.conv"), "_one_per_member", lambda fn: fn):
        yield


# ------------------------------------------------------------------------------------- timing


def interleaved_seconds_per_step(
    runners: Mapping[str, Callable[[int], None]], *, repeats: int, steps_per_repeat: int, warmup: int = 1
) -> dict[str, dict[str, Any]]:
    """Times several candidates in turns and returns each one's seconds per step.

    Args:
      runners: `{name: run}` where `run(k)` performs `k` steps and returns when they are done.
      repeats: number of turns per candidate; candidate order rotates every turn.
      steps_per_repeat: steps timed in one turn.
      warmup: untimed steps per candidate first.

    Returns:
      `{name: {"median": s, "min": s, "max": s, "samples": [s, ...]}}`, seconds per step.
    """
    names = list(runners)
    for name in names:
        runners[name](warmup)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for turn in range(repeats):
        order = names[turn % len(names):] + names[: turn % len(names)]
        for name in order:
            started = time.perf_counter()
            runners[name](steps_per_repeat)
            samples[name].append((time.perf_counter() - started) / steps_per_repeat)
    return {
        name: {
            "median": statistics.median(values),
            "min": min(values),
            "max": max(values),
            "samples": values,
        }
        for name, values in samples.items()
    }


def timed(function: Callable[[], Any]) -> tuple[Any, float]:
    """`(result, wall seconds)` of `function()`, with JAX results waited for."""
    started = time.perf_counter()
    result = jax.block_until_ready(function())
    return result, time.perf_counter() - started


# ------------------------------------------------------------------------------------- memory


def memory_analysis(compiled: Any) -> dict[str, int]:
    """XLA's buffer-assignment sizes of a compiled computation, in bytes.

    `peak_bytes = argument + output + temp - alias`: what the executable needs live at its
    high-water mark (arguments and outputs alive throughout; `temp` is the scratch arena, i.e.
    the activations kept for the backward pass; donated arguments aliased to outputs are counted
    once). This is XLA's static plan, exact for the CPU backend, not a sampled process RSS.
    """
    analysis = compiled.memory_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0]
    if analysis is None:
        raise RuntimeError("this backend offers no compiled memory analysis")
    sizes = {
        "argument_bytes": int(analysis.argument_size_in_bytes),
        "output_bytes": int(analysis.output_size_in_bytes),
        "temp_bytes": int(analysis.temp_size_in_bytes),
        "alias_bytes": int(analysis.alias_size_in_bytes),
        "generated_code_bytes": int(analysis.generated_code_size_in_bytes),
    }
    sizes["peak_bytes"] = sizes["argument_bytes"] + sizes["output_bytes"] + sizes["temp_bytes"] - sizes["alias_bytes"]
    return sizes


def mib(num_bytes: float) -> str:
    """`12.3 MiB`."""
    return f"{num_bytes / 2**20:.1f} MiB"


# ------------------------------------------------------------------------------------ writing


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub Markdown table."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)


def machine_line(record: Mapping[str, Any]) -> str:
    """One Markdown line naming the machine, versions, load and date of a record."""
    load = record.get("load_average_1_5_15min")
    return (
        f"{record['cpu']} ({record['cpu_count']} cores, {record['platform']}), JAX {record['jax']}, "
        f"flax {record['flax']}"
        + (f", torch {record['torch']}" if record.get("torch") else "")
        + (f"; load average at start {load[0]:.1f}" if load else "")
        + f"; {record['date']}{' (quick mode)' if record['quick'] else ''}"
    )


def write(out: pathlib.Path, name: str, record: Mapping[str, Any], markdown: str) -> None:
    """Writes `<out>/<name>.json` (the record) and `<out>/<name>.md` (the table)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(record, indent=2, default=_json_default) + "\n")
    (out / f"{name}.md").write_text(markdown.rstrip() + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, (np.ndarray, jnp.ndarray)):
        return np.asarray(value).tolist()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


__all__ = [
    "JaxStepper",
    "SGD",
    "cifar_model",
    "cifar_state",
    "fresh_jit_train_step",
    "interleaved_seconds_per_step",
    "jit_train_step",
    "lax_conv_gradients",
    "machine_line",
    "machine_record",
    "markdown_table",
    "memory_analysis",
    "mib",
    "parser",
    "positive_int",
    "random_batch",
    "random_train_state",
    "sgd",
    "timed",
    "usable_cores",
    "write",
]
