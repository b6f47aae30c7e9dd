"""Train-step throughput: JAX (this package) against PyTorch eager, same network, same machine, same run.

    python benchmarks/train_step.py --out runs/bench          # ResNet-20/56, Euler/LM, batch 128
    python benchmarks/train_step.py --quick --out /tmp/bench          # CPU smoke run (< 1 minute)
    taskset -c 0 python benchmarks/train_step.py ...                  # both frameworks on one core
    python benchmarks/train_step.py --no-torch ...                    # JAX only

One train step = forward, cross-entropy, backward, SGD update (momentum 0.9, weight decay 1e-4
on kernels) and the BatchNorm running statistics, float32, on a fixed random CIFAR-shaped batch.
JAX runs `cnn.train.steps.make_train_step` jitted (state donated), in four variants:

- `scan`: the package's default model (`scan=True`: identical blocks under `nn.scan`; its
  convolutions are `cnn.ops.conv_general_dilated`, whose backward pass is written in the layout
  XLA's CPU backend runs fast), compiled with the package's XLA options
  (`cnn.train.default_compiler_options()`: on CPU, convolutions in Eigen rather than YNNPACK);
- `unrolled`: `scan=False` (every block its own module; same function, same numbers);
- `scan+xla-defaults`: `scan` compiled with XLA's default options (what the options buy);
- `scan+lax-grad`: `scan=True` traced with `common.lax_conv_gradients()` and XLA's default
  options, i.e. JAX's own convolution gradients (the package's behaviour before
  `cnn.ops.conv_general_dilated`; inside the scan's while loop XLA CPU leaves them in a slow
  generic form, see RESULTS.md).

PyTorch runs `benchmarks/torch_cifar_resnet.py` (the same network: option-A shortcuts, same
BatchNorm settings, the same LM-ResNet stepping) in eager mode, NCHW, with
`OMP_WAIT_POLICY=PASSIVE` (set here unless already set: on a loaded machine OpenMP's default
spin-waiting makes multi-threaded torch several times slower). Both frameworks get every usable
core (`torch.set_num_threads`; XLA sizes its pool the same way).

Checks before timing, printed and recorded: the parameter counts agree, and from the same
weights (the Flax initialization copied into torch; scanned parameters unstacked for the
unrolled variant) the first step's loss and gradient norm agree across all variants.

Timing: all variants take turns (`--repeats` turns of `--steps` steps each, the order rotating)
and the time per step is the median over turns, so the load of a shared machine hits all alike.
Ratio = JAX images/s / PyTorch images/s (> 1: JAX faster). Without torch installed (the `bench`
extra) the PyTorch columns are skipped, visibly. Writes train_step.json and train_step.md.
"""

from __future__ import annotations

import os
import pathlib
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch (libgomp) is loaded

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import common  # noqa: E402

from cnn import models  # noqa: E402
from cnn.ode import unstack_scanned  # noqa: E402

TARGET_RATIO = 1.2
VARIANTS = ("scan", "unrolled", "scan+xla-defaults", "scan+lax-grad")


def _torch_or_reason():
    """(torch_cifar_resnet module, None) or (None, why torch is unavailable)."""
    try:
        import torch_cifar_resnet
    except ImportError as error:
        return None, f"PyTorch not installed ({error}); install the bench extra: pip install -e '.[bench]'"
    return torch_cifar_resnet, None


def _variant_state(scan_state, depth: int, scheme: str, variant: str):
    """The train state of `variant` holding the same weights as `scan_state`."""
    if variant != "unrolled":
        return scan_state
    model = common.cifar_model(depth, scheme, scan=False)
    params = unstack_scanned(scan_state.params)
    return scan_state.replace(
        apply_fn=model.apply, params=params, opt_state=scan_state.tx.init(params),
        batch_stats=unstack_scanned(scan_state.batch_stats),
    )


