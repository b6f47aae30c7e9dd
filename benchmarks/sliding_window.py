"""OverFeat dense evaluation vs classifying every crop: time and FLOPs, printed as a ratio.

    python benchmarks/sliding_window.py                       # LeNet-5 on 128x128, AlexNet on 352x352
    python benchmarks/sliding_window.py --model lenet5 --size 256 --repeats 20

For each classifier, one pass of its fully convolutional form over a large random image is
compared with cutting out every window (stride = the network's stride) and classifying the crops
as one batch (`cnn.tasks.sliding_window.compare_dense_and_crops`). FLOPs come from XLA's cost
analysis of the compiled functions, times are medians after compilation; weights are random
(the cost does not depend on them). Both methods give the same scores (printed as max |diff|;
exactly for LeNet-5, whose convolutions are unpadded; AlexNet's padding makes windows inside a
large image see their neighbours instead of zeros).

Recorded (`python benchmarks/sliding_window.py --model lenet5 --model lecun_convnet --model alexnet`,
CPU, jax 0.10.2, 2 cores with light load from other jobs):

    lenet5         128x128: 25x25 windows | dense   2.20 ms, crops  42.57 ms, speedup 19.3x | GFLOPs dense 0.095, crops  0.529, ratio 5.6x | max |diff| 0
    lecun_convnet  243x243:   9x9 windows | dense  40.69 ms, crops 264.67 ms, speedup  6.5x | GFLOPs dense 0.659, crops  5.010, ratio 7.6x | max |diff| 0
    alexnet        352x352:   5x5 windows | dense 173.15 ms, crops 353.95 ms, speedup  2.0x | GFLOPs dense 6.127, crops 32.938, ratio 5.4x | max |diff| 0.38

(The crops' time grows less than their FLOPs on a CPU: one batch of 25 AlexNet crops runs at a
higher FLOP rate than one large image.)
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import cnn.models  # noqa: E402
from cnn.tasks import sliding_window  # noqa: E402

DEFAULTS = {  # model: (input shape of the classifier, benchmark image side, model options)
    "lenet5": ((32, 32, 1), 128, {"num_classes": 10}),
    "lecun_convnet": ((83, 83, 1), 243, {"num_classes": 101}),
    "alexnet": ((224, 224, 3), 352, {"num_classes": 1000, "classifier_width": 4096}),
}


def random_variables(name: str, input_shape, options, seed: int = 0):
    """Variables of `name` with the right shapes, filled with scaled noise (no init compile)."""
    model = cnn.models.create(name, **options)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *input_shape)), train=False))
    generator = np.random.default_rng(seed)

    def fill(shape):
        fan_in = int(np.prod(shape.shape[:-1])) if len(shape.shape) > 1 else 1
        return jnp.asarray(generator.standard_normal(shape.shape, np.float32) / np.sqrt(fan_in))

    return jax.tree_util.tree_map(fill, shapes)


def run(name: str, size: int | None, repeats: int) -> dict[str, float]:
    input_shape, default_size, options = DEFAULTS[name]
    variables = random_variables(name, input_shape, options)
    report = sliding_window.compare_dense_and_crops(
        name, variables, size or default_size, repeats=repeats,
        **{k: v for k, v in options.items() if k not in ("num_classes", "classifier_width")},
    )
    side = int(round(np.sqrt(report["positions"])))
    print(
        f"{name:14s} {size or default_size}x{size or default_size}: {side}x{side} windows | "
        f"dense {1e3 * report['dense_seconds']:8.2f} ms, crops {1e3 * report['crops_seconds']:8.2f} ms, "
        f"speedup {report['speedup']:6.1f}x | GFLOPs dense {report['dense_flops'] / 1e9:7.3f}, "
        f"crops {report['crops_flops'] / 1e9:7.3f}, ratio {report['flops_ratio']:5.1f}x | "
        f"max |diff| {report['max_abs_difference']:.2e}"
    )
    return report


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(DEFAULTS), action="append", help="repeatable; default lenet5 and alexnet")
    parser.add_argument("--size", type=int, default=None, help="image side (default per model)")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per method")
    args = parser.parse_args(argv)
    device = jax.devices()[0]
    print(f"device: {device.platform.upper()} ({device.device_kind}), jax {jax.__version__}")
    for name in args.model or ["lenet5", "alexnet"]:
        run(name, args.size, args.repeats)


if __name__ == "__main__":
    main()
