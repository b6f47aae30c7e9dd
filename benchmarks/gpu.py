"""GPU measurements: ResNet-50 training throughput and MFU in bfloat16, and CIFAR ResNet-20
(Euler and LM) seconds per epoch with the input pipeline included.

    python benchmarks/gpu.py --out results/gpu            # on a GPU machine
    python benchmarks/gpu.py --quick --out /tmp/gpu       # CPU smoke run (tiny sizes)
    python benchmarks/gpu.py --batch-sizes 256 512 --option-sets package latency-hiding autotune-4 \
        --profile --out results/gpu                       # the MFU investigation (RESULTS.md)

ResNet-50 is measured for every batch size x XLA option set (`OPTION_SETS`: per-compilation
`compiler_options`, so one process compares them; "package" is what `cnn.train` compiles with).
Each row also counts, in the optimized HLO, the convolutions, transposes and copies (layout
changes around cuDNN convolutions show up as transposes/copies). `--profile` traces a few steps of
the first row with `jax.profiler` and records the ops that take the most time, per trace line,
and the line's time by kind of work (`kernel_category`: convolutions, reductions, elementwise...).
The CIFAR epoch is timed after an untimed warm-up epoch (`--no-warmup-epoch` to skip it), so
one-time costs (autotuning, allocation) stay out of it.

FLOPs of a train step (forward, backward, optimizer) come from XLA's cost analysis of the
*lowered* (unoptimized) HLO: it counts every convolution on any backend, whereas the cost
analysis of the compiled GPU module does not see convolutions that became cuDNN calls (it
reported 0.1 of ResNet-50's 6.1 TFLOP per step). MFU = FLOPs per step / step time / the chip's
peak dense bf16 rate (H100 SXM and H200: 989 TFLOP/s; other chips: pass --peak-tflops).
Writes gpu.json and gpu.md.
"""

from __future__ import annotations

import collections
import pathlib
import re
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import common  # noqa: E402

from cnn import models  # noqa: E402
from cnn.data import augment  # noqa: E402
from cnn.data.iterator import BatchIterator  # noqa: E402
from cnn.train import parallel, steps  # noqa: E402
from cnn.train.state import create_train_state  # noqa: E402

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}

# XLA options to compare, per compilation. "package" = `cnn.train.default_compiler_options()`
# (None, i.e. XLA's defaults, on GPU). The others are the GPU options worth trying for ResNet-50.
OPTION_SETS: dict[str, dict[str, Any] | None] = {
    "package": None,  # resolved at run time
    "xla-defaults": None,
    "latency-hiding": {"xla_gpu_enable_latency_hiding_scheduler": True},
    "autotune-4": {"xla_gpu_autotune_level": 4},
}


def _peak(device: jax.Device, override: float | None) -> float | None:
    if override:
        return override
    kind = getattr(device, "device_kind", "")
    return next((value for name, value in PEAK_BF16_TFLOPS.items() if name in kind), None)


def _flops(lowered, jitted, *args) -> float:
    """FLOPs of `jitted(*args)` from the cost analysis of its lowered (unoptimized) HLO
    `lowered = jitted.lower(*args)`, where convolutions are still counted. A backend without that
    analysis (the GPU plugin: JAX 0.11 gives None there) gets the same program lowered for the
    CPU, from abstract CPU arguments."""
    analysis = _cost_analysis(lowered)
    if analysis is None or "flops" not in analysis:
        analysis = _cost_analysis(jitted.lower(*_abstract_on_cpu(args)))
    return float(analysis.get("flops", float("nan")))


def _cost_analysis(lowered) -> dict | None:
    try:
        analysis = lowered.cost_analysis()
    except NotImplementedError:  # PJRT plugins without an HLO cost analysis
        return None
    return analysis[0] if isinstance(analysis, (list, tuple)) else analysis


def _abstract_on_cpu(args):
    """`args` as shape/dtype structures placed on the CPU device (nothing is copied)."""
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a), sharding=cpu), args)