def measure(depth: int, scheme: str, batch_size: int, repeats: int, steps_per_turn: int, variants, reference) -> dict:
    """One row: parameter counts, first-step parity, interleaved timing of every variant (+ torch)."""
    batch = common.random_batch(batch_size)
    device_batch = {k: jax.device_put(v) for k, v in batch.items()}
    scan_state = common.cifar_state(depth, scheme, scan=True)
    row = {"depth": depth, "scheme": scheme, "batch_size": batch_size, "params_jax": models.count_params(scan_state.params)}
    runners, first = {}, {}
    if reference is not None:
        import torch

        net = reference.CifarResNet(depth, scheme=scheme)
        row["params_torch"] = reference.count_params(net)
        reference.load_flax_variables(net, {"params": scan_state.params, "batch_stats": scan_state.batch_stats})
        torch_step = reference.make_train_step(net, reference.sgd(net))
        images = torch.from_numpy(np.ascontiguousarray(batch["image"].transpose(0, 3, 1, 2)))
        labels = torch.from_numpy(batch["label"].astype(np.int64))
        loss = torch_step(images, labels)  # gradients are kept after the update
        grad_norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in net.parameters() if p.grad is not None))
        first["torch"] = (float(loss.detach()), float(grad_norm))

        def run_torch(k: int) -> None:
            for _ in range(k):
                torch_step(images, labels)

        runners["torch"] = run_torch

    # Every variant starts from its own copy: donation consumes the state a step is given.
    initial = jax.tree_util.tree_map(np.array, scan_state)
    for variant in variants:
        state = _variant_state(jax.tree_util.tree_map(jax.numpy.asarray, initial), depth, scheme, variant)
        if variant == "scan+lax-grad":  # a fresh jit: the swapped convolution is invisible to jit's cache
            with common.lax_conv_gradients():
                lowered = common.fresh_jit_train_step(xla_defaults=True).lower(state, device_batch)
        elif variant == "scan+xla-defaults":
            lowered = common.fresh_jit_train_step(xla_defaults=True).lower(state, device_batch)
        else:
            lowered = common.jit_train_step().lower(state, device_batch)
        (compiled, compile_seconds) = common.timed(lowered.compile)
        (state, metrics), first_seconds = common.timed(lambda: compiled(state, device_batch))
        first[variant] = (float(metrics["loss"]), float(metrics["grad_norm"]))
        row[f"{variant}_compile_seconds"] = compile_seconds
        row[f"{variant}_first_step_seconds"] = first_seconds
        runners[variant] = common.JaxStepper(compiled, state, batch)
    row["first_step"] = {name: {"loss": loss, "grad_norm": norm} for name, (loss, norm) in first.items()}
    reference_loss, reference_norm = first["torch" if "torch" in first else variants[0]]
    row["first_step_loss_max_abs_diff"] = max(abs(loss - reference_loss) for loss, _ in first.values())
    row["first_step_grad_norm_max_rel_diff"] = max(abs(norm / reference_norm - 1) for _, norm in first.values())

    timing = common.interleaved_seconds_per_step(runners, repeats=repeats, steps_per_repeat=steps_per_turn)
    for name, t in timing.items():
        row[f"{name}_seconds_per_step"] = t["median"]
        row[f"{name}_images_per_second"] = batch_size / t["median"]
        row[f"{name}_samples"] = t["samples"]
    if reference is not None:
        for variant in variants:
            row[f"{variant}_ratio_vs_torch"] = row[f"{variant}_images_per_second"] / row["torch_images_per_second"]
            row[f"{variant}_target_met"] = row[f"{variant}_ratio_vs_torch"] >= TARGET_RATIO
    return row


