"""One window of the GPU study: train the next cells of the grid that fit before a deadline,
write the report, and hand the finished cells back.

The study (`experiments/configs/fashion_mnist_gpu_study.py`) needs many windows of 15 minutes
on a lent GPU (36 at its docstring's pessimistic prior; `plan` recounts from the measured cells). Each window starts from the cells committed under
`experiments/results/fashion_mnist_gpu_study/` (finished cells are read back, not retrained),
trains the next packs of seeds in the order of the questions they answer (`priority`), each only
if its estimated time fits what is left, and stops cleanly before the budget ends: a pack that
overruns its estimate is stopped at the deadline (its cells stay unfinished; its measured step
time is kept for the next estimate). Then it writes the report over every finished cell and
packs what is worth committing into one tarball.

    bash experiments/gpu_study.sh                                 # on the device (sets up, then `run`)
    python -m experiments.gpu_study run --out DIR [--budget-s 570] [--quick]
    python -m experiments.gpu_study plan [--quick]                # the order and estimates, no training
    python -m experiments.gpu_study merge DIR/results.tar.gz      # here: into the results folder, to commit

What `run` writes into `--out` (the device tool brings back at most 8 files, 2 folders down):
results.tar.gz (results.md, results.csv, plots/, config.json, every finished cell's cell.json and
config.json, timings.json, windows.jsonl), and beside it results.md, timings.json, windows.jsonl
and gpu_study.log to read at once. `merge` unpacks the tarball into the results folder; the next
window reads it from there (it travels with the working tree).

Estimates: a pack of m seeds of (scheme, depth) costs start-up + compilation + steps x ensemble
step time x 1.15 (evaluations, logging, margin). The step time is, in this order: measured for
that (scheme, depth) and pack size (finished cells: `seconds_per_step` x members; stopped packs:
their metrics.jsonl, kept in timings.json); measured for another pack size m' (scaled by m/m' when
larger, sqrt(m/m') when smaller: a smaller ensemble uses the GPU less well); Euler's at that depth
scaled by the F evaluations per forward; else the config docstring's prior (the measured cost per
image of one ResNet on an H200, applied to every image of the ensemble), and then a pack has at
most 4 seeds, so that an optimistic prior costs half a pack, not a window.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

STUDY_CONFIG = "experiments/configs/fashion_mnist_gpu_study.py"
RESULTS_DIR = "experiments/results/fashion_mnist_gpu_study"
WORKDIR = "runs/fashion_mnist_gpu_study"
QUICK_RESULTS_DIR = "runs/fashion_mnist_gpu_study_quick_results"  # a rehearsal never touches the real one
QUICK_WORKDIR = "runs/fashion_mnist_gpu_study_quick"
REFERENCE_SCHEME = "euler"
QUESTION_SCHEMES = ("euler", "lm")  # the study's questions: LM vs Euler at equal depth, LM-d vs Euler-(2d-2)
PACK_SIZES = (8, 4, 2, 1)

# Prior cost of one training image (forward and backward), in seconds, with E residual-function
# evaluations per forward: 14.6 us + 0.93 us * E. From one ResNet at batch 256, bfloat16, on an
# H200 (experiments/RESULTS.md §2): 5.9 ms per step at depth 20 (E = 9), 10.2 ms at depth 56 (E = 27).
PRIOR_IMAGE_SECONDS = (14.6e-6, 0.93e-6)
PRIOR_FIRST_STEP_SECONDS = 60.0  # start of fit to the first step (compilation, cuDNN autotuning)
PRIOR_STARTUP_SECONDS = 20.0  # a pack's process: Python, JAX, the data into memory
OVERHEAD = 1.15  # evaluations once per epoch, logging, margin
REPORT_RESERVE_SECONDS = 45.0  # kept at the end of the budget for the report and the tarball
MAX_UNMEASURED_PACK = 4  # seeds in a pack whose step time is only the prior's guess
REQUIRED_MODULES = ("jax", "flax", "optax", "orbax.checkpoint", "chex", "ml_collections", "tensorboardX", "scipy",
                    "matplotlib", "tqdm", "numpy")

GroupKey = tuple[str, int]  # (scheme, depth)


# ------------------------------------------------------------------------------------------------
# The grid: config, order, what is left


def study_config(quick: bool = False, config_path: str = STUDY_CONFIG):
    """The study's experiment config (`get_config("quick")` with `quick`)."""
    from experiments import grid

    argv = ["gpu_study", f"--config={config_path}{':quick' if quick else ''}"]
    config, _ = grid.parse_cli_config(argv, config_path)
    return config


