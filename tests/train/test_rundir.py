"""Run directories: which config keys change results, the rerun decision, writable folders,
command-line key checks and the error kinds (cnn.train.rundir, cnn.train.errors)."""

import json
import os
import time

import numpy as np
import pytest

from cnn.train import errors, rundir
from cnn.train.config import default_config
from experiments.configs import train_digits


def _store(workdir, config):
    """config.json as `fit` writes it."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")


def _digits(**overrides):
    config = train_digits.get_config()
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return config


# ------------------------------------------------------------------------------------------------
# Which keys change results


def test_every_default_key_is_either_a_result_key_or_ignored_with_a_reason():
    documented = rundir.__doc__
    for key in rundir.flatten_config(default_config()) | {"model_options.x": 0, "task_options.x": 0}:
        result = rundir.is_result_key(key)
        assert result == (not rundir._matches(key, rundir.IGNORED_KEYS))
        if not result:  # each ignored key has its sentence in the module docstring
            top = key.split(".")[0]
            assert f"    {top}" in documented or f"{top}.*" in documented, key
    for pattern in rundir.IGNORED_KEYS:
        assert pattern.split(".")[0] in documented
    # The keys the issue names as result-changing.
    for key in ("model", "model_options.widths", "dataset", "optimizer.learning_rate", "optimizer.schedule", "seed",
                "data_seed", "dtype", "loss.label_smoothing", "augment", "num_train_steps", "ensemble.size"):
        assert rundir.is_result_key(key), key
    for key in ("log_every_steps", "eval_every_steps", "progress", "plot", "checkpoint.max_to_keep", "parallelism",
                "deterministic", "on_mismatch"):
        assert not rundir.is_result_key(key), key
    # A key nobody listed yet counts as result-changing (the safe default).
    assert rundir.is_result_key("a_future_option") and rundir.is_result_key("ensemble.members.weighting")


def test_config_differences_lists_result_keys_only():
    stored = json.loads(_digits().to_json_best_effort())  # as read back from config.json: tuples are lists
    assert stored["model_options"]["widths"] == [16, 32]
    requested = _digits(**{
        "parallelism": "pmap", "log_every_steps": 1, "checkpoint.max_to_keep": 9, "progress": False,  # ignored
        "dtype": "bfloat16", "optimizer.learning_rate": 0.2, "model_options.widths": (8, 16),  # result keys
    })
    requested.model_options.groups = 2  # a key only the requested config has
    assert rundir.config_differences(stored, requested) == [
        ("dtype", "float32", "bfloat16"),
        ("model_options.groups", rundir.ABSENT, 2),
        ("model_options.widths", (16, 32), (8, 16)),
        ("optimizer.learning_rate", 0.1, 0.2),
    ]
    assert rundir.config_differences(stored, _digits(parallelism="pmap", plot=False)) == []
    # Tuples equal lists; 2 equals 2.0; an empty sub-config equals an absent one.
    assert rundir.config_differences({"a": [1, [2, 3]], "b": 2, "c": {}}, {"a": (1, (2, 3)), "b": 2.0}) == []
    assert rundir.config_differences({"a": True}, {"a": 1}) == [("a", True, 1)]


def test_num_epochs_is_compared_only_when_the_budget_counts_epochs():
    steps = {"num_train_steps": 300, "num_epochs": 1.0}
    assert rundir.config_differences(steps, {**steps, "num_epochs": 5.0}) == []  # fit ignores it
    epochs = {"num_train_steps": 0, "num_epochs": 1.0}
    assert rundir.config_differences(epochs, {**epochs, "num_epochs": 2.0}) == [("num_epochs", 1.0, 2.0)]
    assert rundir.config_differences(steps, epochs) == [("num_train_steps", 300, 0)]


# ------------------------------------------------------------------------------------------------
# The rerun decision


def test_check_run_config_fresh_and_same(tmp_path):
    assert rundir.check_run_config(tmp_path / "new", _digits(), on_mismatch="error") == "fresh"
    _store(tmp_path, _digits())
    assert rundir.check_run_config(tmp_path, _digits(parallelism="pmap", eval_every_steps=7),
                                   on_mismatch="error") == "same"


def test_a_stale_rerun_is_refused_with_each_key_and_the_fixes(tmp_path):
    """The README's second command on an existing digits run: bfloat16 (and pmap) on a float32 run."""
    _store(tmp_path, _digits())
    before = sorted((p.name, p.stat().st_mtime_ns) for p in tmp_path.iterdir())
    requested = _digits(parallelism="pmap", dtype="bfloat16", **{"optimizer.schedule": "constant"})
    with pytest.raises(errors.RunConfigMismatchError) as caught:
        rundir.check_run_config(tmp_path, requested, on_mismatch="error")
    error = caught.value
    assert isinstance(error, errors.ConfigError) and isinstance(error, ValueError)
    assert error.differences == [("dtype", "float32", "bfloat16"), ("optimizer.schedule", "cosine", "constant")]
    message = str(error)
    assert "  dtype: 'float32' -> 'bfloat16'" in message and "  optimizer.schedule: 'cosine' -> 'constant'" in message
    assert "parallelism" not in message.split("Fix:")[0]  # parallelism may differ
    assert "new --workdir" in message and "--config.on_mismatch=restart" in message
    assert "--config.on_mismatch=extend to continue" not in message  # not a longer budget
    assert sorted((p.name, p.stat().st_mtime_ns) for p in tmp_path.iterdir()) == before  # reads only


