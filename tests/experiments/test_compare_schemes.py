"""The scheme comparison end to end on tiny budgets: table rows, parameter counts, resume."""

import json

import numpy as np
import pytest

from cnn.train import loop
from experiments import compare_schemes, grid
from experiments.configs import cifar10_lm_resnet, demo, fashion_mnist, fashion_mnist_gpu, mnist


def cifar_resnet_params(depth: int, width: int, in_channels: int, classes: int) -> int:
    """He et al.'s CIFAR ResNet with option-A shortcuts, counted layer by layer by hand."""
    n = (depth - 2) // 6
    count = 3 * 3 * in_channels * width + 2 * width  # stem conv + BN
    channels = width
    for stage in range(3):
        features = width * 2**stage
        for block in range(n):
            count += 3 * 3 * channels * features + 2 * features  # conv1 + BN
            count += 3 * 3 * features * features + 2 * features  # conv2 + BN
            channels = features
    return count + channels * classes + classes  # dense


def tiny_config():
    config = demo.get_config()
    config.schemes = ("euler", "lm")
    config.depths = (8,)
    config.seeds = (0, 1)
    config.model_options = {"width": 4}
    config.progress = False
    train = config.train
    train.num_train_steps = 4
    train.num_epochs = 0.0
    train.optimizer.warmup_epochs = 0.0
    train.optimizer.warmup_steps = 1
    train.parallelism = "single"
    train.eval_every_steps = 4
    train.log_every_steps = 2
    train.plot = False
    return config


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("compare")
    config = tiny_config()
    report = compare_schemes.run(config, workdir)
    return config, workdir, report


def test_table_has_one_row_per_scheme_and_depth_with_exact_param_counts(finished_run):
    config, workdir, report = finished_run
    rows = (workdir / "results.csv").read_text().strip().splitlines()
    header, body = rows[0].split(","), [r for r in rows[1:]]
    assert header[:3] == ["scheme", "depth", "params"]
    assert len(body) == len(config.schemes) * len(config.depths)
    euler = cifar_resnet_params(8, 4, in_channels=1, classes=10)
    cells = {json.loads((workdir / "cells" / c.name / "cell.json").read_text())["name"]: c for c in compare_schemes.cells(config)}
    assert len(cells) == 4
    summaries = {name: json.loads((workdir / "cells" / name / "cell.json").read_text()) for name in cells}
    assert summaries["euler-d8-s0"]["params"] == euler
    assert summaries["lm-d8-s1"]["params"] == euler + 3  # one k per block, 3 blocks at depth 8
    assert len(summaries["lm-d8-s0"]["knobs"]["k"]) == 3
    text = report.read_text()
    assert f"| euler | 8 | {euler:,} | 3 |" in text and f"| lm | 8 | {euler + 3:,} | 3 |" in text
    for plot in ("accuracy_vs_depth", "accuracy_vs_params", "learning_curves", "lm_k"):
        assert (workdir / "plots" / f"{plot}.png").stat().st_size > 1000


def test_seed_statistics_and_noise_verdict_are_computed_from_the_cells(finished_run):
    config, workdir, report = finished_run
    summaries = grid.finished_summaries(compare_schemes.cells(config), workdir)
    accuracies = [s["test_accuracy"] for s in summaries if s["group"] == "lm-d8"]
    stats = {s.group: s for s in grid.group_stats(summaries)}
    assert stats["lm-d8"].accuracy_mean == pytest.approx(np.mean(accuracies))
    assert stats["lm-d8"].accuracy_std == pytest.approx(np.std(accuracies, ddof=1))
    assert "## Verdict" in report.read_text()


def test_multistep_schemes_are_euler_with_one_block_per_stage(finished_run):
    """Depth 8 has one block per stage, which LM starts with an Euler step: the same network."""
    config, workdir, report = finished_run
    for seed in config.seeds:
        euler, lm = (json.loads((workdir / "cells" / f"{s}-d8-s{seed}" / "cell.json").read_text()) for s in ("euler", "lm"))
        assert lm["train_loss"] == pytest.approx(euler["train_loss"], rel=1e-5)
        assert lm["test_accuracy"] == euler["test_accuracy"]
    assert "At depth 8 every stage has a single block" in report.read_text()


def test_verdict_notes_count_chance_flags():
    def stat(scheme, depth, mean):
        labels = {"scheme": scheme, "depth": depth}
        return grid.GroupStats(f"{scheme}-d{depth}", labels, 4, mean, 0.01, 0.005, 1000, 0.1, 1.0)

    config = tiny_config()
    config.schemes, config.depths = ("euler", "lm", "midpoint"), (8, 14)
    stats = [stat("euler", 8, 0.9), stat("lm", 8, 0.9), stat("midpoint", 8, 0.9),
             stat("euler", 14, 0.9), stat("lm", 14, 0.905), stat("midpoint", 14, 0.85)]
    _, rows, notes = compare_schemes.table_rows(config, stats)
    assert len(rows) == 6
    assert notes[0].startswith("depth 14: midpoint is worse than euler by 5.00 points")
    # 4 comparisons, P(|Z| > 2) = 0.0455 each: 0.18 expected by chance
    assert "1 of 4 comparisons exceeds 2 standard errors; by chance alone about 0.2 would" in notes[1]
    assert notes[2].startswith("At depth 8 every stage has a single block") and "lm compute the same" in notes[2]


