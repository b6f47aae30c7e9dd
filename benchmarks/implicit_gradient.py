"""Backward Euler in a CIFAR ResNet: backpropagating through the fixed-point sweeps vs the
implicit-function-theorem gradient, side by side.

For each step size `h` the same network (CIFAR ResNet, `scheme="backward_euler"` with a
tolerance and a maximum number of sweeps) is compiled twice, `gradient="unrolled"` and
`gradient="implicit"`, and measured on the same random state and batch:

- the full train step's time (candidates take turns, median over turns; see `common`) and XLA's
  compiled peak memory (the activations the backward pass keeps);
- the fixed-point solve in training mode: largest residual reached and sweeps used per block
  (`cnn.ode.stage.implicit_solve_stats`);
- how far the two gradients are apart: `|g_implicit - g_unrolled| / |g_unrolled|` over all
  parameters. Where the sweeps converge both are the gradient of the fixed point and agree; where
  they do not, neither is, and they differ.

    python benchmarks/implicit_gradient.py --out runs/bench
    python benchmarks/implicit_gradient.py --quick
"""

from __future__ import annotations

import pathlib
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import common  # noqa: E402
from cnn import models  # noqa: E402
from cnn.ode.stage import implicit_solve_stats, summarize_implicit_solve  # noqa: E402
from cnn.train import steps  # noqa: E402

GRADIENTS = ("unrolled", "implicit")


def _model(depth: int, width: int, h: float, sweeps: int, tolerance: float, gradient: str) -> Any:
    options = {"h": h, "iterations": sweeps, "tolerance": tolerance, "gradient": gradient}
    return models.create("cifar_resnet", depth=depth, width=width, num_classes=10, scheme="backward_euler",
                         scheme_options=options)


def _gradient(model: Any, state: Any, batch: dict[str, np.ndarray]) -> Any:
    def loss(params):
        logits, _ = model.apply({"params": params, "batch_stats": state.batch_stats}, jnp.asarray(batch["image"]),
                                train=True, mutable=["batch_stats"])
        labels = jax.nn.one_hot(batch["label"], 10)
        return -jnp.mean(jnp.sum(labels * jax.nn.log_softmax(logits), axis=-1))

    return jax.jit(jax.grad(loss))(state.params)


def _relative_difference(a: Any, b: Any) -> float:
    diff = sum(float(jnp.sum(jnp.square(x - y))) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))
    norm = sum(float(jnp.sum(jnp.square(y))) for y in jax.tree_util.tree_leaves(b))
    return float(np.sqrt(diff / norm))


def measure(depth: int, width: int, h: float, sweeps: int, tolerance: float, batch_size: int,
            repeats: int, steps_per_repeat: int) -> dict[str, Any]:
    """One row per gradient mode at step size `h`."""
    batch = common.random_batch(batch_size)
    shape = (1, 32, 32, 3)
    state = common.random_train_state(_model(depth, width, h, sweeps, tolerance, "unrolled"), shape)
    runners, rows, gradients = {}, {}, {}
    for gradient in GRADIENTS:
        model = _model(depth, width, h, sweeps, tolerance, gradient)
        mode_state = state.replace(apply_fn=model.apply)
        step = jax.jit(steps.make_train_step(), donate_argnums=(0,))
        started = time.perf_counter()
        compiled = step.lower(mode_state, batch).compile()
        compile_seconds = time.perf_counter() - started
        memory = common.memory_analysis(compiled)
        stats = summarize_implicit_solve(implicit_solve_stats(
            model, {"params": state.params, "batch_stats": state.batch_stats}, jnp.asarray(batch["image"]), train=True))
        gradients[gradient] = _gradient(model, state, batch)
        own = jax.tree_util.tree_map(jnp.copy, mode_state)  # donated by the stepper
        runners[gradient] = common.JaxStepper(compiled, own, batch)
        rows[gradient] = {"gradient": gradient, "compile_seconds": compile_seconds, "memory": memory, "solve": stats}
    times = common.interleaved_seconds_per_step(runners, repeats=repeats, steps_per_repeat=steps_per_repeat)
    difference = _relative_difference(gradients["implicit"], gradients["unrolled"])
    for gradient in GRADIENTS:
        rows[gradient]["seconds_per_step"] = times[gradient]
        rows[gradient]["gradient_relative_difference"] = difference
    return {"h": h, "rows": [rows[g] for g in GRADIENTS]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = common.parser(__doc__, "runs/bench")
    parser.add_argument("--depth", type=common.positive_int, default=None, help="CIFAR ResNet depth (default 20)")
    parser.add_argument("--sweeps", type=common.positive_int, default=8, help="maximum fixed-point sweeps")
    parser.add_argument("--tolerance", type=float, default=1e-3, help="relative residual to stop at")
    parser.add_argument("--steps", type=float, nargs="+", default=None, help="step sizes h (default 1 and 0.1)")
    args = parser.parse_args(argv)
    depth = args.depth or (8 if args.quick else 20)
    width, batch_size = (4, 8) if args.quick else (16, 32)
    repeats, steps_per_repeat = (1, 1) if args.quick else (3, 2)
    record = common.machine_record(args.quick, "implicit_gradient.py", argv)
    record.update(depth=depth, width=width, batch_size=batch_size, sweeps=args.sweeps, tolerance=args.tolerance)
    record["results"] = [
        measure(depth, width, h, args.sweeps, args.tolerance, batch_size, repeats, steps_per_repeat)
        for h in (args.steps or (1.0, 0.1))
    ]
    header = ["h", "gradient", "max residual", "sweeps (mean / max)", "ms / step", "peak memory", "compile s",
              "gradient difference (relative)"]
    table = []
    for result in record["results"]:
        for row in result["rows"]:
            solve = row["solve"]
            table.append([
                f"{result['h']:g}", row["gradient"], f"{solve['max_residual']:.2g}",
                f"{solve['mean_sweeps']:.1f} / {solve['max_sweeps']}", f"{1000 * row['seconds_per_step']['median']:.0f}",
                common.mib(row["memory"]["peak_bytes"]), f"{row['compile_seconds']:.1f}",
                f"{row['gradient_relative_difference']:.2g}",
            ])
    markdown = "\n".join([
        f"# Backward Euler: unrolled vs implicit-function-theorem gradient (CIFAR ResNet-{depth}, width {width})",
        "",
        common.machine_line(record),
        "",
        f"Batch {batch_size}, float32, full train step; at most {args.sweeps} sweeps, tolerance {args.tolerance:g}; "
        "solve statistics in training mode on the measured batch. Gradient difference: "
        "norm(g_implicit - g_unrolled) / norm(g_unrolled) over all parameters.",
        "",
        common.markdown_table(header, table),
    ])
    common.write(args.out, "implicit_gradient", record, markdown)
    print(markdown)
    return record


if __name__ == "__main__":
    main(sys.argv[1:])
