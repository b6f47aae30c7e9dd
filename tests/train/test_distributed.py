"""Two local processes joined by `jax.distributed` train like one process on the same global batches."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from cnn.train import loop
from cnn.train.checkpoint import restore_state
from experiments.configs import train_digits
from tests.train.helpers import REPO_ROOT, digits_datasets, flat_leaves, read_metrics

STEPS = 12
OVERRIDES = {
    "num_train_steps": STEPS,
    "batch_size": 32,
    "log_every_steps": 1,
    "eval_every_steps": 6,
    "checkpoint.every_steps": 6,
    "optimizer.warmup_steps": 3,
    "progress": False,
    "plot": False,
}


def _config(parallelism):
    config = train_digits.get_config()
    for key, value in {**OVERRIDES, "parallelism": parallelism}.items():
        node = config
        *parents, leaf = key.split(".")
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return config


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_two_processes(workdir, parallelism):
    port = _free_port()
    flags = [f"--config.{key}={value}" for key, value in {**OVERRIDES, "parallelism": parallelism}.items()]
    processes = []
    for process_id in range(2):
        env = dict(
            os.environ,
            CNN_COORDINATOR=f"127.0.0.1:{port}",
            CNN_NUM_PROCESSES="2",
            CNN_PROCESS_ID=str(process_id),
            XLA_FLAGS="--xla_force_host_platform_device_count=1",  # one CPU device per process
        )
        command = [sys.executable, "-m", "cnn.train", "--config", "experiments/configs/train_digits.py", "--workdir", str(workdir), *flags]
        processes.append(subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [process.communicate(timeout=300) for process in processes]
    for process, (out, err) in zip(processes, outputs):
        assert process.returncode == 0, err[-3000:]
    return outputs


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("one")
    return loop.fit(_config("single"), workdir, datasets=digits_datasets)


def _check_against_one_process(workdir, one_process, outputs):
    reference = read_metrics(one_process.workdir)
    records = read_metrics(workdir)
    # Only process 0 wrote: one line per logged step and evaluation, no duplicates.
    assert [r["step"] for r in records] == [r["step"] for r in reference]
    assert "\"steps\": 12" in outputs[0][0] and "\"steps\"" not in outputs[1][0]  # only process 0 reports
    for got, want in zip(records, reference):
        assert got.keys() == want.keys()
        for key in got:
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), (got["step"], key)
    # The 2-process checkpoint restores into one process, equal to the 1-process final state.
    restored = restore_state(workdir / "checkpoints", one_process.state)
    assert int(restored.step) == STEPS
    for a, b in zip(flat_leaves((restored.params, restored.batch_stats)), flat_leaves((one_process.state.params, one_process.state.batch_stats))):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("parallelism", ["sharded", "pmap"])
def test_two_processes_match_one_process(tmp_path, one_process, parallelism):
    """Each process holds one CPU device and reads half of every global batch (shard_index)."""
    outputs = _run_two_processes(tmp_path, parallelism)
    _check_against_one_process(tmp_path, one_process, outputs)