def test_more_steps_can_be_extended_when_asked_and_nothing_else(tmp_path):
    _store(tmp_path, _digits())
    longer = _digits(num_train_steps=400)
    with pytest.raises(errors.RunConfigMismatchError, match=r"num_train_steps: 300 -> 400[\s\S]*on_mismatch=extend to "
                                                            r"continue this run to the new budget"):
        rundir.check_run_config(tmp_path, longer, on_mismatch="error")
    assert rundir.check_run_config(tmp_path, longer, on_mismatch="extend") == "extend"
    assert rundir.check_run_config(tmp_path, longer, on_mismatch="restart") == "restart"
    for not_an_extension in (_digits(num_train_steps=200), _digits(num_train_steps=400, seed=1)):
        with pytest.raises(errors.RunConfigMismatchError, match="not a longer budget"):
            rundir.check_run_config(tmp_path, not_an_extension, on_mismatch="extend")
    assert rundir.check_run_config(tmp_path, _digits(num_train_steps=200), on_mismatch="restart") == "restart"


def test_extension_in_epochs_needs_an_epoch_budget_on_both_sides():
    epochs = {"num_train_steps": 0, "num_epochs": 2.0, "seed": 0}
    assert rundir.is_extension(epochs, {**epochs, "num_epochs": 3.5})
    assert not rundir.is_extension(epochs, {**epochs, "num_epochs": 1.0})
    assert not rundir.is_extension(epochs, {**epochs, "num_train_steps": 500})  # unit changes: length unknown
    assert not rundir.is_extension(epochs, epochs)  # nothing to extend


def test_extension_record_states_the_schedule():
    record = rundir.extension_record(_digits().to_dict(), _digits(num_train_steps=400), from_step=300,
                                     total_steps=400)
    assert record["extended_from_step"] == 300 and record["total_steps"] == 400
    assert record["budget"] == {"num_train_steps": {"old": 300, "new": 400}}
    assert "learning-rate schedule was recomputed over 400 steps and continues from step 300" in record["note"]


def test_bad_on_mismatch_and_an_unreadable_config_json(tmp_path):
    with pytest.raises(errors.ConfigError, match=r"config.on_mismatch='resume' must be one of \['error', 'restart', "
                                                 r"'extend'\]"):
        rundir.check_run_config(tmp_path, _digits(), on_mismatch="resume")
    (tmp_path / "config.json").write_text('{"model": "simple')
    with pytest.raises(errors.ConfigError, match=rf"{tmp_path / 'config.json'} is not valid JSON"):
        rundir.check_run_config(tmp_path, _digits(), on_mismatch="error")
    assert rundir.check_run_config(tmp_path, _digits(), on_mismatch="restart") == "restart"


