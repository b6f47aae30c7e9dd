"""Grid cells are reused only for the config that made them; reports describe the cells' own
configs; the experiments' command line reports unknown keys and stale cells in one line."""

import json

import pytest

from cnn.train import errors
from experiments import compare_schemes, grid
from tests.experiments.test_compare_schemes import tiny_config

# The tiny comparison of test_compare_schemes (depth 8, 4 steps), euler only, one seed, as flags.
TINY_FLAGS = [
    "--config=experiments/configs/demo.py", "--config.schemes=('euler',)", "--config.depths=(8,)",
    "--config.seeds=(0,)", "--config.model_options.width=4", "--config.progress=False",
    "--config.train.num_train_steps=4", "--config.train.num_epochs=0.0", "--config.train.optimizer.warmup_epochs=0.0",
    "--config.train.optimizer.warmup_steps=1", "--config.train.parallelism=single", "--config.train.eval_every_steps=4",
    "--config.train.log_every_steps=2", "--config.train.plot=False",
]


def _config(schemes=("euler", "midpoint"), **train):
    config = tiny_config()
    config.seeds = (0,)
    config.schemes = schemes
    for key, value in train.items():
        node = config.train
        *parents, leaf = key.split(".")
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return config


def _cell_files(workdir):
    return {p.parent.name: (p.read_text(), p.stat().st_mtime_ns) for p in sorted((workdir / "cells").glob("*/cell.json"))}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """The grid trained once with 4 steps at learning rate 0.05 (the demo's)."""
    workdir = tmp_path_factory.mktemp("grid")
    compare_schemes.run(_config(), workdir)
    return workdir


def test_a_rerun_with_another_budget_and_rate_is_refused_before_training(finished):
    """The issue's probe: more epochs and another learning rate on a finished comparison used to
    print the old table under the new budget."""
    before = _cell_files(finished)
    with pytest.raises(errors.RunConfigMismatchError) as caught:
        compare_schemes.run(_config(num_train_steps=8, **{"optimizer.learning_rate": 0.2}), finished)
    message = str(caught.value)
    for name in ("euler-d8-s0", "midpoint-d8-s0"):
        assert f"  {name}: num_train_steps: 4 -> 8; optimizer.learning_rate: 0.05 -> 0.2" in message
    assert "new --workdir" in message and "--config.train.on_mismatch=restart" in message
    assert "--config.train.on_mismatch=extend" not in message  # the rate changed too: not an extension
    assert sorted(caught.value.differences)[0] == ("euler-d8-s0:num_train_steps", 4, 8)
    assert _cell_files(finished) == before  # nothing trained, nothing rewritten
    # Keys that cannot change results may differ: the cells are reused.
    summaries = grid.run_experiment(_config(log_every_steps=1, eval_every_steps=2), finished,
                                    compare_schemes.cells(_config()),
                                    compare_schemes.training_base(_config(log_every_steps=1, eval_every_steps=2)))
    assert [s["name"] for s in summaries] == ["euler-d8-s0", "midpoint-d8-s0"] and _cell_files(finished) == before


def test_summaries_carry_their_stored_config_and_the_header_is_built_from_it(finished):
    summaries = grid.finished_summaries(compare_schemes.cells(_config()), finished)
    stored = json.loads((finished / "cells" / "midpoint-d8-s0" / "config.json").read_text())
    assert summaries[1]["config"] == stored and stored["num_train_steps"] == 4
    header = grid.training_header(summaries)
    assert header == ("dataset: `fashion_mnist_small` (train / test); budget 4 steps of batch 64; optimizer sgd lr 0.05 (cosine), "
                      "weight decay 0.0005; augmentation `none`; dtype float32")
    # A requested config with another budget does not change what the cells say they ran.
    assert grid.training_header(grid.finished_summaries(compare_schemes.cells(_config(num_train_steps=8)), finished)) == header


