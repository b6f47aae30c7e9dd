"""This package (JAX) against PyTorch on the same card in one run: ResNet-50 steps, CIFAR ResNet epochs, an ensemble.

    python benchmarks/gpu_vs_torch.py --out $OUT                          # a GPU: every group (est. 8-10 min)
    python benchmarks/gpu_vs_torch.py --out $OUT --budget-s 300 --profile cifar20-euler
    python benchmarks/gpu_vs_torch.py --quick --out /tmp/bench            # CPU rehearsal at tiny sizes
    python benchmarks/gpu_vs_torch.py --groups resnet50 cifar56-lm ...    # some groups only

Each framework runs in its own worker process (`--worker jax|torch`, started by this script), so
JAX's and PyTorch's allocators do not compete inside one process: the JAX worker takes
`XLA_PYTHON_CLIENT_MEM_FRACTION` = 0.4 of the GPU and PyTorch is capped at 0.45
(`torch.cuda.set_per_process_memory_fraction`); XLA-flag candidates get their own JAX worker
(XLA_FLAGS is read once per process) that allocates on demand. The script sends every worker its
candidates, then the candidates take turns (A, B, C, A, B, C, ... the order rotating every turn,
as `common.interleaved_seconds_per_step` does), each turn timed inside its worker around the
work and a device synchronization; the reported time is the median over turns. Everything is
synthetic and resident on the device before timing: no host input pipeline in any timed part.

Groups (ids for `--groups`; quick mode: depth 8, tiny sizes, see `settings`):

- `resnet50`: ImageNet ResNet-50 training step, batch 256 of 224x224 uint8 images (two batches
  alternating). JAX: the package's `make_train_step` (bf16 compute, float32 master weights,
  `dtype=bfloat16` as `benchmarks/gpu.py`). PyTorch: torchvision's `resnet50()` (this repo's
  `torch_imagenet_resnet` where torchvision is missing), `channels_last`, bf16 autocast (AMP;
  float32 weights), SGD momentum 0.9, eager and `torch.compile`; `cudnn.benchmark` on.
- `cifar{d}-{scheme}` for d in 20, 56 and Euler / LM: one epoch = 390 steps of 128 (49,920 of
  50,000 images; the last partial batch dropped, as the package's iterator does), bf16 compute.
  JAX, four layouts of the package's step: `scan` (the default model, `nn.scan` stages) and
  `unrolled` (`scan=False`), each stepped by a Python loop (one jitted call per step, the batches
  pre-split on the device: what `cnn.train.fit` does minus its host pipeline) and as an
  `epoch on device` (one jitted call running `jax.lax.scan` over the epoch's 390 steps). PyTorch:
  `benchmarks/torch_cifar_resnet.py` (same network, option-A shortcuts, same LM stepping),
  `channels_last`, bf16 autocast, eager and `torch.compile`. Optional XLA-flag candidates
  on the smallest depth, Euler (`Settings.flag_candidates`; `--no-xla-flag-candidates` drops them).
- `ensemble{M}`: `cnn.train.ensemble`'s vmapped step over M = 8 CIFAR ResNet-20s (shared data)
  against one member (the plain step), both in the Python step loop; epoch time ratio.

Targets (issue 23) are judged in `targets()` and listed first in gpu_vs_torch.md. With `--profile
[GROUP ...]` (default: the smallest-depth CIFAR groups) every candidate of those groups is traced
after its timing: `jax.profiler` (summarized by `gpu.profile_summary`: busiest device lines and
kernels) and `torch.profiler` (its `key_averages` table), with the wall time per step beside the
device's busy time per step (a launch-bound step shows a large gap).

`--budget-s` stops starting new groups after that many seconds (a group in progress finishes);
the record is rewritten after every turn, so a run cut short keeps what it measured. Writes
gpu_vs_torch.json (every sample) and gpu_vs_torch.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import pathlib
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

# ------------------------------------------------------------------------------------ targets

# (threshold, direction): ">=" for speed ratios, "<=" for times and time ratios.
RESNET50_VS_EAGER = 1.2
RESNET50_VS_COMPILE = 1.0
CIFAR_VS_COMPILE = 1.0
RESNET20_EPOCH_SECONDS = 0.5
SCAN_OVER_UNROLLED = 1.1
ENSEMBLE_OVER_ONE = 2.0

# XLA flag sets for separately labelled JAX candidates (each in its own worker process). Both parse
# on a CPU jaxlib too (the flags are registered for every backend) but act only on a GPU:
# "+WHILE,+CONDITIONAL" adds XLA's while loops (nn.scan stages, the epoch's lax.scan) to the kinds
# of work recorded into CUDA graphs (command buffers); "" turns command buffers off.
XLA_FLAG_SETS = {
    "cmdbuf+while": "--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL",
    "cmdbuf-off": "--xla_gpu_enable_command_buffer=",
}
JAX_MEMORY_FRACTION = "0.4"
TORCH_MEMORY_FRACTION = "0.45"

JAX_VARIANTS = {  # key: (scan, loop, label)
    "scan": (True, "python", "JAX scan"),
    "unrolled": (False, "python", "JAX unrolled"),
    "scan-epoch": (True, "device", "JAX scan, epoch on device"),
    "unrolled-epoch": (False, "device", "JAX unrolled, epoch on device"),
}
TORCH_EAGER, TORCH_COMPILE = "torch-eager", "torch-compile"


# ----------------------------------------------------------------------------------- settings


@dataclasses.dataclass(frozen=True)
class Settings:
    """Sizes of one run (GPU defaults, or the `--quick` CPU rehearsal)."""

    quick: bool
    imagenet_depth: int = 50
    imagenet_stage_sizes: tuple[int, ...] | None = None
    imagenet_batch: int = 256
    imagenet_image: int = 224
    imagenet_steps_per_turn: int = 20
    cifar_depths: tuple[int, ...] = (20, 56)
    schemes: tuple[str, ...] = ("euler", "lm")
    cifar_batch: int = 128
    cifar_examples: int = 50_000
    cifar_image: int = 32
    ensemble_members: int = 8
    dtype: str = "bfloat16"
    repeats: int = 3
    torch_compile_backend: str = "inductor"
    # (flag set, JAX variant) pairs run on the smallest depth, for these schemes.
    flag_candidates: tuple[tuple[str, str], ...] = (
        ("cmdbuf+while", "scan"), ("cmdbuf+while", "scan-epoch"), ("cmdbuf-off", "unrolled"),
    )
    flag_schemes: tuple[str, ...] = ("euler",)
    # JAX variants per scheme (all four unless listed).
    variants_by_scheme: tuple[tuple[str, tuple[str, ...]], ...] = ()
    profile_steps: int = 20

    @property
    def cifar_steps(self) -> int:
        return self.cifar_examples // self.cifar_batch

    def variants(self, scheme: str) -> tuple[str, ...]:
        return dict(self.variants_by_scheme).get(scheme, tuple(JAX_VARIANTS))


def settings(args: argparse.Namespace) -> Settings:
    """`Settings` from the command line: `--quick` shrinks every size to a CPU rehearsal (a ResNet-50
    layout with one bottleneck per stage on 32x32 images, CIFAR ResNet-8 on 16x16 with 4 steps per
    epoch, an ensemble of 2, float32 (bf16 autocast convolutions run ~50x slower in PyTorch on a
    CPU without bf16 instructions; `--dtype bfloat16` rehearses them), `torch.compile` with the
    `aot_eager` backend: Dynamo and AOTAutograd
    run, Inductor's C++ code generation, over a minute per network on 2 cores, does not). To stay
    near a minute on 2 cores (each JAX compilation takes 5-10 s there) quick mode runs the Euler
    group with three of the four JAX layouts (`unrolled-epoch` is `scan-epoch`'s code with
    `scan=False`), LM with `scan` only, and one XLA-flag candidate."""
    base = Settings(quick=False)
    if args.quick:
        base = Settings(
            quick=True, imagenet_stage_sizes=(1, 1, 1, 1), imagenet_batch=2, imagenet_image=32,
            imagenet_steps_per_turn=1, cifar_depths=(8,), cifar_batch=16, cifar_examples=64, cifar_image=16,
            ensemble_members=2, dtype="float32", repeats=2, torch_compile_backend="aot_eager",
            flag_candidates=(("cmdbuf+while", "scan"),),
            variants_by_scheme=(("euler", ("scan", "unrolled", "scan-epoch")), ("lm", ("scan",))), profile_steps=2,
        )
    changes = {}
    if args.repeats:
        changes["repeats"] = args.repeats
    if args.dtype:
        changes["dtype"] = args.dtype
    if args.torch_compile_backend:
        changes["torch_compile_backend"] = args.torch_compile_backend
    if args.no_xla_flag_candidates:
        changes["flag_candidates"] = ()
    return dataclasses.replace(base, **changes)


# -------------------------------------------------------------------------------------- plan


@dataclasses.dataclass
class Candidate:
    """One thing timed: `key` (stable id), `label` (for tables), the worker it runs in and its spec."""

    key: str
    label: str
    framework: str  # "jax" | "torch"
    spec: dict[str, Any]
    xla_flag_set: str | None = None

    @property
    def worker_key(self) -> str:
        return self.framework if self.xla_flag_set is None else f"jax@{self.xla_flag_set}"


@dataclasses.dataclass
class Group:
    """Candidates timed against each other: `unit` is "step" or "epoch"; `units_per_turn` of them per turn."""

    id: str
    title: str
    kind: str  # "imagenet" | "cifar" | "ensemble"
    unit: str
    units_per_turn: int
    images_per_unit: int
    steps_per_unit: int
    candidates: list[Candidate]
    depth: int | None = None
    scheme: str | None = None
    members: int | None = None


def plan(s: Settings) -> list[Group]:
    """The groups in priority order (what a run cut short by `--budget-s` keeps): the smallest
    CIFAR depth with the first scheme, the ImageNet ResNet, the smallest depth's other schemes, the
    ensemble, then the deeper CIFAR networks."""
    cifar_common = {"batch": s.cifar_batch, "steps": s.cifar_steps, "image": s.cifar_image, "dtype": s.dtype, "seed": 0}
    small = min(s.cifar_depths)

    def cifar_group(depth: int, scheme: str) -> Group:
        spec = {"kind": "cifar", "depth": depth, "scheme": scheme, "members": 1, **cifar_common}
        candidates = []
        for variant in s.variants(scheme):
            scan, loop, label = JAX_VARIANTS[variant]
            candidates.append(Candidate(variant, label, "jax", {**spec, "scan": scan, "loop": loop}))
        if depth == small and scheme in s.flag_schemes:
            for flag_set, variant in s.flag_candidates:
                if variant in s.variants(scheme):
                    scan, loop, label = JAX_VARIANTS[variant]
                    candidates.append(Candidate(f"{variant}@{flag_set}", f"{label} [XLA {flag_set}]", "jax",
                                                {**spec, "scan": scan, "loop": loop}, xla_flag_set=flag_set))
        candidates.append(Candidate(TORCH_EAGER, "PyTorch eager", "torch", {**spec, "compile": None}))
        candidates.append(Candidate(TORCH_COMPILE, f"PyTorch torch.compile ({s.torch_compile_backend})", "torch",
                                    {**spec, "compile": s.torch_compile_backend}))
        return Group(
            f"cifar{depth}-{scheme}", f"CIFAR ResNet-{depth}, {scheme}: one epoch of {s.cifar_steps * s.cifar_batch:,} "
            f"images ({s.cifar_steps} steps of {s.cifar_batch}, {s.cifar_image}x{s.cifar_image}, {s.dtype}), data on the device",
            "cifar", "epoch", 1, s.cifar_steps * s.cifar_batch, s.cifar_steps, candidates, depth=depth, scheme=scheme,
        )

    layout = "" if s.imagenet_stage_sizes is None else f" layout with stage sizes {s.imagenet_stage_sizes}"
    imagenet_spec = {"kind": "imagenet", "depth": s.imagenet_depth, "stage_sizes": s.imagenet_stage_sizes,
                     "batch": s.imagenet_batch, "image": s.imagenet_image, "dtype": s.dtype, "seed": 0}
    imagenet = Group(
        f"resnet{s.imagenet_depth}",
        f"ImageNet ResNet-{s.imagenet_depth}{layout}: training step, batch {s.imagenet_batch} of "
        f"{s.imagenet_image}x{s.imagenet_image} ({s.dtype} compute, float32 weights), data on the device",
        "imagenet", "step", s.imagenet_steps_per_turn, s.imagenet_batch, 1,
        [
            Candidate("jax", "JAX (package step)", "jax", imagenet_spec),
            Candidate(TORCH_EAGER, "PyTorch AMP eager, channels_last", "torch", {**imagenet_spec, "compile": None}),
            Candidate(TORCH_COMPILE, f"PyTorch AMP torch.compile ({s.torch_compile_backend}), channels_last", "torch",
                      {**imagenet_spec, "compile": s.torch_compile_backend}),
        ],
        depth=s.imagenet_depth,
    )
    members = s.ensemble_members
    member_spec = {"kind": "cifar", "depth": small, "scheme": "euler", "scan": True, "loop": "python", **cifar_common}
    ensemble = Group(
        f"ensemble{members}",
        f"Ensemble of {members} CIFAR ResNet-{small}s (cnn.train.ensemble, shared data) vs one member: one epoch "
        f"({s.cifar_steps} steps of {s.cifar_batch}), scan, Python step loop",
        "ensemble", "epoch", 1, s.cifar_steps * s.cifar_batch, s.cifar_steps,
        [
            Candidate("one", "JAX one member", "jax", {**member_spec, "members": 1}),
            Candidate("ensemble", f"JAX ensemble of {members}", "jax", {**member_spec, "members": members}),
        ],
        depth=small, scheme="euler", members=members,
    )
    firsts = [cifar_group(small, scheme) for scheme in s.schemes]
    groups = firsts[:1] + [imagenet] + firsts[1:] + [ensemble]
    groups += [cifar_group(depth, scheme) for depth in s.cifar_depths if depth != small for scheme in s.schemes]
    return groups


# ------------------------------------------------------------------------------ synthetic data


def synthetic_images(count: int, size: int, *, seed: int = 0, num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """`(uint8 images [count, size, size, 3], int32 labels [count])`, the same bytes in both workers."""
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (count, size, size, 3), dtype=np.uint8),
            rng.integers(0, num_classes, (count,), dtype=np.int32))


def imagenet_batches(spec: Mapping[str, Any]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Two uint8 batches `[batch, size, size, 3]` with labels in 0..999 (steps alternate between them)."""
    return [synthetic_images(spec["batch"], spec["image"], seed=spec["seed"] + i, num_classes=1000) for i in range(2)]


def cifar_arrays(spec: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """The epoch's `steps * batch` images and labels."""
    return synthetic_images(spec["steps"] * spec["batch"], spec["image"], seed=spec["seed"])


# ------------------------------------------------------------------------------- JAX worker


class JaxCandidate:
    """A JAX training loop of the package: `run(units)` runs whole units (epochs or steps) and waits.

    Specs: `{"kind": "imagenet", depth, stage_sizes, batch, image, dtype, seed}` (the step of
    `cnn.models.create("resnet", ...)`), or `{"kind": "cifar", depth, scheme, scan, loop, members,
    batch, steps, image, dtype, seed}`: loop "python" calls one jitted step per batch (batches
    pre-split on the device), loop "device" runs the epoch as one jitted `jax.lax.scan` over steps
    (data `[steps, batch, h, w, 3]` on the device); `members` > 1 vmaps the step over a stacked
    ensemble state (`cnn.train.ensemble.vmap_train_step`, shared data).
    """

    def __init__(self, spec: Mapping[str, Any]):
        import jax
        import jax.numpy as jnp

        import common
        from cnn import models
        from cnn.train import ensemble as ensemble_lib

        self.spec = dict(spec)
        dtype = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}[spec["dtype"]]
        self.members = int(spec.get("members", 1))
        self.loop = spec.get("loop", "python")
        if spec["kind"] == "imagenet":
            options = {} if spec.get("stage_sizes") is None else {"stage_sizes": tuple(spec["stage_sizes"])}
            model = models.create("resnet", depth=spec["depth"], num_classes=1000, dtype=dtype, **options)
            host = imagenet_batches(spec)
            self.steps_per_unit = 1
        else:
            model = common.cifar_model(spec["depth"], spec["scheme"], scan=bool(spec["scan"]), dtype=dtype)
            images, labels = cifar_arrays(spec)
            b = spec["batch"]
            host = [(images[i * b:(i + 1) * b], labels[i * b:(i + 1) * b]) for i in range(spec["steps"])]
            self.steps_per_unit = spec["steps"]
        shape = (1, spec["image"], spec["image"], 3)
        states = [common.random_train_state(model, shape, seed=seed) for seed in range(self.members)]
        self.params_per_member = models.count_params(states[0].params)
        if self.members == 1:
            self.state = states[0]
        else:
            self.state = jax.device_put(ensemble_lib.stack([jax.device_get(s) for s in states]))
        if self.loop == "device":
            self.data = {"image": jax.device_put(np.stack([x for x, _ in host])),
                         "label": jax.device_put(np.stack([y for _, y in host]))}
            self.function = device_epoch_function(self.members > 1)
        else:
            self.batches = [{"image": jax.device_put(x), "label": jax.device_put(y)} for x, y in host]
            self.function = python_step_function(self.members > 1)
        self.cursor = 0
        self.losses = []
        started = time.perf_counter()
        self.run(1 if self.loop == "device" else None, steps=None if self.loop == "device" else 1)
        self.info = {"params_per_member": self.params_per_member, "first_call_seconds": time.perf_counter() - started,
                     "first_call": "one epoch" if self.loop == "device" else "one step", "backend": jax.default_backend()}

    def run(self, units: int | None, steps: int | None = None) -> int:
        """Runs `units` units (or, for a Python loop, `steps` steps); waits; returns the steps run."""
        import jax

        if self.loop == "device":
            for _ in range(units or 1):
                self.state, losses = self.function(self.state, self.data)
                self.losses.append(losses)
            jax.block_until_ready(self.state)
            return (units or 1) * self.steps_per_unit
        count = steps if steps is not None else units * self.steps_per_unit
        metrics = None
        for _ in range(count):
            self.state, metrics = self.function(self.state, self.batches[self.cursor % len(self.batches)])
            self.cursor += 1
        jax.block_until_ready((self.state, metrics))
        return count


def _one_step(ensemble: bool) -> Callable:
    from cnn.train import ensemble as ensemble_lib
    from cnn.train import steps

    train_step = steps.make_train_step()
    if not ensemble:
        return train_step
    vmapped = ensemble_lib.vmap_train_step(train_step, shared_data=True)
    # As benchmarks/ensemble.py: augmentation draws (none here) from member 0's key.
    return lambda state, batch: vmapped(state, batch, state.rng[0])


@functools.lru_cache(maxsize=None)
def python_step_function(ensemble: bool) -> Callable:
    """`jit(step)(state, batch) -> (state, metrics)`, state donated on accelerators, the package's
    XLA options; one object per process, so equal models and shapes share a compilation."""
    import jax

    from cnn.train import parallel

    return jax.jit(_one_step(ensemble), donate_argnums=parallel.donated_arguments(),
                   **parallel.resolve_compiler_options("auto"))


@functools.lru_cache(maxsize=None)
def device_epoch_function(ensemble: bool) -> Callable:
    """`jit(epoch)(state, data) -> (state, losses [steps])`: `jax.lax.scan` of the package's step
    over `data = {"image": [steps, batch, h, w, c], "label": [steps, batch]}`; the whole epoch is
    one device program (no host round trip between steps)."""
    import jax

    from cnn.train import parallel

    step = _one_step(ensemble)

    def epoch(state, data):
        def body(state, batch):
            state, metrics = step(state, batch)
            return state, metrics["loss"]

        return jax.lax.scan(body, state, data)

    return jax.jit(epoch, donate_argnums=parallel.donated_arguments(), **parallel.resolve_compiler_options("auto"))


class Runner:
    """What both workers do with their candidates: set one up, run it for some units."""

    candidates: dict[str, Any]

    def make_candidate(self, spec: Mapping[str, Any]) -> Any:
        raise NotImplementedError

    def setup(self, name: str, spec: Mapping[str, Any]) -> dict:
        self.candidates[name] = self.make_candidate(spec)
        return {"info": self.candidates[name].info}

    def run(self, name: str, units: int) -> dict:
        started = time.perf_counter()
        steps = self.candidates[name].run(units)
        return {"seconds": time.perf_counter() - started, "steps": steps}


class JaxRunner(Runner):
    """The JAX worker's operations (see `worker_main`)."""

    def __init__(self):
        self.candidates: dict[str, JaxCandidate] = {}

    def info(self, argv: Sequence[str], quick: bool) -> dict:
        import common

        record = common.machine_record(quick, "gpu_vs_torch.py", list(argv))
        record["worker_env"] = {k: os.environ.get(k) for k in
                                ("XLA_FLAGS", "XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_PREALLOCATE")}
        return {"record": record}

    def make_candidate(self, spec: Mapping[str, Any]) -> JaxCandidate:
        return JaxCandidate(spec)

    def profile(self, name: str, steps: int, trace_dir: str | None) -> dict:
        import jax

        import gpu

        candidate = self.candidates[name]
        with tempfile.TemporaryDirectory() as scratch:
            directory = trace_dir or scratch
            started = time.perf_counter()
            with jax.profiler.trace(directory):
                ran = candidate.run(1, steps=steps) if candidate.loop == "device" else candidate.run(None, steps=steps)
            wall = time.perf_counter() - started
            lines = gpu.profile_summary(directory, steps=ran, top=8, max_lines=4)
        busiest = max((line["ms_per_step"] for line in lines), default=None)
        return {"profile": {"steps": ran, "wall_ms_per_step": 1000 * wall / ran, "busiest_line_ms_per_step": busiest,
                            "lines": lines}}

    def drop(self, name: str) -> dict:
        self.candidates.pop(name, None)
        return {}


# ----------------------------------------------------------------------------- torch worker


class TorchCandidate:
    """A PyTorch training loop on the same data: `run(units)` runs whole units and synchronizes.

    CIFAR: `torch_cifar_resnet.CifarResNet`; ImageNet: torchvision's `resnet{depth}` (or
    `torch_imagenet_resnet` when torchvision is missing or the stage sizes are overridden).
    `channels_last`, SGD as the package's (`torch_cifar_resnet.sgd`: momentum 0.9, weight decay
    1e-4 on conv and linear weights), bf16 autocast when `dtype` is bfloat16 (float32 weights),
    `torch.compile(net, backend=spec["compile"])` unless `compile` is None. The uint8 images stay
    NHWC on the device; each step views them as NCHW (which is channels_last) and scales to [0, 1].
    """

    def __init__(self, spec: Mapping[str, Any], device: str):
        import torch
        import torch.nn.functional as F
        import torch_cifar_resnet

        self.torch, self.device, self.spec = torch, device, dict(spec)
        torch.manual_seed(spec["seed"])
        self.network_source = "torch_cifar_resnet"
        if spec["kind"] == "imagenet":
            net = None
            if spec.get("stage_sizes") is None:
                try:
                    import torchvision

                    net = getattr(torchvision.models, f"resnet{spec['depth']}")()
                    self.network_source = f"torchvision {torchvision.__version__}"
                except ImportError:
                    pass
            if net is None:
                import torch_imagenet_resnet

                net = torch_imagenet_resnet.resnet(spec["depth"], stage_sizes=spec.get("stage_sizes"))
                self.network_source = "torch_imagenet_resnet (torchvision layout)"
            host = imagenet_batches(spec)
            self.steps_per_unit = 1
        else:
            net = torch_cifar_resnet.CifarResNet(spec["depth"], scheme=spec["scheme"])
            images, labels = cifar_arrays(spec)
            b = spec["batch"]
            host = [(images[i * b:(i + 1) * b], labels[i * b:(i + 1) * b]) for i in range(spec["steps"])]
            self.steps_per_unit = spec["steps"]
        self.params = sum(p.numel() for p in net.parameters())
        net = net.to(device, memory_format=torch.channels_last).train()
        self.optimizer = torch_cifar_resnet.sgd(net)
        self.net = net if spec.get("compile") is None else torch.compile(net, backend=spec["compile"])
        self.batches = [(torch.from_numpy(x).to(device), torch.from_numpy(y.astype(np.int64)).to(device)) for x, y in host]
        autocast = spec["dtype"] == "bfloat16"
        self.autocast = lambda: torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=autocast)
        self.cross_entropy = F.cross_entropy
        self.cursor = 0
        started = time.perf_counter()
        self.run(None, steps=3)  # torch.compile and cuDNN's autotuning happen here
        self.info = {"params": self.params, "first_call_seconds": time.perf_counter() - started,
                     "first_call": "three steps", "network": self.network_source, "device": device}

    def step(self, images_nhwc, labels) -> None:
        images = images_nhwc.permute(0, 3, 1, 2).float().div_(255)  # NCHW view, channels_last memory
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            loss = self.cross_entropy(self.net(images), labels)
        loss.backward()
        self.optimizer.step()

    def run(self, units: int | None, steps: int | None = None) -> int:
        count = steps if steps is not None else units * self.steps_per_unit
        for _ in range(count):
            self.step(*self.batches[self.cursor % len(self.batches)])
            self.cursor += 1
        if self.device == "cuda":
            self.torch.cuda.synchronize()
        return count


