"""Compile time and first-step time of the CIFAR ResNet train step vs depth, `nn.scan` stages vs unrolled.

    python benchmarks/compile_time.py --out runs/bench            # depths 20 56 110 1202
    python benchmarks/compile_time.py --quick --out /tmp/bench            # depths 14 20 (< 1 minute)
    python benchmarks/compile_time.py --depths 20 110 --repeats 5         # just the target's pair

For each depth and layout (`scan=True`: the identical blocks of a stage run under `nn.scan`, so
the program holds one block per stage whatever the depth; `scan=False`: every block is its own
module), a fresh `jax.jit` of the full train step (Euler scheme, float32, SGD, BatchNorm) is
timed in three phases on a fixed random batch (8 images: the first step is about compilation):

- trace + lower: Python tracing and lowering to StableHLO (`jitted.lower(state, batch)`);
- compile: XLA compilation of the lowered module (`lowered.compile()`), wall time and the
  process's CPU time (less sensitive to other processes' load than wall time);
- first step: the first execution of the compiled step (then one more step, for comparison).

The size of the lowered program (lines of StableHLO text) shows why: with scan it does not grow
with depth. Scan configurations up to depth 110 are measured `--repeats` times, taking turns
across depths (medians reported; this machine is shared and loaded); deeper and unrolled ones once, and the unrolled
ResNet-1202 is skipped unless `--unrolled-1202` is given (its trace and compile take many
minutes on a 2-core CPU). Target: ResNet-110 compiles in at most 1.5x the time of ResNet-20 with
scan. Writes compile_time.json and compile_time.md.
"""

from __future__ import annotations

import pathlib
import statistics
import sys
import time

import jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import common  # noqa: E402

from cnn import models  # noqa: E402
from cnn.models.cifar_resnet import blocks_per_stage  # noqa: E402

TARGET_RATIO = 1.5
SKIP_UNROLLED_FROM = 1202
REPEAT_UP_TO = 110  # deeper scan configurations are measured once


def measure_once(depth: int, scan: bool, batch_size: int, second_step_limit: float) -> dict:
    """Times trace+lower, compile and the first (and second) step of a fresh jit."""
    state = common.cifar_state(depth, "euler", scan=scan)
    batch = {k: jax.device_put(v) for k, v in common.random_batch(batch_size).items()}
    jitted = common.fresh_jit_train_step()
    started = time.perf_counter()
    lowered = jitted.lower(state, batch)
    lower_seconds = time.perf_counter() - started
    started, started_cpu = time.perf_counter(), time.process_time()
    compiled = lowered.compile()
    compile_seconds = time.perf_counter() - started
    compile_cpu_seconds = time.process_time() - started_cpu
    (state, _), first_seconds = common.timed(lambda: compiled(state, batch))
    second_seconds = None
    if first_seconds <= second_step_limit:
        _, second_seconds = common.timed(lambda: compiled(state, batch))
    return {
        "lower_seconds": lower_seconds,
        "compile_seconds": compile_seconds,
        "compile_cpu_seconds": compile_cpu_seconds,
        "first_step_seconds": first_seconds,
        "second_step_seconds": second_seconds,
        "stablehlo_lines": len(lowered.as_text().splitlines()),
        "params": models.count_params(state.params),
    }


def summarize(samples: list[dict]) -> dict:
    """Medians over repeats (and every sample)."""
    row = {}
    for key in ("lower_seconds", "compile_seconds", "compile_cpu_seconds", "first_step_seconds", "second_step_seconds"):
        values = [s[key] for s in samples if s[key] is not None]
        row[key] = statistics.median(values) if values else None
        row[f"{key}_samples"] = values
    row["stablehlo_lines"] = samples[0]["stablehlo_lines"]
    row["params"] = samples[0]["params"]
    row["time_to_first_result_seconds"] = row["lower_seconds"] + row["compile_seconds"] + row["first_step_seconds"]
    return row