def test_reset_run_directory_removes_the_runs_outputs_only(tmp_path):
    for name in ("checkpoints/10/state", "events/x", "plots/p"):
        (tmp_path / name).mkdir(parents=True)
    for name in ("metrics.jsonl", "results.json", "config.json", "cell.json", "notes.txt"):
        (tmp_path / name).write_text("{}")
    removed = rundir.reset_run_directory(tmp_path, extra=("cell.json",))
    assert sorted(p.name for p in removed) == sorted(
        ["cell.json", "checkpoints", "metrics.jsonl", "events", "plots", "results.json", "config.json"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


# ------------------------------------------------------------------------------------------------
# Writable folders


def test_ensure_writable_creates_the_folder_and_leaves_nothing_behind(tmp_path):
    target = tmp_path / "a" / "b" / "checkpoints"
    rundir.ensure_writable(target)
    assert target.is_dir() and list(target.iterdir()) == []


def test_ensure_writable_names_the_file_in_the_way_within_a_second(tmp_path):
    (tmp_path / "run").write_text("a file where the workdir should be")
    started = time.perf_counter()
    with pytest.raises(errors.FileSystemError) as caught:
        rundir.ensure_writable(tmp_path / "run" / "checkpoints")
    assert time.perf_counter() - started < 1.0
    message = str(caught.value)
    assert message.startswith(f"cannot write to {tmp_path / 'run' / 'checkpoints'}: Not a directory")
    assert f"{tmp_path / 'run'} is a file, not a folder" in message
    assert isinstance(caught.value, OSError) and caught.value.filename == str(tmp_path / "run" / "checkpoints")
    assert errors.describe_error(caught.value) == ("file system error", 6)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_ensure_writable_names_permission_denied(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        with pytest.raises(errors.FileSystemError, match=rf"cannot write to {locked}: Permission denied"):
            rundir.ensure_writable(locked)
    finally:
        locked.chmod(0o755)


# ------------------------------------------------------------------------------------------------
# Command-line keys and error kinds


def test_a_mistyped_key_gets_the_closest_existing_keys():
    known = rundir.config_paths(default_config())
    with pytest.raises(errors.ConfigError) as caught:
        rundir.check_override_keys(["lerning_rate"], known)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("unknown config key 'lerning_rate' (--config.lerning_rate); did you mean "
                              "--config.optimizer.learning_rate")
    with pytest.raises(errors.ConfigError, match=r"'chekpoint.max_to_keep'.*did you mean --config.checkpoint.max_to_keep"):
        rundir.check_override_keys(["chekpoint.max_to_keep"], known)
    # Free-form options may gain keys; existing keys pass.
    rundir.check_override_keys(["model_options.depth", "optimizer.param_groups.head.lr_scale", "seed"], known)
    with pytest.raises(errors.ConfigError, match="'optimizer.depth'"):
        rundir.check_override_keys(["optimizer.depth"], known)


def test_closest_keys_by_whole_key_or_last_part():
    known = ["optimizer.learning_rate", "optimizer.warmup_steps", "seed", "batch_size"]
    assert errors.closest_keys("lerning_rate", known)[0] == "optimizer.learning_rate"
    assert errors.closest_keys("batch_sise", known) == ["batch_size"]
    assert errors.closest_keys("zzz", known) == []


def test_check_command_line_reads_the_config_file_and_the_overrides(tmp_path):
    config_file = tmp_path / "probe.py"
    config_file.write_text("import ml_collections\n"
                           "def get_config():\n"
                           "    return ml_collections.ConfigDict({'name': 'p', 'train': {'seed': 0, 'model_options': {}}})\n")
    assert rundir.command_line_overrides(["--config", "x.py", "--config.a.b=1", "--noconfig.c", "--workdir=w"]) == (
        "x.py", ["a.b", "c"])
    rundir.check_command_line([f"--config={config_file}", "--config.train.seed=3", "--config.train.model_options.w=4"])
    with pytest.raises(errors.ConfigError, match=r"'train.sed'.*did you mean --config.train.seed"):
        rundir.check_command_line([f"--config={config_file}", "--config.train.sed=3"])
    with pytest.raises(errors.ConfigError, match=r"'nam'"):
        rundir.check_command_line(["--config.nam=q"], default_config_file=str(config_file))


def test_error_kinds_and_prefixes():
    from cnn.train.loop import NonFiniteLossError

    cases = {
        errors.ConfigError("x"): ("config error", 2),
        errors.RunConfigMismatchError("x", differences=[]): ("config error", 2),
        errors.DataError("x"): ("data error", 4),
        errors.CheckpointError("x"): ("checkpoint error", 5),
        errors.FileSystemError("x"): ("file system error", 6),
        PermissionError(13, "Permission denied"): ("file system error", 6),
        ValueError("x"): ("config error", 2),
        NonFiniteLossError("x", step=1, value=float("nan"), last_checkpoint=None): ("non-finite loss", 3),
    }
    for error, expected in cases.items():
        assert errors.describe_error(error) == expected, error
    assert errors.describe_error(TypeError("a bug")) is None
    from flax.errors import ScopeParamShapeError

    assert errors.describe_error(ScopeParamShapeError("kernel", "/Conv_0", (3, 3, 1, 8), (3, 3, 1, 16))) == (
        "config error", 2)
    assert isinstance(errors.DataError("x"), RuntimeError) and isinstance(errors.FileSystemError("x"), OSError)
    assert errors.one_line(KeyError("no key 'a'"), "config error") == "config error: no key 'a'"


# ------------------------------------------------------------------------------------------------
# Through fit: refusal before compiling, extend, restart


def _short_digits(**overrides):
    config = _digits(num_train_steps=8, eval_every_steps=4, log_every_steps=2, parallelism="single", progress=False,
                     plot=False, **{"optimizer.warmup_steps": 2, "checkpoint.every_steps": 4})
    for key, value in overrides.items():
        config[key] = value
    return config


@pytest.fixture(scope="module")
def finished_digits_run(tmp_path_factory):
    from cnn.train import fit

    workdir = tmp_path_factory.mktemp("digits")
    fit(_short_digits(), workdir)
    return workdir


def test_fit_refuses_a_stale_workdir_before_compiling_and_writes_nothing(finished_digits_run, monkeypatch):
    from cnn.train import fit, loop

    before = {p.name: p.read_bytes() for p in finished_digits_run.iterdir() if p.is_file()}
    monkeypatch.setattr(loop, "compiled_steps", lambda *a, **k: pytest.fail("compiled before the check"))
    with pytest.raises(errors.RunConfigMismatchError) as caught:
        fit(_short_digits(dtype="bfloat16", parallelism="single", log_every_steps=4), finished_digits_run)
    assert caught.value.differences == [("dtype", "float32", "bfloat16")]
    assert {p.name: p.read_bytes() for p in finished_digits_run.iterdir() if p.is_file()} == before


def test_extend_continues_to_the_new_budget_with_the_schedule_recomputed(finished_digits_run, tmp_path):
    import shutil

    from cnn.train import fit
    from tests.train.helpers import read_metrics

    workdir = tmp_path / "run"
    shutil.copytree(finished_digits_run, workdir)
    with pytest.raises(errors.RunConfigMismatchError, match=r"num_train_steps: 8 -> 12[\s\S]*on_mismatch=extend"):
        fit(_short_digits(num_train_steps=12), workdir)
    with pytest.warns(UserWarning, match="run extended at step 8 to 12 steps: the learning-rate schedule was "
                                         "recomputed over 12 steps"):
        result = fit(_short_digits(num_train_steps=12, on_mismatch="extend"), workdir)
    assert int(result.state.step) == 12 and result.steps == 12
    records = read_metrics(workdir)
    assert [r["step"] for r in records if "train/loss" in r] == [2, 4, 6, 8, 10, 12]  # the old lines are kept
    # Steps 10 and 12 use the cosine schedule over 12 steps (2 of warmup), by hand:
    # lr(count) = 0.1 * (1 + cos(pi * (count - 2) / 10)) / 2, count = step - 1.
    logged = {r["step"]: r["train/learning_rate"] for r in records if "train/learning_rate" in r}
    for step in (10, 12):
        expected = 0.1 * (1 + np.cos(np.pi * (step - 1 - 2) / 10)) / 2
        assert logged[step] == pytest.approx(expected, abs=1e-7)  # float32; the old schedule gives 0 there
    assert logged[8] == pytest.approx(0.1 * (1 + np.cos(np.pi * (8 - 1 - 2) / 6)) / 2, abs=1e-7)  # the old schedule
    results = json.loads((workdir / "results.json").read_text())
    assert results["steps"] == 12 and len(results["extensions"]) == 1
    assert results["extensions"][0]["extended_from_step"] == 8
    assert results["extensions"][0]["budget"] == {"num_train_steps": {"old": 8, "new": 12}}
    assert json.loads((workdir / "config.json").read_text())["num_train_steps"] == 12
    # The extended run is now the stored one: the same command resumes it (config as fit stores it).
    from cnn.train import resolve_config, task_from_config

    requested = resolve_config(_short_digits(num_train_steps=12))
    requested.task_options = task_from_config(requested).record()
    assert rundir.check_run_config(workdir, requested, on_mismatch="error") == "same"


def test_restart_trains_the_workdir_again_from_step_zero(finished_digits_run, tmp_path):
    import shutil

    from cnn.train import fit
    from tests.train.helpers import read_metrics

    workdir, fresh = tmp_path / "run", tmp_path / "fresh"
    shutil.copytree(finished_digits_run, workdir)
    config = _short_digits(seed=1, on_mismatch="restart")
    restarted = fit(config, workdir)
    straight = fit(_short_digits(seed=1), fresh)
    assert restarted.final_eval == straight.final_eval
    assert read_metrics(workdir) == read_metrics(fresh)
    assert json.loads((workdir / "config.json").read_text())["seed"] == 1