def evaluations(config, scheme: str, depth: int) -> int:
    """F evaluations per forward of the network the cell trains (`compare_schemes`' count)."""
    from experiments import compare_schemes

    return compare_schemes.evaluations_per_forward(config, scheme, depth)


def evaluation_counter(config) -> Callable[[str, int], int]:
    """`evaluations` for this config, each (scheme, depth) counted once (a count traces the network)."""
    counts: dict[GroupKey, int] = {}

    def count(scheme: str, depth: int) -> int:
        if (scheme, depth) not in counts:
            counts[(scheme, depth)] = evaluations(config, scheme, depth)
        return counts[(scheme, depth)]

    return count


def priority(config, count: Callable[[str, int], int] | None = None) -> list[GroupKey]:
    """The (scheme, depth) groups the grid trains, in the order the windows train them.

    Euler and LM first, depth by depth, shallow first: LM vs Euler at depth 20 (and the sanity bar
    of ResNet-20) comes from the first windows, and LM-d vs Euler-(2d-2) as soon as the deeper Euler
    is in. Then the other schemes, depth by depth, the cheaper (fewer F evaluations per forward)
    first. Groups that compute Euler's network (`compare_schemes.identical_cells`) are not trained.
    """
    from experiments import compare_schemes

    count = count or (lambda scheme, depth: evaluations(config, scheme, depth))
    identical = compare_schemes.identical_cells(config)
    groups = [(s, int(d)) for s in config.schemes for d in config.depths if (s, int(d)) not in identical]
    schemes = list(config.schemes)

    def rank(group: GroupKey):
        scheme, depth = group
        question = scheme in QUESTION_SCHEMES
        return (0 if question else 1, depth, 0 if question else count(scheme, depth), schemes.index(scheme))

    return sorted(groups, key=rank)


def pending_seeds(config, workdir: pathlib.Path) -> dict[GroupKey, list[int]]:
    """`{(scheme, depth): seeds without a finished cell under workdir}` for every trained group."""
    from experiments import compare_schemes

    pending: dict[GroupKey, list[int]] = {}
    for cell in compare_schemes.cells(config):
        if not (workdir / "cells" / cell.name / "cell.json").exists():
            key = (cell.labels["scheme"], int(cell.labels["depth"]))
            pending.setdefault(key, []).append(int(cell.labels["seed"]))
    return pending


def cell_names(scheme: str, depth: int, seeds: Sequence[int]) -> list[str]:
    return [f"{scheme}-d{depth}-s{seed}" for seed in seeds]


