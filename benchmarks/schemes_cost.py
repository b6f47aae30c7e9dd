"""Cost of each discretization scheme at equal depth: train-step time and peak memory relative to Euler.

    python benchmarks/schemes_cost.py --out runs/bench              # every scheme, ResNet-20, batch 128
    python benchmarks/schemes_cost.py --quick --out /tmp/bench              # euler, lm, midpoint (< 1 minute)
    python benchmarks/schemes_cost.py --schemes euler lm rk4 --depth 56

Every scheme steps the same CIFAR ResNet (post-activation blocks, option-A shortcuts) with the
full train step (forward, backward, SGD, BatchNorm), float32. Columns:

- F evaluations per forward: residual-branch evaluations of one forward pass (each block costs
  `scheme.evals_per_step`, except a shape-changing block 0, where every scheme takes one
  Euler-like step). This is the cost a scheme *should* have: RK2 about 2x Euler, LM 1x.
- time per step: median over `--repeats` turns in which all schemes take turns (side by side
  in one run, so load hits all alike), relative to Euler.
- peak memory: XLA's compiled memory analysis of the train step (`compiled.memory_analysis()`:
  arguments + outputs + temporaries - aliased donations; the temporaries are mostly the
  activations kept for the backward pass). On CPU this is the static buffer plan of the
  executable, not a measured high-water mark of the process; it is exact for what XLA allocates.

`--layout` picks the stage layout: "unrolled" (the default of a full run: on the XLA CPU backend,
backward convolutions inside the scan's while loop run far slower, see benchmarks/RESULTS.md)
or "scan" (the quick run's, which shares its compilations with the other quick runs).
Writes schemes_cost.json and schemes_cost.md.
"""

from __future__ import annotations

import pathlib
import sys

import jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import common  # noqa: E402

from cnn import models  # noqa: E402
from cnn.models.cifar_resnet import blocks_per_stage  # noqa: E402
from cnn.ode import schemes as ode_schemes  # noqa: E402

QUICK_SCHEMES = ("euler", "lm", "midpoint")


def f_evaluations(depth: int, scheme: str) -> int:
    """Residual-branch evaluations in one forward pass of the CIFAR ResNet (width 16, option A).

    Stage 1 keeps the shape (all `n` blocks step with the scheme); stages 2 and 3 start with a
    shape-changing block, which costs one evaluation for every scheme (`cnn.ode.stage`).
    """
    n = blocks_per_stage(depth)
    per_step = ode_schemes.get_scheme(scheme).evals_per_step
    return n * per_step + 2 * (1 + (n - 1) * per_step)


def main(argv: list[str] | None = None) -> dict:
    parser = common.parser(__doc__, "runs/bench")
    parser.add_argument("--schemes", nargs="+", default=None, choices=ode_schemes.available_schemes(),
                        help="default: every scheme of the catalogue, aliases once (quick: euler lm midpoint); euler is always included")
    parser.add_argument("--depth", type=int, default=None, help="default 20 (quick: 14)")
    parser.add_argument("--batch-size", type=common.positive_int, default=None, help="default 128 (quick: 8)")
    parser.add_argument("--repeats", type=common.positive_int, default=None, help="turns (default 3; quick 1)")
    parser.add_argument("--steps", type=common.positive_int, default=1, help="steps per turn")
    parser.add_argument("--layout", choices=("unrolled", "scan"), default=None, help="default unrolled (quick: scan)")
    args = parser.parse_args(argv)
    depth = args.depth or (14 if args.quick else 20)
    layout = args.layout or ("scan" if args.quick else "unrolled")
    blocks_per_stage(depth)
    requested = ["euler", *(args.schemes or (QUICK_SCHEMES if args.quick else ode_schemes.available_schemes()))]
    schemes = list({ode_schemes.get_scheme(name).name: None for name in requested})  # aliases once, euler first
    batch_size = args.batch_size or (8 if args.quick else 128)
    repeats = args.repeats or (1 if args.quick else 3)

    record = common.machine_record(args.quick, "schemes_cost.py", argv)
    record.update(depth=depth, batch_size=batch_size, layout=layout, repeats=repeats, steps_per_repeat=args.steps, rows=[])
    batch = common.random_batch(batch_size)
    train_step = common.jit_train_step()
    runners, rows = {}, {}
    for scheme in schemes:
        state = common.cifar_state(depth, scheme, scan=layout == "scan")
        device_batch = {k: jax.device_put(v) for k, v in batch.items()}
        compiled, compile_seconds = common.timed(lambda: train_step.lower(state, device_batch).compile())
        memory = common.memory_analysis(compiled)
        rows[scheme] = {
            "scheme": scheme,
            "formula": ode_schemes.get_scheme(scheme).formula,
            "params": models.count_params(state.params),
            "f_evaluations": f_evaluations(depth, scheme),
            "compile_seconds": compile_seconds,
            **memory,
        }
        runners[scheme] = common.JaxStepper(compiled, state, batch)
        print(f"{scheme}: compiled in {compile_seconds:.1f} s, peak {common.mib(memory['peak_bytes'])}", flush=True)
    timing = common.interleaved_seconds_per_step(runners, repeats=repeats, steps_per_repeat=args.steps)
    euler = rows["euler"]
    euler_seconds = timing["euler"]["median"]
    for scheme in schemes:
        row = rows[scheme]
        row["seconds_per_step"] = timing[scheme]["median"]
        row["seconds_samples"] = timing[scheme]["samples"]
        row["time_vs_euler"] = row["seconds_per_step"] / euler_seconds
        row["f_evaluations_vs_euler"] = row["f_evaluations"] / euler["f_evaluations"]
        row["peak_vs_euler"] = row["peak_bytes"] / euler["peak_bytes"]
        row["temp_vs_euler"] = row["temp_bytes"] / euler["temp_bytes"]
        record["rows"].append(row)
    common.write(args.out, "schemes_cost", record, markdown(record))
    print(markdown(record))
    return record


def markdown(record: dict) -> str:
    header = ["scheme", "params", "F evals / forward", "expected (F evals vs Euler)", "ms / step",
              "time vs Euler", "peak memory", "peak vs Euler", "temporaries", "temp vs Euler"]
    rows = [
        [
            r["scheme"], f"{r['params']:,}", r["f_evaluations"], f"{r['f_evaluations_vs_euler']:.2f}x",
            f"{1e3 * r['seconds_per_step']:.0f}", f"{r['time_vs_euler']:.2f}x", common.mib(r["peak_bytes"]),
            f"{r['peak_vs_euler']:.2f}x", common.mib(r["temp_bytes"]), f"{r['temp_vs_euler']:.2f}x",
        ]
        for r in record["rows"]
    ]
    return "\n".join([
        f"# Scheme cost at equal depth: CIFAR ResNet-{record['depth']}, batch {record['batch_size']}, float32, "
        f"{record['layout']} stages",
        "",
        common.machine_line(record),
        "",
        common.markdown_table(header, rows),
        "",
        f"Time: median over {record['repeats']} turn(s) of {record['steps_per_repeat']} step(s), schemes taking turns. "
        "Memory: XLA compiled memory analysis of the train step (peak = arguments + outputs + temporaries - aliased), "
        "the executable's static buffer plan, not a sampled process high-water mark.",
        f"Command: `{record['command']}`",
    ])


if __name__ == "__main__":
    main()
