"""The GPU study's window driver (experiments/gpu_study.py, gpu_study.sh): the order of the cells,
the pack chosen for the time left, the estimates against the config docstring's arithmetic, the
tarball a window hands back, and the QUICK=1 rehearsal end to end on CPU, resumed from its
merged results without training anything again."""

import io
import json
import os
import pathlib
import re
import subprocess
import sys
import tarfile
import time

import pytest

from experiments import gpu_study
from experiments.configs import fashion_mnist_gpu_study

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]

# F evaluations per forward of the CIFAR ResNets, by hand: 3n blocks for depth 6n + 2; an Euler,
# LM or AB2 step evaluates F once, a midpoint step twice except at the two shape-changing blocks.
HAND_EVALUATIONS = {
    (scheme, depth): (3 * (depth - 2) // 6) * (2 if scheme == "midpoint" else 1) - (2 if scheme == "midpoint" else 0)
    for scheme in ("euler", "lm", "midpoint", "ab2")
    for depth in (20, 56, 110)
}


def hand_count(scheme, depth):
    return HAND_EVALUATIONS[(scheme, depth)]


def test_hand_counts_are_the_networks_counts():
    config = fashion_mnist_gpu_study.get_config()
    for key in (("euler", 20), ("midpoint", 20), ("midpoint", 110)):
        assert gpu_study.evaluations(config, *key) == HAND_EVALUATIONS[key], key


def test_priority_answers_the_questions_first():
    """Euler and LM depth by depth (LM-56 vs Euler-110 as soon as Euler-110 is in), then AB2 before
    midpoint (fewer F evaluations) depth by depth."""
    order = gpu_study.priority(fashion_mnist_gpu_study.get_config(), hand_count)
    assert order == [
        ("euler", 20), ("lm", 20), ("euler", 56), ("lm", 56), ("euler", 110), ("lm", 110),
        ("ab2", 20), ("midpoint", 20), ("ab2", 56), ("midpoint", 56), ("ab2", 110), ("midpoint", 110),
    ]


def test_prior_reproduces_the_config_docstrings_arithmetic():
    """One H200 ResNet at batch 256: 5.9 ms/step at depth 20, 10.2 ms at 56 (RESULTS.md §2); an
    8-seed pack of batch 128 at that cost per image; 14,040 steps: 331 s (depth 20), 573 s (56),
    935 s (110), midpoint 424 s / 907 s / 1,631 s (the docstring's numbers, +-1%)."""
    config = fashion_mnist_gpu_study.get_config()
    per_image = {9: 5.9e-3 / 256, 27: 10.2e-3 / 256}
    for evaluations, seconds in per_image.items():
        assert gpu_study.prior_step_seconds(config, evaluations, 1) / 128 == pytest.approx(seconds, rel=0.02)
    expected = {("euler", 20): 331, ("euler", 56): 573, ("euler", 110): 935,
                ("midpoint", 20): 424, ("midpoint", 56): 907, ("midpoint", 110): 1631}
    for (scheme, depth), seconds in expected.items():
        step = gpu_study.prior_step_seconds(config, hand_count(scheme, depth), 8)
        assert 14_040 * step == pytest.approx(seconds, rel=0.01), (scheme, depth)


def test_study_config_trains_14040_steps_per_cell(shared_data_dir, monkeypatch):
    monkeypatch.setenv("CNN_DATA_DIR", str(shared_data_dir))
    config = fashion_mnist_gpu_study.get_config()
    assert gpu_study.steps_per_cell(config) == 30 * (60_000 // 128) == 14_040


def test_estimates_use_measured_times_then_euler_then_the_prior():
    config = fashion_mnist_gpu_study.get_config()
    steps, overhead = 1000, gpu_study.OVERHEAD
    startup = gpu_study.PRIOR_STARTUP_SECONDS
    timings = {("euler", 20, 8): gpu_study.Timing(0.02, 30.0, "cell")}
    same = gpu_study.estimate_pack(config, "euler", 20, 8, steps, timings, hand_count)
    assert same.seconds == pytest.approx(startup + 30.0 + overhead * steps * 0.02) and same.basis == "measured"
    half = gpu_study.estimate_pack(config, "euler", 20, 4, steps, timings, hand_count)
    assert half.step_seconds == pytest.approx(0.02 * 0.5**0.5)  # a smaller pack: sqrt of the ratio
    double = gpu_study.estimate_pack(config, "euler", 20, 16, steps, timings, hand_count)
    assert double.step_seconds == pytest.approx(0.04)  # a larger one: linear
    midpoint = gpu_study.estimate_pack(config, "midpoint", 20, 8, steps, timings, hand_count)
    assert midpoint.step_seconds == pytest.approx(0.02 * 16 / 9) and midpoint.basis.startswith("euler-d20")
    prior = gpu_study.estimate_pack(config, "lm", 56, 2, steps, timings, hand_count)
    assert prior.basis == "prior"
    assert prior.seconds == pytest.approx(startup + gpu_study.PRIOR_FIRST_STEP_SECONDS
                                          + overhead * steps * 2 * 128 * (14.6e-6 + 0.93e-6 * 27))


def test_choose_pack_takes_the_largest_pack_that_fits_and_passes_over_what_does_not():
    def estimate(scheme, depth, members):  # 10 s start-up + 50 s per seed; the deep group 200 s per seed
        per_seed = 200.0 if depth == 110 else 50.0
        return gpu_study.Estimate(10.0 + per_seed * members, 0.0, "test")

    order = [("euler", 20), ("euler", 110), ("ab2", 20)]
    pending = {("euler", 20): [0, 1, 2, 3, 4, 5, 6, 7], ("euler", 110): [0, 1], ("ab2", 20): [3, 5]}
    pack = gpu_study.choose_pack(order, pending, 500.0, estimate)
    assert (pack.scheme, pack.depth, pack.seeds) == ("euler", 20, (0, 1, 2, 3, 4, 5, 6, 7))  # 410 s
    pack = gpu_study.choose_pack(order, pending, 300.0, estimate)
    assert pack.seeds == (0, 1, 2, 3) and pack.estimate.seconds == 210.0
    pending[("euler", 20)] = []
    # euler-d110 needs 210 s for one seed: 150 s left goes to the next group that fits
    pack = gpu_study.choose_pack(order, pending, 150.0, estimate)
    assert (pack.scheme, pack.depth, pack.seeds) == ("ab2", 20, (3, 5))
    assert gpu_study.choose_pack(order, pending, 50.0, estimate) is None
    assert gpu_study.choose_pack(order, pending, 1000.0, estimate, skip=[("euler", 110)]).scheme == "ab2"
    assert gpu_study.pack_sizes(8) == [8, 4, 2, 1] and gpu_study.pack_sizes(3) == [3, 2, 1]


def test_a_pack_estimated_from_the_prior_alone_has_at_most_four_seeds():
    def estimate(scheme, depth, members):
        return gpu_study.Estimate(10.0 * members, 0.0, "prior" if scheme == "lm" else "measured")

    pending = {("lm", 20): list(range(8)), ("euler", 20): list(range(8))}
    assert gpu_study.choose_pack([("lm", 20)], pending, 1000.0, estimate).seeds == (0, 1, 2, 3)
    assert gpu_study.choose_pack([("euler", 20)], pending, 1000.0, estimate).seeds == tuple(range(8))


def test_stopped_pack_timing_reads_member_0s_logged_rate(tmp_path):
    pack = gpu_study.Pack("lm", 56, (0, 1, 2, 3), gpu_study.Estimate(0.0, 0.0, "test"))
    metrics = tmp_path / "packs" / pack.name / "metrics.jsonl"
    metrics.parent.mkdir(parents=True)
    rows = [{"step": 10, "member": 0, "train/examples_per_sec": 100.0},  # the first window compiles: left out
            {"step": 20, "member": 0, "train/examples_per_sec": 1280.0},
            {"step": 30, "member": 0, "train/examples_per_sec": 640.0},
            {"step": 30, "member": 1, "train/examples_per_sec": 1.0}]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    timing = gpu_study.stopped_pack_timing(tmp_path, pack, batch_size=128)
    # median of 1280 and 640 examples/s = 960; 128 / 960 s per step
    assert timing["step_seconds"] == pytest.approx(128 / 960) and timing["steps_reached"] == 30
    assert timing["members"] == 4 and (timing["scheme"], timing["depth"]) == ("lm", 56)


def test_a_process_past_its_time_is_stopped(tmp_path):
    started = time.monotonic()
    code, seconds = gpu_study.run_process([sys.executable, "-c", "import time; time.sleep(60)"],
                                          tmp_path / "log", timeout=1.0, env=os.environ)
    assert code is None and seconds < 15 and time.monotonic() - started < 15
    code, _ = gpu_study.run_process([sys.executable, "-c", "print('ok')"], tmp_path / "log", 30.0, os.environ)
    assert code == 0 and (tmp_path / "log").read_text().strip() == "ok"


def test_merge_refuses_anything_but_results_and_cells(tmp_path):
    def tarball(names):
        path = tmp_path / f"t{len(list(tmp_path.iterdir()))}.tar.gz"
        with tarfile.open(path, "w:gz") as tar:
            for name in names:
                info = tarfile.TarInfo(name)
                info.size = 2
                tar.addfile(info, io.BytesIO(b"{}"))
        return path

    good = tarball(["results.md", "plots/a.png", "cells/lm-d20-s0/cell.json", "cells/lm-d20-s0/config.json"])
    assert sorted(gpu_study.merge(good, tmp_path / "results")) == sorted(
        ["results.md", "plots/a.png", "cells/lm-d20-s0/cell.json", "cells/lm-d20-s0/config.json"])
    for bad in (["../escape.json"], ["cells/x/checkpoint.bin"], ["/abs/results.md"], ["packs/a/cell.json"]):
        with pytest.raises(ValueError, match="unexpected member"):
            gpu_study.merge(tarball(bad), tmp_path / "results")


def run_script(out, *arguments, budget=570):
    environment = {**os.environ, "QUICK": "1", "OUT": str(out), "PYTHON": sys.executable, "BUDGET_S": str(budget)}
    environment.pop("XLA_FLAGS", None)  # one CPU device, as on the command line
    result = subprocess.run(["bash", "experiments/gpu_study.sh", *map(str, arguments)], cwd=REPO_ROOT,
                            env=environment, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return (out / "gpu_study.log").read_text()


def test_quick_rehearsal_runs_a_window_and_the_next_one_trains_nothing(tmp_path):
    """QUICK=1: two schemes at depth 20, two seeds, 3 steps. Window 1 trains both packs and hands
    back a tarball; merged into a results folder (what the lead commits), window 2 on a fresh
    machine (new workdir) reads every cell back and trains nothing."""
    results = tmp_path / "results"
    log = run_script(tmp_path / "out1", "--workdir", tmp_path / "work1", "--results", results)
    assert "pack euler-d20-s0-1: finished" in log and "pack lm-d20-s0-1: finished" in log
    assert "stop: every cell of the grid is finished" in log
    members = tarfile.open(tmp_path / "out1" / "results.tar.gz").getnames()
    assert {"results.md", "windows.jsonl", "cells/lm-d20-s1/cell.json", "cells/lm-d20-s1/config.json"} <= set(members)
    assert not any(name.startswith("packs/") for name in members)
    assert len(list((tmp_path / "out1").iterdir())) <= 8  # what the device tool brings back
    gpu_study.merge(tmp_path / "out1" / "results.tar.gz", results)
    first = {p.parent.name: json.loads(p.read_text())["test_accuracy"] for p in results.glob("cells/*/cell.json")}
    assert sorted(first) == ["euler-d20-s0", "euler-d20-s1", "lm-d20-s0", "lm-d20-s1"]

    log = run_script(tmp_path / "out2", "--workdir", tmp_path / "work2", "--results", results)
    assert "4 finished cells read from" in log and "0 cells left" in log and "pack euler" not in log
    assert not (tmp_path / "work2" / "packs").exists()
    report = (tmp_path / "out2" / "results.md").read_text()
    assert "lm-d20 − euler-d20 | 2 |" in report
    windows = [json.loads(line) for line in (tmp_path / "out2" / "windows.jsonl").read_text().splitlines()]
    assert len(windows) == 2 and [len(w["packs"]) for w in windows] == [2, 0]
    second = {p.parent.name: json.loads(p.read_text())["test_accuracy"]
              for p in (tmp_path / "work2").glob("cells/*/cell.json")}
    assert second == first


def test_a_window_too_short_for_any_pack_stops_before_training(tmp_path):
    log = run_script(tmp_path / "out", "--workdir", tmp_path / "work", "--results", tmp_path / "results", budget=60)
    assert re.search(r"stop: \d+ s left; the next pack \(euler-d20, 1 seed\) needs ~\d+ s", log), log
    assert not (tmp_path / "work" / "packs").exists() and (tmp_path / "out" / "results.tar.gz").exists()
