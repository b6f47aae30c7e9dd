"""Transfer learning experiment: feature extraction vs fine-tuning vs training from scratch.

    python -m experiments.transfer --workdir runs/transfer --config.data_dir=/path/to/data
    python -m experiments.transfer --config experiments/configs/transfer.py:tiny --workdir runs/transfer_tiny

1. Pretrain `config.model` on `config.source.dataset` with the training engine (or take a trunk
   from another run's Orbax checkpoint / a torchvision-layout file, `config.pretrained`).
2. For each seed and mode, train on `config.target.labels_per_class` labelled images per class of
   `config.target.dataset` (one `cnn.train.fit` run per mode, warm-started from the swapped-head
   variables), and evaluate on the full target test set.
3. Measure each mode's train-time cost: the engine's step, and a step that differentiates only
   the trainable parameters (what feature extraction needs), FLOPs from XLA's cost analysis and
   median wall time.

Writes `results.json`, `results.md` (the table), `transfer.png` and one run directory per
pretraining / mode / seed.

Recorded run, `python -m experiments.transfer --workdir runs/transfer --config.data_dir=../shared/data`
(CPU, 2 cores shared with other jobs, 29 minutes; times are medians under that load):
simple_cnn (32, 64, 128) pretrained on MNIST for 1,000 steps (test accuracy 0.9865), then
Fashion-MNIST with 100 labels per class, 400 steps of batch 50, 3 seeds (mean ± std), accuracy
on the 10,000 test images:

| mode | test accuracy | trainable params | engine step (ms) | engine GFLOPs/step | trainable-only step (ms) | trainable-only GFLOPs/step |
|---|---|---|---|---|---|---|
| extraction | 0.7109 ± 0.0032 | 1,290 | 190.57 | 1.967 | 18.85 | 0.656 |
| finetune | 0.7820 ± 0.0062 | 94,186 | 238.29 | 1.984 | 242.47 | 1.984 |
| scratch | 0.8070 ± 0.0041 | 94,186 | 277.61 | 1.984 | 282.00 | 1.984 |

On this pair fine-tuning does not come out on top as it does with ImageNet-pretrained trunks:
digit features are a poor basis for clothing, so the frozen trunk is clearly worst and
fine-tuning from it stays 2.5 points behind training from scratch on the same 1,000 images. The cost columns show the lecture's other point: extraction needs a third of the
FLOPs per step (no backward pass through the trunk; the engine's generic step still computes
every gradient and lets `optax.set_to_zero` drop the trunk's).

The reverse pair, `--config experiments/configs/transfer.py:reverse` (Fashion-MNIST pretraining,
test accuracy 0.8878; MNIST with 100 labels per class; 33 minutes):

| mode | test accuracy | trainable params | engine step (ms) | engine GFLOPs/step | trainable-only step (ms) | trainable-only GFLOPs/step |
|---|---|---|---|---|---|---|
| extraction | 0.7719 ± 0.0052 | 1,290 | 227.22 | 1.967 | 6.86 | 0.656 |
| finetune | 0.9182 ± 0.0009 | 94,186 | 172.02 | 1.984 | 169.89 | 1.984 |
| scratch | 0.9461 ± 0.0017 | 94,186 | 208.05 | 1.984 | 224.43 | 1.984 |

With 10 labels per class (MNIST -> Fashion-MNIST, the trunk read from the first run's Orbax
checkpoint: `--config.pretrained=run:runs/transfer/pretrain --config.target.labels_per_class=10
--config.time_steps=False`): extraction 0.6380 ± 0.0185, fine-tuning 0.6798 ± 0.0199, scratch
0.6804 ± 0.0194. With fewer labels fine-tuning catches up with scratch training; the frozen
digit trunk stays behind in every setting.
"""

from __future__ import annotations

import json
import pathlib
import sys
import time
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

import cnn.models  # noqa: E402
from cnn import train  # noqa: E402
from cnn.tasks import transfer  # noqa: E402

RESULTS = """
MNIST (1,000 steps of batch 128, test accuracy 0.9906) -> Fashion-MNIST, 100 labels per class,
simple_cnn widths (32, 64, 128), 400 steps of batch 50, 3 seeds, test accuracy on 10,000 images:

| mode | test accuracy | trainable params | engine step (ms) | engine GFLOPs | trainable-only step (ms) | trainable-only GFLOPs |
|---|---|---|---|---|---|---|
(filled in below after the recorded run)
"""