def _time_steps(step, state, batches, iterations: int):
    """Median-free wall time of `iterations` steps after the state is ready (device-synchronized)."""
    state, metrics = step(state, batches[0])
    jax.block_until_ready(metrics)
    started = time.perf_counter()
    for i in range(iterations):
        state, metrics = step(state, batches[i % len(batches)])
    jax.block_until_ready((state.params, metrics))
    return (time.perf_counter() - started) / iterations, state


def option_set(name: str) -> dict[str, Any] | None:
    """The `compiler_options` of `OPTION_SETS[name]`."""
    if name not in OPTION_SETS:
        raise ValueError(f"option set {name!r} is not one of {sorted(OPTION_SETS)}")
    return parallel.default_compiler_options() if name == "package" else OPTION_SETS[name]


def hlo_counts(hlo_text: str) -> dict[str, int]:
    """Instructions of an optimized HLO module that matter for layouts: convolutions (XLA's own
    and library calls such as cuDNN's), transposes and copies."""
    counts = collections.Counter()
    for line in hlo_text.splitlines():
        if " = " not in line:
            continue
        op = line.split(" = ", 1)[1]
        if " convolution(" in op:
            counts["convolution"] += 1
        elif "custom-call(" in op and "conv" in op.split("custom_call_target=", 1)[-1][:40].lower():
            counts["convolution"] += 1
        elif " transpose(" in op:
            counts["transpose"] += 1
        elif " copy(" in op or "copy-start(" in op:
            counts["copy"] += 1
        elif "fusion(" in op:
            counts["fusion"] += 1
    return {key: counts[key] for key in ("convolution", "transpose", "copy", "fusion")}


def resnet_throughput(
    name: str,
    batch_size: int,
    image_size: int,
    iterations: int,
    peak_tflops: float | None,
    options: str = "package",
    profile_steps: int = 0,
) -> dict:
    """Images/s and MFU of the full ImageNet-ResNet train step (bf16 compute, f32 params),
    compiled with `OPTION_SETS[options]`; with `profile_steps`, a `jax.profiler` trace of that
    many further steps, summarized by `profile_summary`."""
    model = models.create(name, num_classes=1000, dtype=jnp.bfloat16)
    tx = common.sgd()
    state = create_train_state(model, tx, rng=0, input_shape=(1, image_size, image_size, 3))
    rng = np.random.default_rng(0)
    batches = [
        {
            "image": jax.device_put(rng.integers(0, 256, (batch_size, image_size, image_size, 3), dtype=np.uint8)),
            "label": jax.device_put(rng.integers(0, 1000, (batch_size,), dtype=np.int32)),
        }
        for _ in range(2)
    ]
    compiler_options = option_set(options)
    train_step = jax.jit(steps.make_train_step(), donate_argnums=(0,), compiler_options=compiler_options)
    lowered = train_step.lower(state, batches[0])
    flops = _flops(lowered, train_step, state, batches[0])
    started = time.perf_counter()
    compiled = lowered.compile()
    compile_seconds = time.perf_counter() - started
    seconds, state = _time_steps(compiled, state, batches, iterations)
    result = {
        "model": name,
        "batch_size": batch_size,
        "image_size": image_size,
        "options": options,
        "compiler_options": compiler_options,
        "compile_seconds": compile_seconds,
        "seconds_per_step": seconds,
        "images_per_second": batch_size / seconds,
        "flops_per_step": flops,
        "achieved_tflops": flops / seconds / 1e12,
        "hlo_counts": hlo_counts(compiled.as_text()),
    }
    if peak_tflops:
        result["peak_tflops"] = peak_tflops
        result["mfu"] = result["achieved_tflops"] / peak_tflops
    if profile_steps:
        with tempfile.TemporaryDirectory() as trace_dir:
            with jax.profiler.trace(trace_dir):
                for i in range(profile_steps):
                    state, metrics = compiled(state, batches[i % len(batches)])
                jax.block_until_ready((state.params, metrics))
            result["profile"] = profile_summary(trace_dir, steps=profile_steps)
    return result