def markdown(record: dict) -> str:
    has_torch = record["torch_skipped"] is None
    variants = record["variants"]
    header = ["network", "scheme", "params JAX" + (" / torch" if has_torch else ""), "first step: max loss diff, max grad-norm rel. diff"]
    header += [f"JAX {v} images/s" for v in variants]
    if has_torch:
        header += ["torch images/s"] + [f"{v} / torch" for v in variants]
    rows = []
    for r in record["rows"]:
        params = f"{r['params_jax']:,}" + (f" / {r['params_torch']:,}" if has_torch else "")
        row = [f"CIFAR ResNet-{r['depth']}", r["scheme"], params,
               f"{r['first_step_loss_max_abs_diff']:.1e}, {r['first_step_grad_norm_max_rel_diff']:.1e}"]
        row += [f"{r[f'{v}_images_per_second']:.1f}" for v in variants]
        if has_torch:
            row += [f"{r['torch_images_per_second']:.1f}"]
            row += [f"{r[f'{v}_ratio_vs_torch']:.2f}x" for v in variants]
        rows.append(row)
    lines = [
        f"# Train step, JAX vs PyTorch eager (batch {record['batch_size']}, float32)",
        "",
        common.machine_line(record),
        "",
        common.markdown_table(header, rows),
        "",
        f"Median over {record['repeats']} turns of {record['steps_per_repeat']} step(s), all variants taking turns. "
        f"Usable cores {record['usable_cores']}; torch threads {record.get('torch_threads')}, "
        f"OMP_WAIT_POLICY={record.get('omp_wait_policy')}. Target: JAX >= {TARGET_RATIO}x torch.",
        f"Command: `{record['command']}`",
    ]
    if not has_torch:
        lines += ["", f"PyTorch part SKIPPED: {record['torch_skipped']}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = common.parser(__doc__, "runs/bench")
    parser.add_argument("--depths", type=common.positive_int, nargs="+", default=None, help="default 20 56 (quick: 14)")
    parser.add_argument("--schemes", nargs="+", default=["euler", "lm"], choices=["euler", "lm"])
    parser.add_argument("--variants", nargs="+", default=None, choices=VARIANTS, help="JAX variants (default all; quick: scan)")
    parser.add_argument("--batch-size", type=common.positive_int, default=None, help="default 128 (quick: 8)")
    parser.add_argument("--repeats", type=common.positive_int, default=None, help="turns (default 3; quick 1)")
    parser.add_argument("--steps", type=common.positive_int, default=1, help="steps per turn")
    parser.add_argument("--torch-threads", type=common.positive_int, default=None, help="default: the usable cores")
    parser.add_argument("--no-torch", action="store_true", help="JAX only")
    args = parser.parse_args(argv)
    depths = args.depths or ([14] if args.quick else [20, 56])
    for depth in depths:
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"--depths {depth}: a CIFAR ResNet has depth 6n+2 (8, 14, 20, 32, 44, 56, 110, ...)")
    variants = list(args.variants or (["scan"] if args.quick else VARIANTS))
    batch_size = args.batch_size or (8 if args.quick else 128)
    repeats = args.repeats or (1 if args.quick else 3)

    reference, skipped = (None, "--no-torch given") if args.no_torch else _torch_or_reason()
    record = common.machine_record(args.quick, "train_step.py", argv)
    record.update(batch_size=batch_size, repeats=repeats, steps_per_repeat=args.steps, variants=variants,
                  torch_skipped=skipped, rows=[])
    if reference is not None:
        import torch

        torch.set_num_threads(args.torch_threads or common.usable_cores())
        record.update(torch=torch.__version__, torch_threads=torch.get_num_threads(),
                      omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"))
    else:
        print(f"SKIPPED the PyTorch comparison: {skipped}")

    for depth in depths:
        for scheme in args.schemes:
            row = measure(depth, scheme, batch_size, repeats, args.steps, variants, reference)
            record["rows"].append(row)
            summary = ", ".join(f"{v} {row[f'{v}_images_per_second']:.1f}" for v in variants)
            if reference is not None:
                summary += f", torch {row['torch_images_per_second']:.1f} images/s; params JAX {row['params_jax']:,} / torch {row['params_torch']:,}"
            print(f"ResNet-{depth} {scheme}: {summary}; first-step max |loss diff| {row['first_step_loss_max_abs_diff']:.1e}", flush=True)
            common.write(args.out, "train_step", record, markdown(record))
    print(markdown(record))
    return record


if __name__ == "__main__":
    main()
