"""Peak memory per train step of CIFAR ResNet-56 with and without `remat`, and the step time of both.

    python benchmarks/memory.py --out runs/bench               # ResNet-56, batch 128, both layouts
    python benchmarks/memory.py --quick --out /tmp/bench               # ResNet-14, batch 8 (< 1 minute)

`remat=True` wraps each residual step in `nn.remat`: the backward pass recomputes the block's
activations instead of keeping them, trading compute (about one more forward pass) for memory.

Peak memory is XLA's compiled memory analysis of the full train step (forward, backward, SGD,
BatchNorm; float32; state donated): arguments + outputs + temporaries - aliased donations. The
temporaries are mostly the activations saved for the backward pass, so that is where remat
shows. On CPU this is the executable's static buffer plan (what XLA allocates), not a sampled
process high-water mark. The step time of both variants is measured side by side (turns,
medians). Both stage layouts are measured by default (`--layouts`): with `nn.scan` the saved
activations of a stage are stacked buffers, unrolled they are separate ones.
Writes memory.json and memory.md.
"""

from __future__ import annotations

import pathlib
import sys

import jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import common  # noqa: E402

from cnn.models.cifar_resnet import blocks_per_stage  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = common.parser(__doc__, "runs/bench")
    parser.add_argument("--depth", type=int, default=None, help="default 56 (quick: 14)")
    parser.add_argument("--batch-size", type=common.positive_int, default=None, help="default 128 (quick: 8)")
    parser.add_argument("--layouts", nargs="+", choices=("scan", "unrolled"), default=None, help="default both (quick: scan)")
    parser.add_argument("--repeats", type=common.positive_int, default=None, help="turns (default 3; quick 1)")
    parser.add_argument("--steps", type=common.positive_int, default=1, help="steps per turn (default 1; more on a GPU)")
    parser.add_argument("--no-timing", action="store_true", help="memory analysis only (no steps run)")
    args = parser.parse_args(argv)
    depth = args.depth or (14 if args.quick else 56)
    blocks_per_stage(depth)
    batch_size = args.batch_size or (8 if args.quick else 128)
    layouts = args.layouts or (["scan"] if args.quick else ["scan", "unrolled"])
    repeats = args.repeats or (1 if args.quick else 3)

    record = common.machine_record(args.quick, "memory.py", argv)
    record.update(depth=depth, batch_size=batch_size, repeats=repeats, steps_per_turn=args.steps, timed=not args.no_timing, rows=[])
    batch = common.random_batch(batch_size)
    train_step = common.jit_train_step()
    rows, runners = [], {}
    for layout in layouts:
        for remat in (False, True):
            options = {"remat": True} if remat else {}  # the default spelled alike elsewhere: shared compilations
            state = common.cifar_state(depth, "euler", scan=layout == "scan", **options)
            device_batch = {k: jax.device_put(v) for k, v in batch.items()}
            compiled, compile_seconds = common.timed(lambda: train_step.lower(state, device_batch).compile())
            row = {"layout": layout, "remat": remat, "compile_seconds": compile_seconds, **common.memory_analysis(compiled)}
            rows.append(row)
            runners[(layout, remat)] = common.JaxStepper(compiled, state, batch)
            print(f"{layout} remat={remat}: peak {common.mib(row['peak_bytes'])}, temporaries {common.mib(row['temp_bytes'])}", flush=True)
    timing = None
    if not args.no_timing:
        timing = common.interleaved_seconds_per_step(
            {f"{layout}/{remat}": runner for (layout, remat), runner in runners.items()}, repeats=repeats, steps_per_repeat=args.steps
        )
    for row in rows:
        base = next(r for r in rows if r["layout"] == row["layout"] and not r["remat"])
        row["peak_vs_no_remat"] = row["peak_bytes"] / base["peak_bytes"]
        row["temp_vs_no_remat"] = row["temp_bytes"] / base["temp_bytes"]
        if timing is not None:
            t = timing[f"{row['layout']}/{row['remat']}"]
            base_t = timing[f"{row['layout']}/False"]
            row["seconds_per_step"], row["seconds_samples"] = t["median"], t["samples"]
            row["time_vs_no_remat"] = t["median"] / base_t["median"]
        record["rows"].append(row)
    common.write(args.out, "memory", record, markdown(record))
    print(markdown(record))
    return record


def markdown(record: dict) -> str:
    header = ["layout", "remat", "peak memory", "peak vs no remat", "temporaries", "arguments", "outputs", "aliased"]
    if record["timed"]:
        header += ["ms / step", "time vs no remat"]
    rows = []
    for r in record["rows"]:
        row = [
            r["layout"], "yes" if r["remat"] else "no", common.mib(r["peak_bytes"]), f"{r['peak_vs_no_remat']:.2f}x",
            common.mib(r["temp_bytes"]), common.mib(r["argument_bytes"]), common.mib(r["output_bytes"]),
            common.mib(r["alias_bytes"]),
        ]
        if record["timed"]:
            row += [f"{1e3 * r['seconds_per_step']:.0f}", f"{r['time_vs_no_remat']:.2f}x"]
        rows.append(row)
    return "\n".join([
        f"# Peak memory per train step: CIFAR ResNet-{record['depth']}, batch {record['batch_size']}, float32, with and without remat",
        "",
        common.machine_line(record),
        "",
        common.markdown_table(header, rows),
        "",
        "Memory: XLA compiled memory analysis (peak = arguments + outputs + temporaries - aliased donated state), "
        "the executable's static buffer plan on this backend. "
        + (f"Time: median over {record['repeats']} turn(s) of {record.get('steps_per_turn', 1)} step(s), all variants taking turns." if record["timed"] else "Not timed."),
        f"Command: `{record['command']}`",
    ])


if __name__ == "__main__":
    main()