def kernel_category(name: str) -> str:
    """The kind of work a GPU trace event does, from its kernel name: a cuDNN/CUTLASS convolution,
    a cuBLAS matrix product (XLA runs some 1x1 convolutions as GEMMs: `nvjet_*`, `*gemm*`), or
    one of XLA's fusions (pooling windows and their scatter gradient, reductions such as
    BatchNorm statistics, elementwise loops), or a copy/memset."""
    lowered = name.lower()
    if "fusion" in lowered:  # XLA's generated kernels ("loop_convert_fusion" is no convolution)
        if "scatter" in lowered or "reduce_window" in lowered:
            return "pooling fusions (max-pool window, its scatter gradient)"
        if "reduce" in lowered:
            return "reduction fusions (BatchNorm statistics, sums)"
        return "elementwise fusions"
    if re.search(r"xmma|cutlass|implicit_gemm|cudnn|conv(?!ert)|wgrad|dgrad|fprop", lowered):
        return "convolutions"
    if any(key in lowered for key in ("gemm", "cublas", "nvjet")):
        return "matrix products"
    if "memcpy" in lowered or "memset" in lowered:
        return "copies and memsets"
    return "other"


# Trace lines that repeat what other lines hold (whole steps or modules, Python frames).
_PROFILE_SKIPPED_LINES = ("Steps", "XLA Modules", "python", "Framework Name Scope", "Framework Ops", "Source code")


def profile_summary(trace_dir: str, *, steps: int, top: int = 12, max_lines: int = 6) -> list[dict]:
    """The trace's busiest lines (GPU streams or op lines; on a CPU, the XLA threads) and on each
    the `top` event names by total time, in ms per step. Reads the `.xplane.pb` that
    `jax.profiler.trace` wrote, with jaxlib's `ProfileData`."""
    from jaxlib import _profile_data  # the reader jax.profiler ships with

    files = sorted(pathlib.Path(trace_dir).rglob("*.xplane.pb"))
    if not files:
        return []
    data = _profile_data.ProfileData.from_file(str(files[-1]))
    lines = []
    for plane in data.planes:
        if plane.name.startswith("/host:") and any(p.name.startswith("/device:") for p in data.planes):
            continue  # on an accelerator, the device planes hold the kernels
        for line in plane.lines:
            if any(line.name.startswith(skip) for skip in _PROFILE_SKIPPED_LINES):
                continue
            totals = collections.Counter()
            for event in line.events:
                totals[event.name] += event.duration_ns
            if totals:
                lines.append((sum(totals.values()), plane.name, line.name, totals))
    lines.sort(key=lambda item: -item[0])
    return [
        {
            "plane": plane,
            "line": line,
            "ms_per_step": total / 1e6 / steps,
            "top": [{"name": name, "ms_per_step": ns / 1e6 / steps} for name, ns in totals.most_common(top)],
            "categories": _categories(totals, steps),
        }
        for total, plane, line, totals in lines[:max_lines]
    ]


def _categories(totals: Mapping[str, int], steps: int, names: int = 3) -> list[dict]:
    """`totals` (ns per event name) summed by `kernel_category`, in ms per step, largest first,
    each with its `names` largest events."""
    by_category = collections.defaultdict(collections.Counter)
    for name, ns in totals.items():
        by_category[kernel_category(name)][name] += ns
    ranked = sorted(by_category.items(), key=lambda item: -sum(item[1].values()))
    return [
        {"category": category, "ms_per_step": sum(events.values()) / 1e6 / steps,
         "events": len(events), "largest": [name for name, _ in events.most_common(names)]}
        for category, events in ranked
    ]