def _options(config: ml_collections.ConfigDict) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in config.model_options.to_dict().items()}


def _engine_config(config: ml_collections.ConfigDict, part: ml_collections.ConfigDict, seed: int, num_classes: int):
    """An engine config for `config.model` on `part` (source or target)."""
    engine = train.default_config()
    engine.seed = seed
    engine.dataset = part.dataset
    engine.data_dir = config.data_dir
    engine.num_classes = num_classes
    engine.batch_size = part.batch_size
    engine.num_train_steps = part.num_train_steps
    engine.model = config.model
    engine.model_options = ml_collections.ConfigDict(_options(config))
    engine.parallelism = config.parallelism
    engine.optimizer.update(part.optimizer.to_dict())
    engine.log_every_steps = max(1, min(50, part.num_train_steps))
    engine.eval_every_steps = part.num_train_steps  # evaluate once, at the end
    engine.checkpoint.every_steps = 0  # only the final checkpoint
    engine.checkpoint.max_to_keep = 1
    engine.progress = config.progress
    return engine


def pretrained_variables(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The pretrained variables and a description (`{"source", "accuracy"?}`)."""
    from cnn import data as data_lib

    if config.pretrained.startswith("run:"):
        variables, _ = transfer.load_run_variables(config.pretrained[len("run:"):])
        return variables, {"source": config.pretrained}
    if config.pretrained:
        return transfer.load_torchvision_variables(config.pretrained, config.model, **_options(config)), {
            "source": config.pretrained
        }
    num_classes = data_lib.info(config.source.dataset, data_dir=config.data_dir or None).num_classes
    engine = _engine_config(config, config.source, int(config.seeds[0]), num_classes)
    result = train.fit(engine, workdir / "pretrain")
    variables, _ = transfer.load_run_variables(workdir / "pretrain")  # the run's Orbax checkpoint
    return variables, {
        "source": f"{config.source.dataset} ({config.source.num_train_steps} steps)",
        "accuracy": result.final_eval["accuracy"],
    }


def main(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *, command: str = "") -> dict[str, Any]:
    """Runs the experiment; returns the results (also written to `workdir`)."""
    from cnn import data as data_lib

    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    unknown = sorted(set(config.modes) - set(transfer.MODES))
    if unknown:
        raise ValueError(f"config.modes has unknown modes {unknown}; valid: {list(transfer.MODES)}")
    variables, pretraining = pretrained_variables(config, workdir)

    target_info = data_lib.info(config.target.dataset, data_dir=config.data_dir or None)
    input_shape = tuple(target_info.image_shape)
    head = transfer.head_pattern(transfer.head_paths(config.model, input_shape=input_shape, **_options(config)))
    runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in config.modes}
    costs: dict[str, dict[str, Any]] = {}
    for seed in config.seeds:
        datasets = transfer.few_label_datasets(
            config.target.dataset, int(config.target.labels_per_class), seed=int(seed), data_dir=config.data_dir or None
        )
        base = _engine_config(config, config.target, int(seed), target_info.num_classes)
        for mode in config.modes:
            engine = transfer.transfer_config(base, mode, head=head, trunk_lr_fraction=float(config.trunk_lr_fraction))
            run_dir = workdir / f"{mode}_seed{seed}"
            if mode != "scratch":
                model = cnn.models.create(engine.model, num_classes=target_info.num_classes, **_options(engine))
                start = transfer.swap_head(variables, model, rng=int(seed) + 1000, input_shape=input_shape, head=head)
            else:
                start = None
            result = train.fit(engine, run_dir, datasets=datasets, init_variables=start)
            final = result.final_eval
            runs[mode].append({"seed": int(seed), "accuracy": final["accuracy"], "loss": final["loss"]})
            if mode not in costs:
                batch = next(datasets("train", batch_size=int(config.target.batch_size), shuffle=True, seed=0))
                cost = transfer.step_costs(
                    engine, batch, head=head, repeats=int(config.cost_repeats), timed=bool(config.time_steps)
                )
                labels = transfer.param_labels(result.state.params, head)
                counts = transfer.count_by_label(result.state.params, labels)
                trainable = counts.get(transfer.HEAD, 0) + (0 if mode == "extraction" else counts.get(transfer.TRUNK, 0))
                costs[mode] = {
                    "trainable_params": trainable,
                    "engine_ms": 1e3 * cost["engine"].seconds,
                    "engine_gflops": cost["engine"].flops / 1e9,
                    "trainable_ms": 1e3 * cost["trainable"].seconds,
                    "trainable_gflops": cost["trainable"].flops / 1e9,
                }
    summary = {}
    for mode in config.modes:
        accuracies = np.array([r["accuracy"] for r in runs[mode]])
        summary[mode] = {
            "accuracy_mean": float(accuracies.mean()),
            "accuracy_std": float(accuracies.std(ddof=1)) if len(accuracies) > 1 else 0.0,
            "runs": runs[mode],
            **costs[mode],
        }
    results = {
        "pretraining": pretraining,
        "target": {
            "dataset": config.target.dataset,
            "labels_per_class": int(config.target.labels_per_class),
            "steps": int(config.target.num_train_steps),
            "batch_size": int(config.target.batch_size),
        },
        "model": config.model,
        "model_options": _options(config),
        "trunk_lr_fraction": float(config.trunk_lr_fraction),
        "batch_size": int(config.target.batch_size),
        "modes": summary,
        "timed": bool(config.time_steps),
        "seconds": time.perf_counter() - started,
    }
    (workdir / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    table = results_table(results)
    (workdir / "results.md").write_text(table + (f"\nCommand: `{command}`\n" if command else ""))
    plot_results(results, workdir / "transfer.png")
    print(table)
    print(f"wrote {workdir / 'results.md'}, {workdir / 'results.json'}, {workdir / 'transfer.png'}")
    return results


def results_table(results: dict[str, Any]) -> str:
    """The markdown table of a results dict (the lecture's comparison of the three modes)."""
    pre = results["pretraining"]
    target = results["target"]
    seeds = len(next(iter(results["modes"].values()))["runs"])
    header = (
        f"Pretrained on {pre['source']}"
        + (f" (source test accuracy {pre['accuracy']:.4f})" if "accuracy" in pre else "")
        + f"; target {target['dataset']} with {target['labels_per_class']} labels per class, "
        f"{target['steps']} steps of batch {target['batch_size']}, {results['model']} {results['model_options']}, "
        f"trunk lr fraction {results['trunk_lr_fraction']:g}, {seeds} seed(s); accuracy on the full target test set.\n"
    )
    lines = [
        header,
        "| mode | test accuracy | trainable params | engine step (ms) | engine GFLOPs/step "
        "| trainable-only step (ms) | trainable-only GFLOPs/step |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode, row in results["modes"].items():
        accuracy = f"{row['accuracy_mean']:.4f}" + (f" ± {row['accuracy_std']:.4f}" if seeds > 1 else "")
        lines.append(
            f"| {mode} | {accuracy} | {row['trainable_params']:,} | {row['engine_ms']:.2f} | {row['engine_gflops']:.3f} "
            f"| {row['trainable_ms']:.2f} | {row['trainable_gflops']:.3f} |"
        )
    lines.append(
        "\nengine step: `cnn.train`'s step (gradients of every parameter; frozen ones zeroed by "
        "`optax.set_to_zero`). trainable-only: gradients of the trainable parameters only. "
        + ("FLOPs from XLA's cost analysis of the compiled steps; times are medians on "
           f"{_device()}." if results.get("timed", True) else
           "Steps not timed (config.time_steps=False); FLOPs of the unoptimized programs.")
    )
    return "\n".join(lines) + "\n"


def _device() -> str:
    import jax

    device = jax.devices()[0]
    return f"{device.platform.upper()} ({device.device_kind})"


def plot_results(results: dict[str, Any], path: pathlib.Path) -> pathlib.Path:
    """Bar charts: test accuracy and trainable-only GFLOPs per mode."""
    modes = list(results["modes"])
    rows = [results["modes"][m] for m in modes]
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    axes[0].bar(modes, [r["accuracy_mean"] for r in rows], yerr=[r["accuracy_std"] for r in rows], capsize=4)
    axes[0].set_ylabel("target test accuracy")
    axes[0].set_ylim(0, 1)
    axes[1].bar(modes, [r["trainable_gflops"] for r in rows], label="trainable-only step")
    axes[1].plot(modes, [r["engine_gflops"] for r in rows], "ko", label="engine step")
    axes[1].set_ylabel("GFLOPs per train step")
    axes[1].legend()
    for axis in axes:
        axis.grid(alpha=0.3, axis="y")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


if __name__ == "__main__":
    from experiments import grid

    grid.cli_main(sys.argv, "experiments/configs/transfer.py", main, "experiments.transfer",
                  compilation_cache=False, default_workdir="runs/transfer")
