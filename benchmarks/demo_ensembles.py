"""`make demo` with and without ensembles, side by side on one machine: the whole grid's wall time.

    python benchmarks/demo_ensembles.py --out runs/bench               # the demo config, once each way
    python benchmarks/demo_ensembles.py --out runs/bench --repeats 2   # A B B A: drift cancels
    python benchmarks/demo_ensembles.py --quick --out /tmp/bench       # 2 seeds, depth 8, 4 steps

Each candidate is one `python -m experiments.compare_schemes` process on a fresh temporary run
directory: `--config.ensembles=True` (the seeds of a cell trained as one vmapped program, what
`make demo` does) and `--config.ensembles=False` (one program per seed, the demo before
ensembles). Everything is inside the timed part: start-up, data, compilation, training,
evaluation, checkpoints and the report, as a user waits for it. Turns alternate (A B, then B A
with --repeats 2, ...) so a slow drift of the machine's load hits both alike. Writes
demo_ensembles.json and demo_ensembles.md; the candidates' test accuracies are recorded too (the
two modes train the same networks up to float rounding).
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import common  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
QUICK_OVERRIDES = ("--config.seeds=(0,1)", "--config.depths=(8,)", "--config.train.num_train_steps=4",
                   "--config.train.num_epochs=0", "--config.train.optimizer.warmup_steps=1",
                   "--config.train.eval_every_steps=4", "--config.train.log_every_steps=2",
                   "--config.train.eval_split=test[:64]")


def run_grid(config: str, ensembles: bool, overrides: tuple[str, ...]) -> dict:
    """One compare_schemes process on a fresh run directory: wall seconds and the cells' accuracies."""
    with tempfile.TemporaryDirectory(prefix="demo-ensembles-") as workdir:
        command = [sys.executable, "-m", "experiments.compare_schemes", f"--config={config}", f"--workdir={workdir}",
                   f"--config.ensembles={ensembles}", "--config.progress=False", *overrides]
        started = time.perf_counter()
        result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
        accuracies = {path.parent.name: json.loads(path.read_text())["test_accuracy"]
                      for path in sorted(pathlib.Path(workdir, "cells").glob("*/cell.json"))}
    return {"seconds": seconds, "accuracies": accuracies}


def main(argv: list[str] | None = None) -> dict:
    parser = common.parser(__doc__, "runs/bench")
    parser.add_argument("--config", default="experiments/configs/demo.py", help="the grid (default: make demo's)")
    parser.add_argument("--repeats", type=common.positive_int, default=1, help="turns per candidate (alternating)")
    args = parser.parse_args(argv)
    overrides = QUICK_OVERRIDES if args.quick else ()
    record = common.machine_record(args.quick, "demo_ensembles.py", argv)
    record.update(config=args.config, overrides=list(overrides), repeats=args.repeats, runs=[])
    order = []
    for turn in range(args.repeats):
        pair = [True, False] if turn % 2 == 0 else [False, True]
        order.extend(pair)
    for ensembles in order:
        run = run_grid(args.config, ensembles, overrides)
        record["runs"].append({"ensembles": ensembles, **run})
        print(f"ensembles={ensembles}: {run['seconds']:.1f} s", flush=True)
    together = [r["seconds"] for r in record["runs"] if r["ensembles"]]
    apart = [r["seconds"] for r in record["runs"] if not r["ensembles"]]
    record["ensembles_seconds"] = min(together)
    record["separate_seconds"] = min(apart)
    record["speedup"] = record["separate_seconds"] / record["ensembles_seconds"]
    first = {r["ensembles"]: r["accuracies"] for r in record["runs"]}
    record["max_accuracy_difference"] = max(
        (abs(first[True][cell] - first[False][cell]) for cell in first[True] if cell in first[False]), default=0.0)
    common.write(args.out, "demo_ensembles", record, markdown(record))
    print(markdown(record))
    return record


def markdown(record: dict) -> str:
    rows = [[r["ensembles"] and "ensembles (one program per cell)" or "one program per seed",
             f"{r['seconds']:.1f}", len(r["accuracies"])] for r in record["runs"]]
    return (
        f"# `{record['config']}` with and without ensembles (whole grid, wall time)\n\n"
        f"{common.machine_line(record)}\n\n"
        + common.markdown_table(["candidate (in run order)", "wall s", "cells"], rows)
        + f"\n\nEnsembles speed-up (best of each): {record['speedup']:.2f}x "
        f"({record['separate_seconds']:.1f} s / {record['ensembles_seconds']:.1f} s); largest test-accuracy "
        f"difference of a cell between the modes: {100 * record['max_accuracy_difference']:.2f} pp (float rounding, "
        "amplified by training).\n"
    )


if __name__ == "__main__":
    main()