def cifar_epoch(scheme: str, depth: int, num_examples: int, batch_size: int, dtype, warmup_epoch: bool = True) -> dict:
    """Seconds for one epoch of CIFAR ResNet training, host pipeline and on-device pad-crop-flip
    augmentation included (CIFAR-shaped random uint8 data: CIFAR-10 is not on these machines),
    after an untimed warm-up epoch when `warmup_epoch`."""
    rng = np.random.default_rng(0)
    arrays = {
        "image": rng.integers(0, 256, (num_examples, 32, 32, 3), dtype=np.uint8),
        "label": rng.integers(0, 10, (num_examples,), dtype=np.int32),
    }
    iterator = BatchIterator(arrays, batch_size, shuffle=True, seed=0)
    model = models.create("cifar_resnet", depth=depth, scheme=scheme, num_classes=10, dtype=dtype)
    tx = common.sgd()
    state = create_train_state(model, tx, rng=0, input_shape=(1, 32, 32, 3))
    train_step = parallel.compile_single(steps.make_train_step(augment_fn=steps.make_augment_fn(augment.cifar_standard())))

    def epoch(state):
        for _ in range(iterator.steps_per_epoch):
            state, metrics = train_step(state, jax.device_put(next(iterator)))
        jax.block_until_ready((state.params, metrics))
        return state

    started = time.perf_counter()
    state, metrics = train_step(state, jax.device_put(next(iterator)))
    jax.block_until_ready(metrics)
    compile_seconds = time.perf_counter() - started
    warmup_seconds = None
    if warmup_epoch:
        iterator.set_state({"epoch": 1, "step": 0, "seed": 0})
        started = time.perf_counter()
        state = epoch(state)
        warmup_seconds = time.perf_counter() - started
    iterator.set_state({"epoch": 2, "step": 0, "seed": 0})
    started = time.perf_counter()
    state = epoch(state)
    seconds = time.perf_counter() - started
    return {
        "scheme": scheme,
        "depth": depth,
        "examples": num_examples,
        "batch_size": batch_size,
        "steps": iterator.steps_per_epoch,
        "compile_seconds": compile_seconds,
        "warmup_epoch_seconds": warmup_seconds,
        "epoch_seconds": seconds,
        "images_per_second": iterator.steps_per_epoch * batch_size / seconds,
    }


def main(argv: Sequence[str] | None = None) -> dict:
    parser = common.parser(__doc__, "runs/bench")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the chip's peak dense bf16 TFLOP/s")
    parser.add_argument("--batch-sizes", type=common.positive_int, nargs="+", default=None,
                        help="ResNet-50 batch sizes (default 256; quick: 2)")
    parser.add_argument("--option-sets", nargs="+", default=["package"], choices=sorted(OPTION_SETS),
                        help="XLA option sets to compare on ResNet-50 (default: package)")
    parser.add_argument("--iterations", type=common.positive_int, default=None, help="timed ResNet steps (default 20; quick 2)")
    parser.add_argument("--profile", action="store_true", help="trace the first ResNet row and record its top ops")
    parser.add_argument("--no-warmup-epoch", action="store_true", help="time the first CIFAR epoch (no untimed warm-up epoch)")
    parser.add_argument("--skip-cifar", action="store_true", help="ResNet-50 only")
    args = parser.parse_args(argv)
    device = jax.devices()[0]
    record = common.machine_record(args.quick, "gpu.py", argv)
    if args.quick:  # CPU smoke run: a small ResNet, tiny batches
        model, batch_sizes, image_size, iterations = "resnet18", args.batch_sizes or [2], 32, args.iterations or 2
        cifar_args = (8, 256, 64, jnp.float32)
    else:
        model, batch_sizes, image_size, iterations = "resnet50", args.batch_sizes or [256], 224, args.iterations or 20
        cifar_args = (20, 50_000, 128, jnp.bfloat16)
    peak = _peak(device, args.peak_tflops)
    record.update(peak_tflops=peak, resnet_rows=[], cifar_resnet=[])
    # Written after every measurement, so a run cut short keeps what it measured.
    for batch_size in batch_sizes:
        for options in args.option_sets:
            profile_steps = 3 if args.profile and not record["resnet_rows"] else 0
            row = resnet_throughput(model, batch_size, image_size, iterations, peak, options, profile_steps)
            record["resnet_rows"].append(row)
            print(f"{model} batch {batch_size} [{options}]: {row['images_per_second']:.0f} images/s, "
                  f"{row['achieved_tflops']:.1f} TFLOP/s" + (f", MFU {100 * row['mfu']:.1f}%" if "mfu" in row else ""),
                  flush=True)
            write(args.out, record)
    if not args.skip_cifar:
        for scheme in ("euler", "lm"):
            record["cifar_resnet"].append(cifar_epoch(scheme, *cifar_args, warmup_epoch=not args.no_warmup_epoch))
            write(args.out, record)
    print((args.out / "gpu.md").read_text())
    return record


