"""`python -m cnn.train`: a short run writes its directory; bad configs exit before compiling."""

import json
import subprocess
import sys

from tests.train.helpers import REPO_ROOT, read_metrics

CONFIG = "experiments/configs/train_digits.py"


def _cli(workdir, *overrides):
    command = [sys.executable, "-m", "cnn.train", "--config", CONFIG, "--workdir", str(workdir), *overrides]
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)


def test_cli_trains_and_writes_run_directory(tmp_path):
    result = _cli(
        tmp_path,
        "--config.num_train_steps=30",
        "--config.optimizer.warmup_steps=5",
        "--config.parallelism=single",
        "--config.log_every_steps=10",
        "--config.eval_every_steps=15",
        "--config.checkpoint.every_steps=15",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 30 and summary["final_eval"]["count"] > 0
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["num_train_steps"] == 30 and config["optimizer"]["warmup_steps"] == 5  # overrides applied
    assert [r["step"] for r in read_metrics(tmp_path) if "train/loss" in r] == [10, 20, 30]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["15", "30"]
    assert (tmp_path / "plots" / "learning_curve.png").stat().st_size > 0


def test_cli_reports_bad_config_without_traceback(tmp_path):
    result = _cli(tmp_path, "--config.parallelism=sharded", "--config.batch_size=12")
    assert result.returncode == 2
    assert "config.batch_size=12 is not divisible by the 8 devices" in result.stderr
    assert "Traceback" not in result.stderr