def test_noise_verdict_against_hand_computed_standard_errors():
    def stat(mean, std, count):
        return grid.GroupStats("g", {}, count, mean, std, 0.0, 0, 0.0, 0.0)

    # difference 0.02, s.e. sqrt(0.01^2/4 + 0.01^2/4) = 0.00707: 2.83 s.e. -> better
    difference, error, verdict = grid.compare_to_reference(stat(0.92, 0.01, 4), stat(0.90, 0.01, 4))
    assert difference == pytest.approx(0.02) and error == pytest.approx(0.0070711, rel=1e-4) and verdict == "better"
    assert grid.compare_to_reference(stat(0.905, 0.01, 4), stat(0.90, 0.01, 4))[2] == "within noise"
    assert grid.compare_to_reference(stat(0.85, 0.01, 4), stat(0.90, 0.01, 4))[2] == "worse"
    assert grid.compare_to_reference(stat(0.85, 0.0, 1), stat(0.90, 0.01, 4))[2].startswith("one seed")


def test_rerun_skips_finished_cells_and_rewrites_the_report(finished_run, monkeypatch):
    config, workdir, _ = finished_run

    def no_training(*args, **kwargs):
        raise AssertionError("a finished cell was retrained")

    monkeypatch.setattr(loop, "fit", no_training)
    report = compare_schemes.run(config, workdir)
    assert report.exists()
    report_only = tiny_config()
    report_only.report_only = True
    assert compare_schemes.run(report_only, workdir).exists()


def test_interrupted_cell_resumes_from_its_checkpoint(finished_run, monkeypatch):
    """Delete one cell's summary: only that cell runs again, and fit resumes from its final
    checkpoint instead of training (no step is taken)."""
    config, workdir, _ = finished_run
    before = json.loads((workdir / "cells" / "lm-d8-s1" / "cell.json").read_text())
    (workdir / "cells" / "lm-d8-s1" / "cell.json").unlink()
    calls, steps_taken = [], []
    real_fit = loop.fit

    def counting_fit(cfg, cell_dir, *, callbacks=(), **kwargs):
        calls.append(str(cell_dir))
        return real_fit(cfg, cell_dir, callbacks=[*callbacks, lambda step, state: steps_taken.append(step)], **kwargs)

    monkeypatch.setattr(loop, "fit", counting_fit)
    compare_schemes.run(config, workdir)
    assert len(calls) == 1 and calls[0].endswith("lm-d8-s1")
    assert steps_taken == []
    after = json.loads((workdir / "cells" / "lm-d8-s1" / "cell.json").read_text())
    assert after["test_accuracy"] == before["test_accuracy"] and after["params"] == before["params"]


def test_unknown_cells_and_schemes_are_rejected():
    config = tiny_config()
    config.only = ("rk9-d8-s0",)
    with pytest.raises(ValueError, match="rk9-d8-s0"):
        compare_schemes.run(config, "/tmp/never-written-compare")
    config = tiny_config()
    config.schemes = ("euler", "rk9")
    with pytest.raises(ValueError, match="rk9"):
        compare_schemes.cells(config)
    config = tiny_config()
    config.depths = (9,)
    with pytest.raises(ValueError, match="depth=9"):
        compare_schemes.cells(config)


def test_every_config_builds_its_grid():
    for module, cells in ((demo, 54), (fashion_mnist, 24), (mnist, 24), (fashion_mnist_gpu, 24), (cifar10_lm_resnet, 10)):
        config = module.get_config()
        assert len(compare_schemes.cells(config)) == cells
        loop.resolve_config(compare_schemes.training_base(config))  # no unknown training fields


def test_cifar10_recipe_runs_two_steps_on_fake_cifar_data(tmp_path):
    """The paper's recipe (He et al. ResNet vs pre-activation LM-ResNet with projections)."""
    from cnn.data import BatchIterator

    config = cifar10_lm_resnet.get_config()
    rng = np.random.default_rng(0)
    fake = {
        split: {"image": rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), "label": rng.integers(0, 10, n).astype(np.int32)}
        for split, n in (("train", 64), ("test", 16))
    }

    def datasets(split, **kwargs):
        return BatchIterator(fake[split], **kwargs)

    base = compare_schemes.training_base(config)
    assert base.batch_size == 128 and base.optimizer.decay_steps == (32_000, 48_000)
    base.batch_size = 8  # two steps on small batches: the recipe's model, optimizer and augmentation
    base.num_train_steps = 2
    base.parallelism = "single"
    base.checkpoint.every_steps = 0
    base.plot = False
    base.optimizer.decay_steps = (1,)
    by_name = {cell.name: cell for cell in compare_schemes.cells(config)}
    lm = grid.run_cell(base, by_name["lm-d20-s0"], tmp_path, datasets=datasets)
    assert lm["steps"] == 2 and np.isfinite(lm["test_loss"])
    cell_config = json.loads((tmp_path / "cells" / "lm-d20-s0" / "config.json").read_text())
    assert cell_config["model_options"]["preactivation"] is True and cell_config["model_options"]["shortcut"] == "B"
    assert cell_config["augment"] == "cifar_standard" and cell_config["optimizer"]["momentum"] == 0.9