def markdown(record: dict) -> str:
    header = ["depth", "layout", "params", "StableHLO lines", "trace+lower s", "compile s", "compile CPU s", "first step s",
              "second step s", "time to first result s", "repeats"]
    rows = []
    for r in record["rows"]:
        if r.get("skipped"):
            rows.append([r["depth"], r["layout"], "", "", "", "", "", "", "", f"skipped: {r['skipped']}", ""])
            continue
        second = r["second_step_seconds"]
        rows.append([
            r["depth"], r["layout"], f"{r['params']:,}", f"{r['stablehlo_lines']:,}", f"{r['lower_seconds']:.2f}",
            f"{r['compile_seconds']:.2f}", f"{r['compile_cpu_seconds']:.2f}", f"{r['first_step_seconds']:.2f}",
            "-" if second is None else f"{second:.2f}", f"{r['time_to_first_result_seconds']:.2f}", r["repeats"],
        ])
    target = record.get("target")
    lines = [
        f"# Compile time vs depth (train step, batch {record['batch_size']}, float32, Euler)",
        "",
        common.machine_line(record),
        "",
        common.markdown_table(header, rows),
        "",
    ]
    if target:
        lines.append(
            f"Scan: compile(ResNet-{target['deep']}) / compile(ResNet-{target['shallow']}) = "
            f"{target['compile_ratio']:.2f}x wall (target <= {TARGET_RATIO}: {'met' if target['met'] else 'missed'}), "
            f"{target['compile_cpu_ratio']:.2f}x in process CPU time; trace+lower+compile {target['lower_compile_ratio']:.2f}x."
        )
    lines += [
        "Times are medians over the repeats (scan configurations take turns across depths); unrolled "
        "configurations are measured once. '-' in the second-step column: not run (the first step took longer "
        f"than {record['second_step_limit']:.0f} s).",
        f"Command: `{record['command']}`",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = common.parser(__doc__, "runs/bench")
    parser.add_argument("--depths", type=common.positive_int, nargs="+", default=None, help="default 20 56 110 1202 (quick: 14 20)")
    parser.add_argument("--batch-size", type=common.positive_int, default=None, help="default 8")
    parser.add_argument("--repeats", type=common.positive_int, default=None, help="scan repeats for depths <= 110 (default 3; quick 1)")
    parser.add_argument("--unrolled-1202", action="store_true", help="also trace and compile the unrolled ResNet-1202")
    parser.add_argument("--second-step-limit", type=float, default=30.0, help="run a second step when the first took at most this (s)")
    args = parser.parse_args(argv)
    depths = args.depths or ([14, 20] if args.quick else [20, 56, 110, 1202])
    batch_size = args.batch_size or 8
    repeats = args.repeats or (1 if args.quick else 3)
    for depth in depths:
        blocks_per_stage(depth)  # ValueError naming the depth before any work

    record = common.machine_record(args.quick, "compile_time.py", argv)
    record.update(batch_size=batch_size, repeats=repeats, second_step_limit=args.second_step_limit, rows=[])
    samples: dict[int, list[dict]] = {d: [] for d in depths}
    for r in range(repeats):  # scan: turns across depths (the very deep ones once)
        for depth in depths:
            if r > 0 and depth > REPEAT_UP_TO:
                continue
            sample = measure_once(depth, True, batch_size, args.second_step_limit)
            samples[depth].append(sample)
            print(f"scan depth {depth} repeat {r + 1}/{repeats}: compile {sample['compile_seconds']:.2f} s, "
                  f"first step {sample['first_step_seconds']:.2f} s", flush=True)
    rows = {}
    for depth in depths:
        rows[(depth, "scan")] = {"depth": depth, "layout": "scan", "repeats": len(samples[depth]), **summarize(samples[depth])}
    for depth in depths:
        if depth >= SKIP_UNROLLED_FROM and not args.unrolled_1202:
            rows[(depth, "unrolled")] = {"depth": depth, "layout": "unrolled",
                                         "skipped": "tracing and compiling it takes too long on this CPU (--unrolled-1202 runs it)"}
            continue
        sample = measure_once(depth, False, batch_size, args.second_step_limit)
        print(f"unrolled depth {depth}: compile {sample['compile_seconds']:.2f} s, first step {sample['first_step_seconds']:.2f} s", flush=True)
        rows[(depth, "unrolled")] = {"depth": depth, "layout": "unrolled", "repeats": 1, **summarize([sample])}
    record["rows"] = [rows[(d, layout)] for d in depths for layout in ("scan", "unrolled")]

    scan_depths = sorted(depths)
    shallow, deep = (20, 110) if {20, 110} <= set(depths) else (scan_depths[0], scan_depths[-1])
    if shallow != deep:
        a, b = rows[(shallow, "scan")], rows[(deep, "scan")]
        ratio = b["compile_seconds"] / a["compile_seconds"]
        record["target"] = {
            "shallow": shallow, "deep": deep, "compile_ratio": ratio,
            "compile_cpu_ratio": b["compile_cpu_seconds"] / a["compile_cpu_seconds"],
            "lower_compile_ratio": (b["lower_seconds"] + b["compile_seconds"]) / (a["lower_seconds"] + a["compile_seconds"]),
            "limit": TARGET_RATIO, "met": ratio <= TARGET_RATIO,
        }
    common.write(args.out, "compile_time", record, markdown(record))
    print(markdown(record))
    return record


if __name__ == "__main__":
    main()