def test_the_header_lists_each_value_with_its_cells_when_cells_differ():
    def summary(name, **config):
        base = {"dataset": "digits", "train_split": "train", "eval_split": "test", "num_train_steps": 0,
                "num_epochs": 2.0, "batch_size": 64, "augment": "", "dtype": "float32",
                "optimizer": {"name": "sgd", "learning_rate": 0.1, "schedule": "cosine", "weight_decay": 0.0}}
        return {"name": name, "steps": 46, "config": {**base, **config}}

    header = grid.training_header([summary("a"), summary("b", num_epochs=4.0), summary("c"),
                                   {"name": "d", "steps": 1, "config": None}])
    assert ("budget 2 epochs (46 steps) of batch 64 [cells a, c] | budget 4 epochs (46 steps) of batch 64 [cells b]"
            in header)
    assert header.startswith("dataset: `digits` (train / test); budget") and header.endswith(
        "dtype float32; no stored config.json for cells d")


def test_on_mismatch_restart_retrains_the_stale_cells(tmp_path):
    compare_schemes.run(_config(schemes=("euler",)), tmp_path)
    config = _config(schemes=("euler",), num_train_steps=6)
    config.on_mismatch = "restart"  # the experiment config's setting
    report = compare_schemes.run(config, tmp_path)
    for name in ("euler-d8-s0",):
        cell = json.loads((tmp_path / "cells" / name / "cell.json").read_text())
        assert cell["steps"] == 6 and cell["eval_curve"][-1][0] == 6
        records = [json.loads(line) for line in (tmp_path / "cells" / name / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records if "train/loss" in r] == [2, 4, 6]  # one run from step 0, no old lines
    summaries = grid.finished_summaries(compare_schemes.cells(config), tmp_path)
    assert "budget 6 steps of batch 64" in grid.training_header(summaries)
    assert report.exists()


def test_only_with_restart_leaves_other_stale_cells_out(tmp_path):
    compare_schemes.run(_config(), tmp_path)
    config = _config(seed=0, **{"optimizer.learning_rate": 0.2})
    config.on_mismatch = "restart"
    config.only = ("euler-d8-s0",)
    with pytest.warns(UserWarning, match=r"cells \['midpoint-d8-s0'\] were trained with another config"):
        summaries = grid.run_experiment(config, tmp_path, compare_schemes.cells(config),
                                        compare_schemes.training_base(config))
    assert [s["name"] for s in summaries] == ["euler-d8-s0"]
    assert summaries[0]["config"]["optimizer"]["learning_rate"] == 0.2


def test_cli_reports_an_unknown_key_and_stale_cells_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(grid.pathlib.Path(__file__).resolve().parents[2])
    with pytest.raises(SystemExit) as caught:
        compare_schemes.main(["prog", *TINY_FLAGS, "--config.train.lerning_rate=0.2", f"--workdir={tmp_path}"])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("config error: unknown config key 'train.lerning_rate' (--config.train.lerning_rate); "
                          "did you mean --config.train.optimizer.learning_rate")
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "cells").exists()

    compare_schemes.main(["prog", *TINY_FLAGS, f"--workdir={tmp_path}"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as caught:
        compare_schemes.main(["prog", *TINY_FLAGS, "--config.train.num_train_steps=8", f"--workdir={tmp_path}"])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("config error: 1 cell(s) under") and "  euler-d8-s0: num_train_steps: 4 -> 8" in err
    assert "--config.train.on_mismatch=extend to continue them" in err  # only the budget grew
    with pytest.warns(UserWarning, match="run extended at step 4 to 8 steps"):
        compare_schemes.main(["prog", *TINY_FLAGS, "--config.train.num_train_steps=8",
                              "--config.train.on_mismatch=extend", f"--workdir={tmp_path}"])
    cell = json.loads((tmp_path / "cells" / "euler-d8-s0" / "cell.json").read_text())
    assert cell["steps"] == 8 and [step for step, _ in cell["eval_curve"]] == [4, 8]
    assert "budget 8 steps of batch 64" in grid.training_header(
        grid.finished_summaries(compare_schemes.cells(_config(schemes=("euler",))), tmp_path))
