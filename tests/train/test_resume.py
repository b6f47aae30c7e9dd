"""Exact resume: a run SIGKILLed after a checkpoint and resumed equals an uninterrupted run."""

import os
import signal
import subprocess
import sys

import numpy as np

from cnn.train import loop
from tests.train.helpers import REPO_ROOT, digits_datasets, flat_leaves, read_metrics
from tests.train.resume_worker import resume_config

CHECKPOINT_STEP, STALL_STEP = 10, 17


def test_sigkill_then_resume_is_bit_identical(tmp_path):
    killed_dir, straight_dir = tmp_path / "killed", tmp_path / "straight"
    worker_log = tmp_path / "worker.stderr"
    with worker_log.open("w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.train.resume_worker", str(killed_dir), str(CHECKPOINT_STEP), str(STALL_STEP)],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    try:
        for line in process.stdout:  # blocks until the worker is mid-run, past its checkpoint
            if line.strip() == "STALLED":
                break
        else:
            raise AssertionError(
                f"worker ended (code {process.wait()}) without reaching step {STALL_STEP}:\n"
                + worker_log.read_text()[-3000:]
            )
        os.kill(process.pid, signal.SIGKILL)
        assert process.wait(timeout=60) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
    # The killed run got past its checkpoint: metrics of steps 12 and 15 were logged.
    logged = [r["step"] for r in read_metrics(killed_dir)]
    assert max(logged) == 15 and CHECKPOINT_STEP in logged
    assert sorted(int(p.name) for p in (killed_dir / "checkpoints").iterdir() if p.name.isdigit()) == [CHECKPOINT_STEP]

    resumed = loop.fit(resume_config(), killed_dir, datasets=digits_datasets)
    straight = loop.fit(resume_config(), straight_dir, datasets=digits_datasets)

    assert int(resumed.state.step) == int(straight.state.step) == 30
    for a, b in zip(flat_leaves(resumed.state), flat_leaves(straight.state)):  # params, BN stats, opt state, rng
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    assert read_metrics(killed_dir) == read_metrics(straight_dir)
    assert resumed.final_eval == straight.final_eval
