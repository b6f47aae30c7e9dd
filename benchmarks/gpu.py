"""GPU measurements: ResNet-50 training throughput and MFU in bfloat16, and CIFAR ResNet-20
(Euler and LM) seconds per epoch with the input pipeline included.

    python benchmarks/gpu.py --out results/gpu            # on a GPU machine
    python benchmarks/gpu.py --quick --out /tmp/gpu       # CPU smoke run (tiny sizes)

FLOPs of a train step (forward, backward, optimizer) come from XLA's cost analysis of the
*lowered* (unoptimized) HLO: it counts every convolution on any backend, whereas the cost
analysis of the compiled GPU module does not see convolutions that became cuDNN calls (it
reported 0.1 of ResNet-50's 6.1 TFLOP per step). MFU = FLOPs per step / step time / the chip's
peak dense bf16 rate (H100 SXM and H200: 989 TFLOP/s; other chips: pass --peak-tflops).
Writes gpu.json and gpu.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from cnn import models  # noqa: E402
from cnn.data import augment  # noqa: E402
from cnn.data.iterator import BatchIterator  # noqa: E402
from cnn.train import optim, steps  # noqa: E402
from cnn.train.state import create_train_state  # noqa: E402

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def _peak(device: jax.Device, override: float | None) -> float | None:
    if override:
        return override
    kind = getattr(device, "device_kind", "")
    return next((value for name, value in PEAK_BF16_TFLOPS.items() if name in kind), None)


def _sgd():
    config = {"name": "sgd", "learning_rate": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "schedule": "constant"}
    return optim.make_optimizer(config, steps_per_epoch=1, total_steps=1)


def _flops(lowered) -> float:
    """FLOPs of a lowered computation (unoptimized HLO: convolutions are still counted)."""
    analysis = lowered.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0]
    return float(analysis.get("flops", float("nan")))


def _time_steps(step, state, batches, iterations: int):
    """Median-free wall time of `iterations` steps after the state is ready (device-synchronized)."""
    state, metrics = step(state, batches[0])
    jax.block_until_ready(metrics)
    started = time.perf_counter()
    for i in range(iterations):
        state, metrics = step(state, batches[i % len(batches)])
    jax.block_until_ready((state.params, metrics))
    return (time.perf_counter() - started) / iterations, state


def resnet_throughput(
    name: str, batch_size: int, image_size: int, iterations: int, peak_tflops: float | None
) -> dict:
    """Images/s and MFU of the full ImageNet-ResNet train step (bf16 compute, f32 params)."""
    model = models.create(name, num_classes=1000, dtype=jnp.bfloat16)
    tx, _ = _sgd()
    state = create_train_state(model, tx, rng=0, input_shape=(1, image_size, image_size, 3))
    rng = np.random.default_rng(0)
    batches = [
        {
            "image": jax.device_put(rng.integers(0, 256, (batch_size, image_size, image_size, 3), dtype=np.uint8)),
            "label": jax.device_put(rng.integers(0, 1000, (batch_size,), dtype=np.int32)),
        }
        for _ in range(2)
    ]
    train_step = jax.jit(steps.make_train_step(), donate_argnums=(0,))
    lowered = train_step.lower(state, batches[0])
    flops = _flops(lowered)
    started = time.perf_counter()
    compiled = lowered.compile()
    compile_seconds = time.perf_counter() - started
    seconds, _ = _time_steps(compiled, state, batches, iterations)
    result = {
        "model": name,
        "batch_size": batch_size,
        "image_size": image_size,
        "compile_seconds": compile_seconds,
        "seconds_per_step": seconds,
        "images_per_second": batch_size / seconds,
        "flops_per_step": flops,
        "achieved_tflops": flops / seconds / 1e12,
    }
    if peak_tflops:
        result["peak_tflops"] = peak_tflops
        result["mfu"] = result["achieved_tflops"] / peak_tflops
    return result


def cifar_epoch(scheme: str, depth: int, num_examples: int, batch_size: int, dtype) -> dict:
    """Seconds for one epoch of CIFAR ResNet training, host pipeline and on-device pad-crop-flip
    augmentation included (CIFAR-shaped random uint8 data: CIFAR-10 is not on these machines)."""
    rng = np.random.default_rng(0)
    arrays = {
        "image": rng.integers(0, 256, (num_examples, 32, 32, 3), dtype=np.uint8),
        "label": rng.integers(0, 10, (num_examples,), dtype=np.int32),
    }
    iterator = BatchIterator(arrays, batch_size, shuffle=True, seed=0)
    model = models.create("cifar_resnet", depth=depth, scheme=scheme, num_classes=10, dtype=dtype)
    tx, _ = _sgd()
    state = create_train_state(model, tx, rng=0, input_shape=(1, 32, 32, 3))
    train_step = jax.jit(
        steps.make_train_step(augment_fn=steps.make_augment_fn(augment.cifar_standard())), donate_argnums=(0,)
    )
    started = time.perf_counter()
    state, metrics = train_step(state, jax.device_put(next(iterator)))
    jax.block_until_ready(metrics)
    compile_seconds = time.perf_counter() - started
    iterator.set_state({"epoch": 1, "step": 0, "seed": 0})
    started = time.perf_counter()
    for _ in range(iterator.steps_per_epoch):
        state, metrics = train_step(state, jax.device_put(next(iterator)))
    jax.block_until_ready((state.params, metrics))
    seconds = time.perf_counter() - started
    return {
        "scheme": scheme,
        "depth": depth,
        "examples": num_examples,
        "batch_size": batch_size,
        "steps": iterator.steps_per_epoch,
        "compile_seconds": compile_seconds,
        "epoch_seconds": seconds,
        "images_per_second": iterator.steps_per_epoch * batch_size / seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("runs/bench"))
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a CPU smoke run)")
    parser.add_argument("--peak-tflops", type=float, default=None)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    device = jax.devices()[0]
    record = {
        "device": getattr(device, "device_kind", device.platform),
        "platform": device.platform,
        "jax": jax.__version__,
        "date": f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        "quick": args.quick,
    }
    if args.quick:  # CPU smoke run: a small ResNet, tiny batches
        resnet_args, cifar_args = ("resnet18", 2, 32, 2), (8, 256, 64, jnp.float32)
    else:
        resnet_args, cifar_args = ("resnet50", 256, 224, 20), (20, 50_000, 128, jnp.bfloat16)
    # Written after every measurement, so a run cut short keeps what it measured.
    record["resnet"] = resnet_throughput(*resnet_args, _peak(device, args.peak_tflops))
    write(args.out, record)
    record["cifar_resnet"] = []
    for scheme in ("euler", "lm"):
        record["cifar_resnet"].append(cifar_epoch(scheme, *cifar_args))
        write(args.out, record)
    print((args.out / "gpu.md").read_text())


def write(out: pathlib.Path, record: dict) -> None:
    """gpu.json (everything) and gpu.md (a table) from what has been measured so far."""
    (out / "gpu.json").write_text(json.dumps(record, indent=2) + "\n")
    r = record["resnet"]
    lines = [
        f"# GPU benchmarks: {record['device']}, JAX {record['jax']}, {record['date']}",
        "",
        "| measurement | value |",
        "|---|---|",
        f"| {r['model']} train step, bf16, batch {r['batch_size']} at {r['image_size']}x{r['image_size']} | "
        f"{r['images_per_second']:.0f} images/s ({1000 * r['seconds_per_step']:.1f} ms/step) |",
        f"| {r['model']} FLOPs per step (XLA cost analysis) | {r['flops_per_step'] / 1e12:.3f} TFLOP |",
        f"| {r['model']} achieved | {r['achieved_tflops']:.1f} TFLOP/s"
        + (f", MFU {100 * r['mfu']:.1f}% of {r['peak_tflops']:.0f}" if "mfu" in r else "")
        + " |",
        f"| {r['model']} compile | {r['compile_seconds']:.1f} s |",
    ]
    for c in record.get("cifar_resnet", []):
        lines.append(
            f"| CIFAR ResNet-{c['depth']} ({c['scheme']}), one epoch of {c['examples']:,} images, batch "
            f"{c['batch_size']}, pipeline + pad-crop-flip included | {c['epoch_seconds']:.2f} s "
            f"({c['images_per_second']:.0f} images/s; compile {c['compile_seconds']:.1f} s) |"
        )
    (out / "gpu.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