class TorchRunner(Runner):
    """The PyTorch worker's operations (see `worker_main`)."""

    def __init__(self):
        import torch

        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest kernels, as JAX's autotuning does
            fraction = float(os.environ.get("GPU_VS_TORCH_MEMORY_FRACTION", TORCH_MEMORY_FRACTION))
            torch.cuda.set_per_process_memory_fraction(fraction)
        else:  # every core this process may use (common.usable_cores, without importing JAX here)
            torch.set_num_threads(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
        self.candidates: dict[str, TorchCandidate] = {}

    def info(self, argv: Sequence[str], quick: bool) -> dict:
        torch = self.torch
        try:
            import torchvision

            vision = torchvision.__version__
        except ImportError:
            vision = None
        cuda = self.device == "cuda"
        return {"record": {
            "torch": torch.__version__, "torchvision": vision, "torch_device": torch.cuda.get_device_name(0) if cuda else "cpu",
            "torch_cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if cuda else None,
            "torch_threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        }}

    def make_candidate(self, spec: Mapping[str, Any]) -> TorchCandidate:
        return TorchCandidate(spec, self.device)

    def profile(self, name: str, steps: int, trace_dir: str | None) -> dict:
        from torch import profiler

        candidate = self.candidates[name]
        cuda = self.device == "cuda"
        activities = [profiler.ProfilerActivity.CPU] + ([profiler.ProfilerActivity.CUDA] if cuda else [])
        started = time.perf_counter()
        with profiler.profile(activities=activities) as prof:
            ran = candidate.run(None, steps=steps)
        wall = time.perf_counter() - started
        averages = prof.key_averages()
        time_key = "self_device_time_total" if cuda else "self_cpu_time_total"
        if cuda and not hasattr(averages[0], time_key):  # torch < 2.4 names it after CUDA
            time_key = "self_cuda_time_total"
        busy_us = sum(getattr(event, time_key, 0) for event in averages) if cuda else None
        table = averages.table(sort_by=time_key, row_limit=12, max_name_column_width=60)
        return {"profile": {"steps": ran, "wall_ms_per_step": 1000 * wall / ran,
                            "busiest_line_ms_per_step": None if busy_us is None else busy_us / 1000 / ran,
                            "table": table}}

    def drop(self, name: str) -> dict:
        self.candidates.pop(name, None)
        if self.device == "cuda":
            self.torch.cuda.empty_cache()
        return {}


def worker_main(framework: str) -> int:
    """A worker: reads one JSON request per line on stdin (`{"op": ..., "args": {...}}`), answers one
    JSON line on the original stdout; anything else printed goes to stderr (the run's log)."""
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # compilers and libraries that print to fd 1 cannot corrupt the replies
    runner: Any = None
    for line in sys.stdin:
        request = json.loads(line)
        op = request["op"]
        try:
            if op == "quit":
                reply = {"ok": True}
            else:
                if runner is None:
                    runner = JaxRunner() if framework == "jax" else TorchRunner()
                reply = {"ok": True, **getattr(runner, op)(**request.get("args", {}))}
        except Exception as error:  # reported to the parent, which records the candidate as failed
            text = traceback.format_exc()
            print(text, file=sys.stderr, flush=True)
            reply = {"ok": False, "error": f"{type(error).__name__}: {error}"[:2000], "traceback": text[-4000:]}
        replies.write(json.dumps(reply, default=_json_default) + "\n")
        if op == "quit":
            break
    return 0


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


# --------------------------------------------------------------------------- worker processes


class WorkerError(RuntimeError):
    """A worker died, or did not answer in time (it is then killed)."""


def _die_with_parent() -> None:  # preexec_fn: the worker gets SIGKILL when this process dies (Linux)
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Worker:
    """One worker process; `send` and `receive` are separate so requests to several workers overlap."""

    def __init__(self, key: str, framework: str, env: Mapping[str, str]):
        self.key, self.framework = key, framework
        self.process = subprocess.Popen(
            [sys.executable, str(HERE / "gpu_vs_torch.py"), "--worker", framework],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env={**os.environ, **env}, preexec_fn=_die_with_parent,
        )
        self.buffer = b""
        self.pending = 0

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def send(self, op: str, **args: Any) -> None:
        try:
            self.process.stdin.write((json.dumps({"op": op, "args": args}) + "\n").encode())
            self.process.stdin.flush()
        except (BrokenPipeError, OSError) as error:
            raise WorkerError(f"worker {self.key} is gone ({error}; exit code {self.process.poll()})") from error
        self.pending += 1

    def receive(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        fd = self.process.stdout.fileno()
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill()
                raise WorkerError(f"worker {self.key} gave no answer within {timeout:.0f} s (killed)")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    raise WorkerError(f"worker {self.key} exited with code {self.process.wait()} (its error is in the log)")
                self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        self.pending -= 1
        return json.loads(line)

    def request(self, timeout: float, op: str, **args: Any) -> dict:
        self.send(op, **args)
        return self.receive(timeout)

    def kill(self) -> None:
        if self.alive:
            self.process.kill()
        self.process.wait()

    def close(self, timeout: float = 10) -> None:
        """Asks an idle worker to quit; kills a busy one (a run cut short must not wait on a compilation)."""
        if self.alive and self.pending == 0:
            try:
                self.request(timeout, "quit")
                self.process.wait(timeout)
            except (WorkerError, subprocess.TimeoutExpired):
                pass
        self.kill()


class WorkerPool:
    """Workers by key ("jax", "torch", "jax@<flag set>"), started on first use, restarted after a death."""

    def __init__(self):
        self.workers: dict[str, Worker] = {}
        self.generation: dict[str, int] = {}

    def env(self, key: str) -> dict[str, str]:
        framework, _, flag_set = key.partition("@")
        if framework == "torch":
            return {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"), "PYTHONUNBUFFERED": "1"}
        flags = [os.environ.get("XLA_FLAGS", "")]
        env = {"PYTHONUNBUFFERED": "1"}
        if flag_set:
            flags.append(XLA_FLAG_SETS[flag_set])
            env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"  # a small extra worker: allocate on demand
        else:
            env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", JAX_MEMORY_FRACTION)
        env["XLA_FLAGS"] = " ".join(f for f in flags if f)
        return env

    def get(self, key: str) -> Worker:
        worker = self.workers.get(key)
        if worker is None or not worker.alive:
            if worker is not None:
                worker.kill()
            self.workers[key] = Worker(key, key.partition("@")[0], self.env(key))
            self.generation[key] = self.generation.get(key, 0) + 1
        return self.workers[key]

    def close(self) -> None:
        for worker in self.workers.values():
            worker.close()


# ----------------------------------------------------------------------------------- the run


def _summary(samples: Sequence[float]) -> dict[str, Any]:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "samples": list(samples)}


def run_group(pool: WorkerPool, group: Group, *, repeats: int, timeout: float, profile: bool, profile_steps: int,
              profile_dir: str | None, save: Callable[[], None], result: dict) -> dict:
    """Sets up every candidate (requests to different workers overlap), times them in rotating
    turns, optionally profiles them, frees them. Fills `result` (part of the record) as it goes."""
    rows = {c.key: {"key": c.key, "label": c.label, "framework": c.framework, "xla_flag_set": c.xla_flag_set,
                    "xla_flags": XLA_FLAG_SETS.get(c.xla_flag_set) if c.xla_flag_set else None,
                    "spec": c.spec, "status": "pending"} for c in group.candidates}
    result["candidates"] = list(rows.values())
    save()
    started_on: dict[str, tuple[Worker, int]] = {}

    def fail(key: str, reason: str) -> None:
        rows[key].update(status="failed", reason=reason)
        print(f"[{group.id}] {key}: FAILED: {reason}", file=sys.stderr, flush=True)

    sent = []
    for c in group.candidates:
        try:
            worker = pool.get(c.worker_key)
            worker.send("setup", name=c.key, spec=c.spec)
            sent.append(c)
            started_on[c.key] = (worker, pool.generation[c.worker_key])
        except WorkerError as error:
            fail(c.key, str(error))
    for c in sent:
        worker, generation = started_on[c.key]
        if pool.generation[c.worker_key] != generation:
            fail(c.key, f"worker {c.worker_key} was restarted before this candidate was set up")
            continue
        try:
            reply = worker.receive(timeout)
        except WorkerError as error:
            fail(c.key, str(error))
            continue
        if reply["ok"]:
            rows[c.key].update(status="ready", setup=reply["info"])
            print(f"[{group.id}] {c.key}: ready ({reply['info']})", file=sys.stderr, flush=True)
        else:
            fail(c.key, reply["error"])
    save()

    def usable(key: str) -> bool:
        worker, generation = started_on.get(key, (None, None))
        if rows[key]["status"] not in ("ready", "ok"):
            return False
        if worker is None or pool.generation[worker.key] != generation or not worker.alive:
            fail(key, "its worker died")
            return False
        return True

    keys = [c.key for c in group.candidates if rows[c.key]["status"] == "ready"]
    samples: dict[str, list[float]] = {key: [] for key in keys}
    for turn in range(repeats):
        order = keys[turn % len(keys):] + keys[: turn % len(keys)] if keys else []
        for key in order:
            if not usable(key):
                continue
            worker = started_on[key][0]
            try:
                reply = worker.request(timeout, "run", name=key, units=group.units_per_turn)
            except WorkerError as error:
                fail(key, str(error))
                continue
            if not reply["ok"]:
                fail(key, reply["error"])
                continue
            samples[key].append(reply["seconds"] / group.units_per_turn)
            timing = _summary(samples[key])
            rows[key].update(status="ok", seconds_per_unit=timing["median"], min=timing["min"], max=timing["max"],
                             samples=timing["samples"], images_per_second=group.images_per_unit / timing["median"])
        save()
    if profile:
        for key in keys:
            if not usable(key):
                continue
            try:
                reply = started_on[key][0].request(
                    timeout, "profile", name=key, steps=profile_steps,
                    trace_dir=None if profile_dir is None else str(pathlib.Path(profile_dir) / f"{group.id}_{key}"))
            except WorkerError as error:
                rows[key]["profile_error"] = str(error)
                continue
            if reply["ok"]:
                rows[key]["profile"] = reply["profile"]
            else:
                rows[key]["profile_error"] = reply["error"]
        save()
    for key, (worker, generation) in started_on.items():
        if worker.alive and pool.generation[worker.key] == generation:
            try:
                worker.request(timeout, "drop", name=key)
            except WorkerError:
                pass
    return result


def run(args: argparse.Namespace, argv: Sequence[str]) -> dict:
    s = settings(args)
    groups = plan(s)
    ids = [g.id for g in groups]
    if args.groups:
        unknown = sorted(set(args.groups) - set(ids))
        if unknown:
            raise ValueError(f"--groups {' '.join(unknown)}: not a group of this run; the groups are {' '.join(ids)}")
        groups = [g for g in groups if g.id in args.groups]
    small = [g.id for g in groups if g.kind == "cifar" and g.depth == min(s.cifar_depths)]
    profiled = set() if args.profile is None else (set(args.profile) or set(small))
    unknown = sorted(profiled - set(ids))
    if unknown:
        raise ValueError(f"--profile {' '.join(unknown)}: not a group of this run; the groups are {' '.join(ids)}")
    started = time.monotonic()
    pool = WorkerPool()
    record: dict[str, Any] = {}
    out = args.out

    def save() -> None:
        record["elapsed_seconds"] = time.monotonic() - started
        write(out, record)

    previous = signal.getsignal(signal.SIGTERM)
    in_main_thread = _in_main_thread()
    if in_main_thread:  # `timeout` sends SIGTERM: leave through `finally`, which stops the workers
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        for key in ("jax", "torch"):
            pool.get(key).send("info", argv=list(argv), quick=s.quick)
        jax_info = pool.get("jax").receive(args.reply_timeout_s)
        if not jax_info["ok"]:
            raise RuntimeError(f"the JAX worker could not start: {jax_info['error']}")
        record.update(jax_info["record"])
        torch_info = pool.get("torch").receive(args.reply_timeout_s)
        record.update(torch_info["record"] if torch_info["ok"] else {"torch": None, "torch_error": torch_info["error"]})
        record.update(settings=dataclasses.asdict(s), repeats=s.repeats, budget_seconds=args.budget_s,
                      xla_flag_sets=XLA_FLAG_SETS, profiled_groups=sorted(profiled), groups=[], targets=[])
        save()
        for group in groups:
            base = {"id": group.id, "title": group.title, "kind": group.kind, "unit": group.unit,
                    "units_per_turn": group.units_per_turn, "images_per_unit": group.images_per_unit,
                    "steps_per_unit": group.steps_per_unit, "depth": group.depth, "scheme": group.scheme,
                    "members": group.members, "repeats": s.repeats}
            if args.budget_s is not None and time.monotonic() - started > args.budget_s:
                record["groups"].append({**base, "status": "skipped",
                                         "reason": f"the budget of {args.budget_s:.0f} s was used up"})
                save()
                continue
            result = {**base, "status": "running"}
            record["groups"].append(result)
            save()
            print(f"=== {group.id}: {group.title}", file=sys.stderr, flush=True)
            run_group(pool, group, repeats=s.repeats, timeout=args.reply_timeout_s, profile=group.id in profiled,
                      profile_steps=s.profile_steps, profile_dir=args.profile_dir, save=save, result=result)
            result["status"] = "done"
            record["targets"] = targets(record)
            save()
            print(group_markdown(result), file=sys.stderr, flush=True)
    finally:
        pool.close()
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
    record["targets"] = targets(record)
    save()
    return record


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


# ------------------------------------------------------------------------------- evaluation


def _rows(group: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    return {row["key"]: row for row in group.get("candidates", []) if row.get("status") == "ok"}


def _target(name: str, value: float | None, threshold: float, direction: str, measured: str, note: str = "") -> dict:
    met = None if value is None else (value >= threshold if direction == ">=" else value <= threshold)
    return {"target": name, "value": value, "threshold": threshold, "direction": direction, "met": met,
            "measured": measured if value is not None else "not measured", "note": note}


def targets(record: Mapping[str, Any]) -> list[dict]:
    """Issue 23's targets judged on the record's groups: one entry per check, `met` True / False,
    or None when a needed candidate did not run. Speed ratios are time(other) / time(JAX)."""
    found = []
    on_gpu = record.get("platform") == "gpu"
    for group in record.get("groups", []):
        rows = _rows(group)
        seconds = {key: row["seconds_per_unit"] for key, row in rows.items()}
        jax_keys = [key for key in seconds if rows[key]["framework"] == "jax"]
        if group["kind"] == "imagenet":
            jax_s = seconds.get("jax")
            for key, threshold, what in ((TORCH_EAGER, RESNET50_VS_EAGER, "PyTorch AMP eager"),
                                         (TORCH_COMPILE, RESNET50_VS_COMPILE, "torch.compile")):
                ratio = seconds[key] / jax_s if jax_s and key in seconds else None
                found.append(_target(f"ResNet-{group['depth']}: JAX images/s / {what} images/s", ratio, threshold, ">=",
                                     f"{ratio:.2f}x" if ratio else ""))
        elif group["kind"] == "cifar":
            name = f"CIFAR ResNet-{group['depth']} {group['scheme']}"
            fastest = min(jax_keys, key=seconds.get) if jax_keys else None
            ratio = seconds[TORCH_COMPILE] / seconds[fastest] if fastest and TORCH_COMPILE in seconds else None
            default = (f"; package default `scan`: {seconds[TORCH_COMPILE] / seconds['scan']:.2f}x"
                       if ratio and "scan" in seconds else "")
            found.append(_target(f"{name}: fastest JAX epoch vs torch.compile (speed ratio)", ratio, CIFAR_VS_COMPILE,
                                 ">=", f"{ratio:.2f}x ({rows[fastest]['label']}){default}" if ratio else ""))
            smallest = min(g["depth"] for g in record["groups"] if g["kind"] == "cifar")
            if group["depth"] == smallest:
                epoch = seconds[fastest] if fastest else None
                note = "" if on_gpu else f"measured on {record.get('device', '?')}, not a GPU: the verdict means nothing"
                if on_gpu and "H100" not in str(record.get("device", "")):
                    note = f"target set for an H100; measured on {record.get('device')}"
                found.append(_target(f"{name}: epoch seconds, fastest JAX (<= 0.5 s on an H100)", epoch,
                                     RESNET20_EPOCH_SECONDS, "<=",
                                     f"{epoch:.3f} s ({rows[fastest]['label']})" if epoch else "", note))
            for scanned, unrolled, loop in (("scan", "unrolled", "Python step loop"),
                                            ("scan-epoch", "unrolled-epoch", "epoch on device")):
                ratio = seconds[scanned] / seconds[unrolled] if scanned in seconds and unrolled in seconds else None
                if ratio is not None or (scanned in [c["key"] for c in group.get("candidates", [])]
                                         and unrolled in [c["key"] for c in group.get("candidates", [])]):
                    found.append(_target(f"{name}: scan / unrolled epoch time, {loop}", ratio, SCAN_OVER_UNROLLED, "<=",
                                         f"{ratio:.2f}x" if ratio else ""))
        elif group["kind"] == "ensemble":
            ratio = seconds["ensemble"] / seconds["one"] if "ensemble" in seconds and "one" in seconds else None
            found.append(_target(f"Ensemble of {group['members']}: epoch time / one member's", ratio, ENSEMBLE_OVER_ONE,
                                 "<=", f"{ratio:.2f}x" if ratio else ""))
    return found


# ---------------------------------------------------------------------------------- markdown


def _verdict(met: bool | None) -> str:
    return "not measured" if met is None else ("**met**" if met else "**missed**")


def group_markdown(group: Mapping[str, Any]) -> str:
    """One group's table: time per unit, throughput, speed vs PyTorch eager / compiled, set-up."""
    lines = [f"### {group['title']}", ""]
    if group.get("status") == "skipped":
        return "\n".join(lines + [f"Skipped: {group['reason']}.", ""])
    rows = _rows(group)
    unit = group["unit"]
    scale, unit_name = (1000, "ms / step") if unit == "step" else (1, "s / epoch")
    reference = {key: rows[key]["seconds_per_unit"] for key in (TORCH_EAGER, TORCH_COMPILE) if key in rows}
    members = group.get("members") or 1
    table = []
    for row in group.get("candidates", []):
        if row.get("status") != "ok":
            table.append([row["label"], row["framework"], f"{row.get('status')}: {row.get('reason', '')}"[:120]] + [""] * 5)
            continue
        t = row["seconds_per_unit"]
        images = row["images_per_second"] * (members if row["key"] == "ensemble" else 1)
        table.append([
            row["label"], row["framework"], f"{scale * t:.4g} ({', '.join(f'{scale * x:.4g}' for x in row['samples'])})",
            f"{images:,.0f}",
            f"{reference[TORCH_EAGER] / t:.2f}x" if TORCH_EAGER in reference else "",
            f"{reference[TORCH_COMPILE] / t:.2f}x" if TORCH_COMPILE in reference else "",
            f"{row['setup']['first_call_seconds']:.1f} ({row['setup']['first_call']})",
            f"{row['setup'].get('params_per_member', row['setup'].get('params', 0)):,}",
        ])
    header = ["candidate", "framework", f"{unit_name}: median (turns)",
              "member-images/s" if group["kind"] == "ensemble" else "images/s", "speed vs PyTorch eager",
              "speed vs torch.compile", "first call s (compile included)", "parameters"]
    lines.append(_table(header, table))
    return "\n".join(lines) + "\n"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    # common.markdown_table, without importing common (JAX, the models) into the parent process.
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell).replace("|", "/") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def profile_markdown(record: Mapping[str, Any]) -> list[str]:
    lines = []
    for group in record.get("groups", []):
        profiled = [row for row in group.get("candidates", []) if row.get("profile")]
        if not profiled:
            continue
        lines += [f"### Profiles: {group['title']}", "",
                  "Wall time per step while traced against the device's busiest line (JAX: the busiest stream or "
                  "op line of the trace; PyTorch: the sum of self device time over all events, GPU only); a wall "
                  "time well above the busy time means the step waits on the host (launches, Python).", ""]
        table = []
        for row in profiled:
            p = row["profile"]
            busy = p.get("busiest_line_ms_per_step")
            top = ""
            if p.get("lines"):
                first = p["lines"][0]
                top = "; ".join(f"{c['category']} {c['ms_per_step']:.3f}" for c in first.get("categories", [])[:4])
            table.append([row["label"], p["steps"], f"{p['wall_ms_per_step']:.3f}",
                          "" if busy is None else f"{busy:.3f}",
                          "" if not busy else f"{100 * busy / p['wall_ms_per_step']:.0f}%", top])
        lines += [_table(["candidate", "steps traced", "wall ms / step", "device busy ms / step", "busy share",
                          "JAX: busiest line by kind of work (ms / step)"], table), ""]
        for row in profiled:
            if row["profile"].get("table"):
                lines += [f"`{row['label']}`, torch.profiler (sorted by self time):", "", "```",
                          row["profile"]["table"].rstrip(), "```", ""]
            for line in row["profile"].get("lines", [])[:1]:
                lines += [f"`{row['label']}`, {line['plane']} / {line['line']}: top events (ms / step): "
                          + ", ".join(f"{e['name'][:60]} {e['ms_per_step']:.3f}" for e in line["top"][:6]), ""]
    return lines


def markdown(record: Mapping[str, Any]) -> str:
    """gpu_vs_torch.md: machine, targets with verdicts, one table per group, profiles."""
    if "device" not in record:
        return "# JAX vs PyTorch: no record yet\n"
    torch_part = (f"; PyTorch {record['torch']} (CUDA {record.get('torch_cuda')}, cuDNN {record.get('cudnn')}), "
                  f"torchvision {record.get('torchvision') or 'not installed: torch_imagenet_resnet used'}"
                  if record.get("torch") else f"; PyTorch unavailable: {record.get('torch_error')}")
    lines = [
        f"# This package (JAX) vs PyTorch on one {record['device']}", "",
        f"{record['cpu']} ({record['cpu_count']} cores, {record['platform']}); JAX {record['jax']}, flax {record['flax']}"
        f"{torch_part}; {record['date']}{' (quick CPU rehearsal: tiny sizes, timings mean nothing)' if record['quick'] else ''}.",
        f"Command: `{record['command']}`", "",
        "## Targets (issue 23)", "",
    ]
    lines.append(_table(["target", "measured", "threshold", "verdict", "note"],
                        [[t["target"], t["measured"], f"{t['direction']} {t['threshold']}", _verdict(t["met"]), t["note"]]
                         for t in record.get("targets", [])]))
    lines += ["", "## Measurements", "",
              f"Median over {record.get('repeats')} turns (all candidates of a group taking turns, the order rotating), "
              "each turn timed inside its worker process around the work and a device synchronization. Speed vs "
              "PyTorch = PyTorch's time / this row's time (> 1: faster than PyTorch). 'first call' includes compilation "
              "(JAX: jit; PyTorch: torch.compile and cuDNN autotuning in its first three steps).", ""]
    for group in record.get("groups", []):
        lines.append(group_markdown(group))
    lines += profile_markdown(record)
    flags = {row["xla_flag_set"]: row["xla_flags"] for g in record.get("groups", []) for row in g.get("candidates", [])
             if row.get("xla_flag_set")}
    if flags:
        lines += ["XLA flag candidates (each in its own JAX process): "
                  + "; ".join(f"`{name}` = `XLA_FLAGS={value}`" for name, value in flags.items())
                  + (". They parse on CPU but act only on a GPU." if not record["platform"] == "gpu" else "."), ""]
    env = record.get("worker_env", {})
    lines += [f"JAX worker: XLA_PYTHON_CLIENT_MEM_FRACTION={env.get('XLA_PYTHON_CLIENT_MEM_FRACTION')}, "
              f"XLA_FLAGS={env.get('XLA_FLAGS') or '(none)'}; PyTorch worker: memory fraction {TORCH_MEMORY_FRACTION} "
              f"on a GPU, {record.get('torch_threads')} threads on a CPU.", ""]
    lines.append(f"Elapsed: {record.get('elapsed_seconds', 0):.0f} s.")
    return "\n".join(lines) + "\n"


def write(out: pathlib.Path, record: Mapping[str, Any]) -> None:
    """gpu_vs_torch.json (everything, every sample) and gpu_vs_torch.md."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_vs_torch.json").write_text(json.dumps(record, indent=2, default=_json_default) + "\n")
    (out / "gpu_vs_torch.md").write_text(markdown(record))


# -------------------------------------------------------------------------------------- main


def parser() -> argparse.ArgumentParser:
    result = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    result.add_argument("--out", type=pathlib.Path, default=pathlib.Path("runs/bench"), help="results directory")
    result.add_argument("--quick", action="store_true", help="tiny sizes: a CPU rehearsal of every code path")
    result.add_argument("--groups", nargs="+", default=None, help="run only these groups (ids as in the docstring)")
    result.add_argument("--repeats", type=_positive_int, default=None, help="turns per candidate (default 3; quick 2)")
    result.add_argument("--dtype", choices=("bfloat16", "float32"), default=None, help="compute dtype (default bfloat16)")
    result.add_argument("--torch-compile-backend", default=None,
                        help="torch.compile backend (default inductor; quick: aot_eager)")
    result.add_argument("--no-xla-flag-candidates", action="store_true", help="no XLA-flag candidates")
    result.add_argument("--profile", nargs="*", default=None, metavar="GROUP",
                        help="profile these groups' candidates (no ids: the smallest-depth CIFAR groups)")
    result.add_argument("--profile-dir", default=None, help="keep the JAX traces here (default: discarded)")
    result.add_argument("--budget-s", type=float, default=None, help="start no new group after this many seconds")
    result.add_argument("--reply-timeout-s", type=float, default=600.0,
                        help="a worker that does not answer a request in this time is killed (default 600)")
    return result


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be an integer >= 1")
    return value


def main(argv: Sequence[str] | None = None) -> dict:
    """Runs the comparison; returns the record (also written to `--out`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    record = run(args, argv)
    print(markdown(record))
    return record


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        sys.exit(worker_main(sys.argv[2]))
    main()