def steps_per_cell(config) -> int:
    """Optimizer steps of one cell (the trainer's `RunLength` from the config and the train split)."""
    from cnn import data
    from cnn.train import loop

    train = loop.resolve_config(config.train)
    if int(train.num_train_steps) > 0:
        return int(train.num_train_steps)
    source = data.get_source(train.dataset, train.train_split, data_dir=train.data_dir or None, in_memory=True)
    examples = len(next(iter(source.values()))) if isinstance(source, Mapping) else len(source)
    steps_per_epoch = max(1, examples // int(train.batch_size))
    return loop.RunLength.from_config(train, steps_per_epoch).total_steps


# ------------------------------------------------------------------------------------------------
# Timings and estimates


@dataclasses.dataclass(frozen=True)
class Timing:
    """A measured ensemble: seconds per step of the whole pack, and from the start of fit to its
    first step (compilation)."""

    step_seconds: float
    first_step_seconds: float
    source: str  # "cell" (a finished cell), "stopped pack" or "simulated" (`plan`)


def measured_timings(workdir: pathlib.Path, partial: Mapping[str, Mapping[str, Any]] | None = None
                     ) -> dict[tuple[str, int, int], Timing]:
    """`{(scheme, depth, members): Timing}` from the finished cells under workdir (their
    `seconds_per_step` is the ensemble's step time over its members) and from `partial`
    (timings.json: packs stopped at a deadline); finished cells win."""
    timings: dict[tuple[str, int, int], Timing] = {}
    for key, value in (partial or {}).items():
        scheme, depth, members = value["scheme"], int(value["depth"]), int(value["members"])
        timings[(scheme, depth, members)] = Timing(float(value["step_seconds"]), float(value["first_step_seconds"]),
                                                   "stopped pack")
    for path in sorted((workdir / "cells").glob("*/cell.json")):
        summary = json.loads(path.read_text())
        members = int(summary.get("ensemble_members", 1))
        step = float(summary.get("seconds_per_step", float("nan"))) * members
        if not math.isfinite(step):
            continue
        labels = summary["labels"]
        timings[(labels["scheme"], int(labels["depth"]), members)] = Timing(
            step, float(summary.get("seconds_to_first_step", PRIOR_FIRST_STEP_SECONDS)), "cell")
    return timings


def _scaled(timing: Timing, members: int, measured_members: int) -> float:
    ratio = members / measured_members
    return timing.step_seconds * (ratio if ratio >= 1 else math.sqrt(ratio))


def prior_step_seconds(config, evaluations_per_forward: int, members: int) -> float:
    """The prior ensemble step time: every image of the pack at one ResNet's measured cost."""
    intercept, slope = PRIOR_IMAGE_SECONDS
    return members * int(config.train.batch_size) * (intercept + slope * evaluations_per_forward)


@dataclasses.dataclass(frozen=True)
class Estimate:
    """A pack's estimated wall time (start-up and compilation included) and ensemble step time."""

    seconds: float
    step_seconds: float
    basis: str  # where the step time came from


def estimate_pack(config, scheme: str, depth: int, members: int, steps: int,
                  timings: Mapping[tuple[str, int, int], Timing], count: Callable[[str, int], int],
                  prior_scale: float = 1.0) -> Estimate:
    """Estimated wall time of training one pack of `members` seeds of (scheme, depth)."""
    first_step = PRIOR_FIRST_STEP_SECONDS
    same = {m: t for (s, d, m), t in timings.items() if (s, d) == (scheme, depth)}
    euler = {m: t for (s, d, m), t in timings.items() if (s, d) == (REFERENCE_SCHEME, depth)}
    if members in same:
        step, first_step, basis = same[members].step_seconds, same[members].first_step_seconds, "measured"
    elif same:
        m = min(same, key=lambda k: abs(math.log(k / members)))
        step, first_step = _scaled(same[m], members, m), same[m].first_step_seconds
        basis = f"measured with {m} seeds"
    elif euler:
        m = min(euler, key=lambda k: abs(math.log(k / members)))
        step = _scaled(euler[m], members, m) * count(scheme, depth) / count(REFERENCE_SCHEME, depth)
        first_step, basis = euler[m].first_step_seconds, f"euler-d{depth} x F evaluations"
    else:
        step, basis = prior_step_seconds(config, count(scheme, depth), members) * prior_scale, "prior"
    seconds = PRIOR_STARTUP_SECONDS + first_step + OVERHEAD * steps * step
    return Estimate(seconds, step, basis)


@dataclasses.dataclass(frozen=True)
class Pack:
    """Seeds of one (scheme, depth) trained as one ensemble program (`grid.run_pack`)."""

    scheme: str
    depth: int
    seeds: tuple[int, ...]
    estimate: Estimate

    @property
    def cells(self) -> list[str]:
        return cell_names(self.scheme, self.depth, self.seeds)

    @property
    def name(self) -> str:
        return f"{self.scheme}-d{self.depth}-s{'-'.join(map(str, self.seeds))}"


def pack_sizes(unfinished: int) -> list[int]:
    """Pack sizes to try, largest first: all unfinished seeds, then 8, 4, 2, 1 below that."""
    return [unfinished] + [size for size in PACK_SIZES if size < unfinished]


def choose_pack(order: Sequence[GroupKey], pending: Mapping[GroupKey, Sequence[int]], remaining: float,
                estimate: Callable[[str, int, int], Estimate], skip: Sequence[GroupKey] = (),
                max_unmeasured: int = MAX_UNMEASURED_PACK) -> Pack | None:
    """The next pack: the first group in `order` with unfinished seeds and a pack size whose
    estimate fits in `remaining` seconds (largest first; its first seeds). A group that does not
    fit at any size is passed over for a later, cheaper one. None when nothing fits.

    A pack estimated from the prior alone (nothing of its depth measured yet) has at most
    `max_unmeasured` seeds: if the prior is optimistic, the first pack still finishes and measures
    the step time for the rest, instead of being stopped at the deadline with nothing to show."""
    for group in order:
        seeds = list(pending.get(group, ()))
        if not seeds or group in skip:
            continue
        for size in pack_sizes(len(seeds)):
            guess = estimate(group[0], group[1], size)
            if guess.basis == "prior" and size > max_unmeasured:
                continue
            if guess.seconds <= remaining:
                return Pack(group[0], group[1], tuple(seeds[:size]), guess)
    return None


def stopped_pack_timing(workdir: pathlib.Path, pack: Pack, batch_size: int) -> dict[str, Any] | None:
    """The step time a stopped pack measured before the deadline (its metrics.jsonl), or None."""
    from experiments import grid

    metrics = workdir / "packs" / pack.name / "metrics.jsonl"
    if not metrics.exists():
        return None
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    history = [r for r in records if r.get("member", 0) == 0]
    step = grid.median_step_seconds(history, batch_size)
    if not math.isfinite(step):
        return None
    steps = max((int(r["step"]) for r in history), default=0)
    return {"scheme": pack.scheme, "depth": pack.depth, "members": len(pack.seeds), "step_seconds": step,
            "first_step_seconds": PRIOR_FIRST_STEP_SECONDS, "steps_reached": steps}


# ------------------------------------------------------------------------------------------------
# The window


class Log:
    """Prints and appends to the window's log file."""

    def __init__(self, path: pathlib.Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, message: str) -> None:
        line = f"[{datetime.datetime.now(datetime.timezone.utc):%H:%M:%S}] {message}"
        print(line, flush=True)
        with self.path.open("a") as handle:
            handle.write(line + "\n")


def device_name() -> str:
    """The accelerator's name from nvidia-smi (without starting JAX on it), else "cpu"."""
    try:
        result = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return "cpu"
    names = [line.strip() for line in result.stdout.splitlines() if line.strip()]
    return ", ".join(names) or "cpu"


def missing_modules() -> list[str]:
    import importlib.util

    missing = []
    for name in REQUIRED_MODULES:
        try:
            if importlib.util.find_spec(name) is None:
                missing.append(name)
        except ModuleNotFoundError:
            missing.append(name)
    return missing


def seed_workdir(results: pathlib.Path, workdir: pathlib.Path) -> int:
    """Copies the committed cells (cell.json, config.json) into the workdir where it has none;
    returns how many were copied."""
    copied = 0
    for source in sorted((results / "cells").glob("*/cell.json")):
        target = workdir / "cells" / source.parent.name
        if (target / "cell.json").exists():
            continue
        target.mkdir(parents=True, exist_ok=True)
        for name in ("config.json", "cell.json"):  # cell.json last: it marks the cell finished
            if (source.parent / name).exists():
                shutil.copy2(source.parent / name, target / name)
        copied += 1
    return copied


def _kill(process: subprocess.Popen) -> None:
    """Stops a pack's process group: SIGTERM, then SIGKILL after 10 s."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        pass


def run_process(command: Sequence[str], log_path: pathlib.Path, timeout: float, env: Mapping[str, str]
                ) -> tuple[int | None, float]:
    """Runs `command` in its own process group, output appended to the log; `(exit code or None
    when stopped at the timeout, seconds)`."""
    started = time.monotonic()
    with log_path.open("a") as log:
        process = subprocess.Popen(list(command), stdout=log, stderr=subprocess.STDOUT, env=dict(env),
                                   start_new_session=True)
        try:
            code = process.wait(timeout=max(timeout, 0.0))
        except subprocess.TimeoutExpired:
            _kill(process)
            code = None
    return code, time.monotonic() - started


def _config_argument(quick: bool, config_path: str) -> str:
    return f"--config={config_path}{':quick' if quick else ''}"


def write_tarball(workdir: pathlib.Path, path: pathlib.Path) -> list[str]:
    """results.tar.gz of what is committed: the report, its plots, the finished cells' cell.json
    and config.json, timings.json and windows.jsonl (paths relative to the workdir)."""
    names = [p for p in ("results.md", "results.csv", "config.json", "timings.json", "windows.jsonl")
             if (workdir / p).exists()]
    names += sorted(str(p.relative_to(workdir)) for p in (workdir / "plots").glob("*.png"))
    for cell in sorted((workdir / "cells").glob("*/cell.json")):
        names.append(str(cell.relative_to(workdir)))
        if (cell.parent / "config.json").exists():
            names.append(str((cell.parent / "config.json").relative_to(workdir)))
    with tarfile.open(path, "w:gz") as tar:
        for name in names:
            tar.add(workdir / name, arcname=name, recursive=False)
    return names


MERGEABLE = ("results.md", "results.csv", "config.json", "timings.json", "windows.jsonl")


def _mergeable(name: str) -> bool:
    parts = pathlib.PurePosixPath(name).parts
    if not parts or name.startswith("/") or ".." in parts:
        return False
    if len(parts) == 1:
        return parts[0] in MERGEABLE
    if len(parts) == 2 and parts[0] == "plots":
        return parts[1].endswith(".png")
    return len(parts) == 3 and parts[0] == "cells" and parts[2] in ("cell.json", "config.json")


def merge(tarball: pathlib.Path, results: pathlib.Path) -> list[str]:
    """Unpacks a window's results.tar.gz into the results folder (only the report, plots, cells'
    cell.json / config.json, timings.json and windows.jsonl; anything else is refused)."""
    written = []
    with tarfile.open(tarball, "r:gz") as tar:
        for member in tar.getmembers():
            if not member.isfile():
                continue
            if not _mergeable(member.name):
                raise ValueError(f"{tarball}: unexpected member {member.name!r}; a window's tarball holds only "
                                 f"{MERGEABLE}, plots/*.png and cells/<name>/{{cell.json,config.json}}")
            target = results / member.name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(tar.extractfile(member).read())
            written.append(member.name)
    return written


def run_window(args: argparse.Namespace) -> int:
    """One window: seed the workdir from the results folder, train packs until the budget is
    spent, write the report and the tarball into `args.out`. Returns the exit code."""
    started = time.monotonic()
    budget_end = started + float(args.budget_s)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    workdir, results = pathlib.Path(args.workdir), pathlib.Path(args.results)
    workdir.mkdir(parents=True, exist_ok=True)
    log = Log(out / "gpu_study.log")
    child_env = dict(os.environ)  # the packs see the accelerator; this process plans on the CPU
    os.environ["JAX_PLATFORMS"] = "cpu"
    missing = missing_modules()
    if missing:
        log(f"missing Python modules {missing}: carry their wheels in .whl/ (see experiments/gpu_study.sh)")
        return 2
    config = study_config(args.quick, args.config)
    log(f"study {config.name}: schemes {list(config.schemes)}, depths {list(config.depths)}, seeds "
        f"{list(config.seeds)}; budget {args.budget_s:.0f} s; workdir {workdir}; results {results}")
    try:
        steps = steps_per_cell(config)
    except (FileNotFoundError, ValueError) as error:
        log(f"data not found for {config.train.dataset}: {error}")
        return 2
    copied = seed_workdir(results, workdir)
    timings_path = results / "timings.json"
    partial = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    count = evaluation_counter(config)
    order = priority(config, count)
    pending = pending_seeds(config, workdir)
    log(f"{copied} finished cells read from {results}; {sum(map(len, pending.values()))} cells left in "
        f"{len(pending)} groups; {steps} steps per cell; order: {', '.join(f'{s}-d{d}' for s, d in order)}")
    window = {"date": f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC", "device": device_name(),
              "budget_s": args.budget_s, "packs": []}
    failed: list[GroupKey] = []
    while True:
        timings = measured_timings(workdir, partial)
        remaining = budget_end - REPORT_RESERVE_SECONDS - time.monotonic()
        pack = choose_pack(order, pending, remaining,
                           lambda s, d, m: estimate_pack(config, s, d, m, steps, timings, count, args.prior_scale),
                           skip=failed)
        if pack is None:
            left = [(g, pending[g]) for g in order if pending.get(g) and g not in failed]
            if left:
                g, seeds = left[0]
                guess = estimate_pack(config, g[0], g[1], 1, steps, timings, count, args.prior_scale)
                log(f"stop: {remaining:.0f} s left; the next pack ({g[0]}-d{g[1]}, 1 seed) needs ~{guess.seconds:.0f} s")
            else:
                log("stop: every cell of the grid is finished" if not failed else f"stop: failed groups {failed}")
            break
        log(f"pack {pack.name}: {len(pack.seeds)} seeds, estimated {pack.estimate.seconds:.0f} s "
            f"({1000 * pack.estimate.step_seconds:.1f} ms/step, {pack.estimate.basis}); {remaining:.0f} s left")
        command = [sys.executable, "-m", "experiments.gpu_study", "pack", _config_argument(args.quick, args.config),
                   f"--workdir={workdir}", f"--cells={','.join(pack.cells)}"]
        code, seconds = run_process(command, out / "gpu_study.log", remaining, child_env)
        record = {"pack": pack.name, "estimate_s": round(pack.estimate.seconds, 1), "seconds": round(seconds, 1),
                  "basis": pack.estimate.basis}
        if code == 0:
            record["result"] = "finished"
            for seed in pack.seeds:
                pending[(pack.scheme, pack.depth)].remove(seed)
            accuracies = [json.loads((workdir / "cells" / n / "cell.json").read_text())["test_accuracy"]
                          for n in pack.cells]
            log(f"pack {pack.name}: finished in {seconds:.0f} s (estimated {pack.estimate.seconds:.0f} s); test "
                f"accuracy {', '.join(f'{100 * a:.2f}' for a in accuracies)}")
        elif code is None:
            record["result"] = "stopped at the deadline"
            timing = stopped_pack_timing(workdir, pack, int(config.train.batch_size))
            if timing is not None:
                partial[pack.name] = timing
                record["steps_reached"] = timing["steps_reached"]
            log(f"pack {pack.name}: stopped at the deadline after {seconds:.0f} s (estimated "
                f"{pack.estimate.seconds:.0f} s); measured {json.dumps(timing)}")
        else:
            record["result"] = f"failed (exit {code})"
            failed.append((pack.scheme, pack.depth))
            log(f"pack {pack.name}: failed with exit code {code} after {seconds:.0f} s (see the output above)")
        window["packs"].append(record)
        if code is None:
            break
    (workdir / "timings.json").write_text(json.dumps(partial, indent=2, sort_keys=True) + "\n")
    previous = results / "windows.jsonl"
    history = previous.read_text() if previous.exists() else ""
    window["finished_cells"] = len(list((workdir / "cells").glob("*/cell.json")))
    window["seconds"] = round(time.monotonic() - started, 1)
    (workdir / "windows.jsonl").write_text(history + json.dumps(window) + "\n")
    if window["finished_cells"]:
        command = [sys.executable, "-m", "experiments.compare_schemes", _config_argument(args.quick, args.config),
                   f"--workdir={workdir}", "--config.report_only=True", "--config.progress=False"]
        code, seconds = run_process(command, out / "gpu_study.log", max(budget_end - time.monotonic(), 30.0),
                                    child_env)
        log(f"report: exit {code} after {seconds:.0f} s")
    names = write_tarball(workdir, out / "results.tar.gz")
    for name in ("results.md", "timings.json", "windows.jsonl"):
        if (workdir / name).exists():
            shutil.copy2(workdir / name, out / name)
    trained = sum(1 for p in window["packs"] if p["result"] == "finished")
    log(f"window done in {time.monotonic() - started:.0f} s: {trained} packs trained, {window['finished_cells']} "
        f"cells finished in all; {out / 'results.tar.gz'} holds {len(names)} files (merge it with "
        f"`python -m experiments.gpu_study merge <it> --results {results}`)")
    return 1 if any(p["result"].startswith("failed") for p in window["packs"]) else 0


def run_pack(args: argparse.Namespace) -> int:
    """Trains the named cells (one ensemble pack) of the study, without the report."""
    from absl import logging

    from experiments import compare_schemes, grid

    logging.set_verbosity(logging.WARNING)
    workdir = pathlib.Path(args.workdir)
    config, _ = grid.parse_cli_config(["gpu_study", f"--config={args.config}", f"--workdir={workdir}"], STUDY_CONFIG)
    config.only = tuple(args.cells.split(","))
    config.progress = False
    grid.use_compilation_cache(workdir / ".jax_cache")
    import jax

    device = jax.devices()[0]
    print(f"pack {args.cells} on {getattr(device, 'device_kind', device.platform)}", flush=True)
    summaries = grid.run_experiment(config, workdir, compare_schemes.cells(config),
                                    compare_schemes.training_base(config),
                                    datasets=compare_schemes.datasets_factory(config))
    done = {s["name"] for s in summaries}
    missing = [name for name in config.only if name not in done]
    if missing:
        print(f"cells not finished: {missing}", file=sys.stderr)
        return 1
    return 0


def show_plan(args: argparse.Namespace) -> int:
    """The windows the grid takes from the committed cells on: each window filled by `choose_pack`
    with the same estimates as `run`, every pack taking what it was estimated to take (a
    simulation; nothing is trained)."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    config = study_config(args.quick, args.config)
    steps = steps_per_cell(config)
    results = pathlib.Path(args.results)
    partial = json.loads((results / "timings.json").read_text()) if (results / "timings.json").exists() else {}
    timings = measured_timings(results, partial)
    pending = {group: list(seeds) for group, seeds in pending_seeds(config, results).items()}
    count = evaluation_counter(config)
    order = priority(config, count)
    window_seconds = float(args.budget_s) - REPORT_RESERVE_SECONDS - PRIOR_STARTUP_SECONDS

    def estimate(scheme: str, depth: int, members: int) -> Estimate:
        return estimate_pack(config, scheme, depth, members, steps, timings, count, args.prior_scale)

    print(f"{config.name}: {steps} steps per cell, {sum(map(len, pending.values()))} cells left; windows of "
          f"{window_seconds:.0f} s of training (budget {args.budget_s:.0f} s less the report and start-up):")
    windows, total = 0, 0.0
    while any(pending.values()):
        windows += 1
        remaining, packs = window_seconds, []
        while (pack := choose_pack(order, pending, remaining, estimate)) is not None:
            remaining -= pack.estimate.seconds
            total += pack.estimate.seconds
            pending[(pack.scheme, pack.depth)] = pending[(pack.scheme, pack.depth)][len(pack.seeds):]
            # as if the pack measured what was estimated: later packs of the group are "measured"
            timings.setdefault((pack.scheme, pack.depth, len(pack.seeds)),
                               Timing(pack.estimate.step_seconds, PRIOR_FIRST_STEP_SECONDS, "simulated"))
            packs.append(f"{pack.name} ~{pack.estimate.seconds:.0f} s ({1000 * pack.estimate.step_seconds:.1f} "
                         f"ms/step, {pack.estimate.basis})")
        if not packs:
            print(f"  the next pack does not fit an empty window: {[g for g in order if pending.get(g)][:1]}")
            return 1
        print(f"  window {windows}: " + "; ".join(packs))
    print(f"{windows} windows, {total / 3600:.2f} h of estimated pack time")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.gpu_study", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("run", "plan"):
        command = commands.add_parser(name)
        command.add_argument("--quick", action="store_true", help="the rehearsal config (tiny, CPU)")
        command.add_argument("--config", default=STUDY_CONFIG, help="the study's config file")
        command.add_argument("--workdir", default=None, help=f"default {WORKDIR} ({QUICK_WORKDIR} with --quick)")
        command.add_argument("--budget-s", type=float, default=570.0,
                             help="seconds this window may take, report included (default 570, for a command "
                                  "run with timeout_s=600)")
        command.add_argument("--prior-scale", type=float, default=1.0,
                             help="multiplies the prior step times (not the measured ones)")
        command.add_argument("--results", default=None,
                             help=f"committed cells to start from (default {RESULTS_DIR}; {QUICK_RESULTS_DIR} "
                                  "with --quick)")
        if name == "run":
            command.add_argument("--out", default=os.environ.get("OUT", "runs/gpu_study_out"),
                                 help="where the tarball, report and log go (default $OUT)")
    pack = commands.add_parser("pack", help="(used by run) train the named cells as one pack")
    pack.add_argument("--config", required=True, help="the config file, with ':quick' for the rehearsal")
    pack.add_argument("--workdir", required=True)
    pack.add_argument("--cells", required=True)
    merger = commands.add_parser("merge", help="unpack a window's results.tar.gz into the results folder")
    merger.add_argument("tarball")
    merger.add_argument("--results", default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.command in ("run", "plan"):
        args.workdir = args.workdir or (QUICK_WORKDIR if args.quick else WORKDIR)
        args.results = args.results or (QUICK_RESULTS_DIR if args.quick else RESULTS_DIR)
    if args.command == "run":
        return run_window(args)
    if args.command == "plan":
        return show_plan(args)
    if args.command == "pack":
        return run_pack(args)
    written = merge(pathlib.Path(args.tarball), pathlib.Path(args.results))
    cells = sum(1 for name in written if name.endswith("cell.json"))
    print(f"merged {len(written)} files ({cells} cells) into {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
