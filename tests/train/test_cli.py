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


# ------------------------------------------------------------------------------------------------
# One-line errors that say what failed (issue 20)

FAST = ("--config.num_train_steps=6", "--config.optimizer.warmup_steps=1", "--config.eval_every_steps=6",
        "--config.checkpoint.every_steps=6", "--config.log_every_steps=3", "--config.parallelism=single",
        "--config.progress=False", "--config.plot=False")


def _one_error_line(result, prefix):
    lines = [line for line in result.stderr.splitlines() if line.startswith(prefix)]
    assert lines, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return lines[0]


def test_a_mistyped_key_gets_the_closest_keys_in_one_line(tmp_path):
    result = _cli(tmp_path, *FAST, "--config.lerning_rate=0.2")
    assert result.returncode == 2
    line = _one_error_line(result, "config error: ")
    assert line.startswith("config error: unknown config key 'lerning_rate' (--config.lerning_rate); did you mean "
                           "--config.optimizer.learning_rate")
    nested = _cli(tmp_path, *FAST, "--config.chekpoint.every_steps=3")  # an unknown parent: absl raised KeyError
    assert nested.returncode == 2
    assert "did you mean --config.checkpoint.every_steps" in _one_error_line(nested, "config error: ")
    assert not (tmp_path / "config.json").exists()  # stopped before anything was written


def test_model_options_take_new_keys_and_a_rejected_option_is_a_config_error(tmp_path):
    result = _cli(tmp_path / "ok", *FAST, "--config.model_options.dropout_rate=0.25")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "ok" / "config.json").read_text())["model_options"]["dropout_rate"] == 0.25
    rejected = _cli(tmp_path / "bad", *FAST, "--config.model_options.dropout_rat=0.25")
    assert rejected.returncode == 2
    line = _one_error_line(rejected, "config error: ")
    assert "config.model='simple_cnn'" in line and "dropout_rat" in line and "unexpected keyword" in line


def test_a_workdir_that_is_a_file_is_a_file_system_error(tmp_path):
    blocker = tmp_path / "run"
    blocker.write_text("a file")
    result = _cli(blocker, *FAST)
    assert result.returncode == 6
    assert str(blocker) in _one_error_line(result, "file system error: ")


def test_a_checkpoint_folder_that_is_a_file_is_a_file_system_error(tmp_path):
    (tmp_path / "checkpoints").write_text("a file where the checkpoints go")
    result = _cli(tmp_path, *FAST)
    assert result.returncode == 6
    line = _one_error_line(result, "file system error: ")
    assert f"cannot write to {tmp_path / 'checkpoints'}: File exists" in line and "is a file, not a folder" in line


def test_a_stale_rerun_is_refused_before_compiling(tmp_path):
    """The README's second command on a finished run: bfloat16 and pmap on a float32 run."""
    first = _cli(tmp_path, *FAST)
    assert first.returncode == 0, first.stderr[-3000:]
    stored = (tmp_path / "config.json").read_text()
    results = (tmp_path / "results.json").read_text()
    second = _cli(tmp_path, *FAST, "--config.dtype=bfloat16", "--config.parallelism=pmap")
    assert second.returncode == 2, second.stderr[-3000:]
    assert "config error: " in second.stderr and "Traceback" not in second.stderr
    assert "  dtype: 'float32' -> 'bfloat16'" in second.stderr and "parallelism:" not in second.stderr
    assert "--config.on_mismatch=restart" in second.stderr
    assert (tmp_path / "config.json").read_text() == stored and (tmp_path / "results.json").read_text() == results
