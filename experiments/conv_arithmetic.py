"""Convolution-arithmetic report: output sizes checked against real convolutions, receptive
fields of plain vs dilated stacks (computed and measured), written as a table and a plot.

    python -m experiments.conv_arithmetic --workdir runs/conv_arithmetic
"""

from __future__ import annotations

import argparse
import pathlib

import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from cnn import ops  # noqa: E402

# (input, kernel, padding, stride, dilation): classic layers of the lecture's networks.
LAYERS = {
    "LeCun conv1 (83 -> 75)": (83, 9, 0, 1, 1),
    "LeCun pool1 (75 -> 14)": (75, 10, 0, 5, 1),
    "AlexNet conv1 (227 -> 55)": (227, 11, 0, 4, 1),
    "VGG 3x3 'same' conv": (224, 3, 1, 1, 1),
    "ResNet stem 7x7/2": (224, 7, 3, 2, 1),
    "dilated 3x3, d=4": (64, 3, 4, 1, 4),
}


def _measured_size(n: int, f: int, p: int, s: int, d: int) -> int:
    return ops.conv2d(jnp.ones((1, n, n, 1)), jnp.ones((f, f, 1, 1)), stride=s, padding=p, dilation=d).shape[1]


def main(workdir: pathlib.Path, depth: int = 6) -> pathlib.Path:
    workdir.mkdir(parents=True, exist_ok=True)
    lines = ["| layer | n | f | p | s | d | formula | actual conv |", "|---|---|---|---|---|---|---|---|"]
    for name, (n, f, p, s, d) in LAYERS.items():
        formula = (n + 2 * p - d * (f - 1) - 1) // s + 1
        actual = _measured_size(n, f, p, s, d)
        assert formula == actual == ops.conv_output_size(n, f, s, p, d)
        lines.append(f"| {name} | {n} | {f} | {p} | {s} | {d} | {formula} | {actual} |")

    dilated = [(3, 1, 2**i) for i in range(depth)]
    plain = [(3, 1, 1)] * depth
    side = 2 ** (depth + 2)

    def stack(layers):
        def fn(x):
            for f, s, d in layers:
                x = ops.conv2d(x, jnp.ones((f, f, 1, 1)), stride=s, dilation=d)
            return x

        return fn

    computed_dilated = [ops.receptive_field_size(dilated[: i + 1]) for i in range(depth)]
    computed_plain = [ops.receptive_field_size(plain[: i + 1]) for i in range(depth)]
    measured = [ops.empirical_receptive_field(stack(dilated[: i + 1]), (side, side, 1))[0] for i in range(depth)]
    lines += ["", "| layers | plain 3x3 | dilated (computed) | dilated (measured) |", "|---|---|---|---|"]
    lines += [f"| {i + 1} | {a} | {b} | {c} |" for i, (a, b, c) in enumerate(zip(computed_plain, computed_dilated, measured))]
    table = workdir / "results.md"
    table.write_text("# Convolution arithmetic\n\n" + "\n".join(lines) + "\n")

    fig, axis = plt.subplots(figsize=(5, 3.5))
    layers = range(1, depth + 1)
    axis.plot(layers, computed_plain, "s-", label="plain 3x3")
    axis.plot(layers, computed_dilated, "o-", label="dilated 1,2,4,... (computed)")
    axis.plot(layers, measured, "x", ms=10, label="dilated (measured by gradients)")
    axis.set(xlabel="layers", ylabel="receptive field (pixels)", yscale="log")
    axis.legend()
    fig.tight_layout()
    fig.savefig(workdir / "receptive_fields.png", dpi=120)
    print(table.read_text())
    print(f"wrote {table} and {workdir / 'receptive_fields.png'}")
    return table


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=pathlib.Path, default=pathlib.Path("runs/conv_arithmetic"))
    main(parser.parse_args().workdir)