def markdown(record: Mapping[str, Any]) -> str:
    """gpu.md: the ResNet rows, the profile's busiest lines, the CIFAR epochs."""
    rows = record["resnet_rows"]
    text = [f"# GPU benchmarks: {record['device']}", "", common.machine_line(record), ""]
    if rows:
        text.append(common.markdown_table(
            ["model", "batch", "XLA options", "ms/step", "images/s", "TFLOP/step", "TFLOP/s", "MFU",
             "compile s", "convolutions / transposes / copies in optimized HLO"],
            [[r["model"], r["batch_size"], r["options"], f"{1000 * r['seconds_per_step']:.1f}",
              f"{r['images_per_second']:.0f}", f"{r['flops_per_step'] / 1e12:.3f}", f"{r['achieved_tflops']:.1f}",
              f"{100 * r['mfu']:.1f}%" if "mfu" in r else "n/a (unknown peak)", f"{r['compile_seconds']:.1f}",
              "{convolution} / {transpose} / {copy}".format(**r["hlo_counts"])] for r in rows],
        ))
        text += ["", f"{rows[0]['model']}: bf16 compute, float32 parameters, {rows[0]['image_size']}x"
                 f"{rows[0]['image_size']} images; FLOPs from the lowered HLO's cost analysis; MFU against "
                 + (f"{record['peak_tflops']:.0f} TFLOP/s." if record.get("peak_tflops") else "no known peak.")]
        for r in rows:
            for line in r.get("profile", []):
                text += ["", f"Profile of {r['model']} batch {r['batch_size']} [{r['options']}], {line['plane']} / "
                         f"{line['line']}: {line['ms_per_step']:.2f} ms per step", ""]
                text.append(common.markdown_table(
                    ["op", "ms / step"], [[item["name"][:80], f"{item['ms_per_step']:.3f}"] for item in line["top"]]
                ))
                text += ["", common.markdown_table(
                    ["kind of work (all events of the line)", "ms / step", "share", "distinct events", "largest"],
                    [[c["category"], f"{c['ms_per_step']:.3f}", f"{100 * c['ms_per_step'] / line['ms_per_step']:.1f}%",
                      c["events"], ", ".join(name[:40] for name in c["largest"])] for c in line.get("categories", [])],
                )]
    if record["cifar_resnet"]:
        text += ["", common.markdown_table(
            ["network", "scheme", "examples", "batch", "epoch s", "images/s", "warm-up epoch s", "first step (compile) s"],
            [[f"CIFAR ResNet-{c['depth']}", c["scheme"], f"{c['examples']:,}", c["batch_size"], f"{c['epoch_seconds']:.2f}",
              f"{c['images_per_second']:.0f}",
              "not run" if c["warmup_epoch_seconds"] is None else f"{c['warmup_epoch_seconds']:.2f}",
              f"{c['compile_seconds']:.1f}"] for c in record["cifar_resnet"]],
        ), "", "CIFAR-shaped random uint8 data, host BatchIterator + device_put + on-device pad-crop-flip included."]
    return "\n".join(text) + "\n"


def write(out: pathlib.Path, record: Mapping[str, Any]) -> None:
    """gpu.json (everything) and gpu.md (the tables) from what has been measured so far."""
    common.write(out, "gpu", record, markdown(record))


if __name__ == "__main__":
    main()
