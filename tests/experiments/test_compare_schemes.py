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
    config.schemes = ("euler", "lm", "midpoint")
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
    assert sorted(cells) == ["euler-d8-s0", "euler-d8-s1", "midpoint-d8-s0", "midpoint-d8-s1"]  # lm-d8 is euler's network
    summaries = {name: json.loads((workdir / "cells" / name / "cell.json").read_text()) for name in cells}
    assert summaries["euler-d8-s0"]["params"] == summaries["midpoint-d8-s1"]["params"] == euler
    # the two seeds of a scheme trained as one ensemble program, written as single cells
    assert summaries["euler-d8-s1"]["ensemble_members"] == 2 and summaries["euler-d8-s1"]["trained_in"].startswith("packs/")
    stored = json.loads((workdir / "cells" / "euler-d8-s1" / "config.json").read_text())
    assert stored["seed"] == 1 and stored["ensemble"]["size"] == 1  # the single run's config
    text = report.read_text()
    assert f"| euler | 8 | {euler:,} | 3 |" in text and "| lm | 8 |" in text and "= euler" in text
    assert "midpoint-d8 − euler-d8" in text and "## Paired comparisons" in text
    for plot in ("accuracy_vs_depth", "accuracy_vs_params", "learning_curves"):
        assert (workdir / "plots" / f"{plot}.png").stat().st_size > 1000


def test_seed_statistics_and_noise_verdict_are_computed_from_the_cells(finished_run):
    config, workdir, report = finished_run
    summaries = grid.finished_summaries(compare_schemes.cells(config), workdir)
    accuracies = [s["test_accuracy"] for s in summaries if s["group"] == "midpoint-d8"]
    stats = {s.group: s for s in grid.group_stats(summaries)}
    assert stats["midpoint-d8"].accuracy_mean == pytest.approx(np.mean(accuracies))
    assert stats["midpoint-d8"].accuracy_std == pytest.approx(np.std(accuracies, ddof=1))
    assert "## Verdict" in report.read_text()


def test_multistep_schemes_with_one_block_per_stage_are_reported_as_euler(finished_run):
    """Depth 8 has one block per stage, which LM starts with an Euler step: the same network,
    detected from the scheme's step rule, not trained, reported as identical."""
    config, workdir, report = finished_run
    assert compare_schemes.identical_cells(config) == {("lm", 8)}
    assert not (workdir / "cells" / "lm-d8-s0").exists()
    assert "Identical to their reference network (not trained, not compared): lm-d8 = euler-d8." in report.read_text()


def _summary(scheme, depth, seed, accuracy):
    return {"name": f"{scheme}-d{depth}-s{seed}", "group": f"{scheme}-d{depth}", "test_accuracy": accuracy,
            "labels": {"scheme": scheme, "depth": depth, "seed": seed}, "params": 1000, "train_loss": 0.1,
            "seconds_per_step": 0.1, "seconds_to_first_step": 1.0}


def test_paired_verdict_with_holm_on_hand_made_accuracies():
    """Midpoint is 5 points worse than Euler at depth 14 on every seed (small spread): Holm flags
    it; LM differs by +0.5 +- 1 points: no flag. Depth 8: LM is Euler's network."""
    config = tiny_config()
    config.schemes, config.depths = ("euler", "lm", "midpoint"), (8, 14)
    euler14 = [0.90, 0.91, 0.89, 0.90]
    summaries = [_summary("euler", 14, s, a) for s, a in enumerate(euler14)]
    summaries += [_summary("lm", 14, s, a + d) for s, (a, d) in enumerate(zip(euler14, (0.015, -0.005, 0.01, 0.0)))]
    summaries += [_summary("midpoint", 14, s, a - d) for s, (a, d) in enumerate(zip(euler14, (0.05, 0.049, 0.051, 0.05)))]
    summaries += [_summary(scheme, 8, s, 0.9) for scheme in ("euler", "midpoint") for s in range(4)]
    _, rows, notes, comparison = compare_schemes.table_rows(config, grid.group_stats(summaries), summaries)
    assert len(rows) == 6
    flags = {(r.candidate, r.reference): r.flag for r in comparison.rows}
    assert flags[(("midpoint", 14), ("euler", 14))] == "worse"
    assert flags[(("lm", 14), ("euler", 14))] == "none"
    assert flags[(("lm", 8), ("euler", 8))] == "identical"
    assert flags[(("midpoint", 8), ("euler", 8))] == "n/a" or flags[(("midpoint", 8), ("euler", 8))] == "none"
    worse = comparison.rows[[r.candidate for r in comparison.rows].index(("midpoint", 14))]
    assert worse.difference.mean == pytest.approx(-0.05)  # paired mean, by hand: -(0.05+0.049+0.051+0.05)/4
    assert any(note.startswith("midpoint-d14 is worse than euler-d14 by 5.00 points") for note in notes)
    lm_row = next(r for r in rows if r[0] == "lm" and r[1] == 14)
    assert lm_row[6].startswith("+0.50 [") and lm_row[7] == "none"


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


def test_interrupted_cells_resume_from_their_checkpoint(finished_run, monkeypatch):
    """Delete the summaries of a pack's cells: only that pack runs again, and fit resumes from its
    final checkpoint instead of training (no step is taken)."""
    config, workdir, _ = finished_run
    names = ("midpoint-d8-s0", "midpoint-d8-s1")
    before = {n: json.loads((workdir / "cells" / n / "cell.json").read_text()) for n in names}
    for name in names:
        (workdir / "cells" / name / "cell.json").unlink()
    calls, steps_taken = [], []
    real_fit = loop.fit

    def counting_fit(cfg, run_dir, *, callbacks=(), **kwargs):
        calls.append(str(run_dir))
        return real_fit(cfg, run_dir, callbacks=[*callbacks, lambda step, state: steps_taken.append(step)], **kwargs)

    monkeypatch.setattr(loop, "fit", counting_fit)
    compare_schemes.run(config, workdir)
    assert len(calls) == 1 and calls[0].endswith("packs/midpoint-d8-s0-1")
    assert steps_taken == []
    for name in names:
        after = json.loads((workdir / "cells" / name / "cell.json").read_text())
        assert after["test_accuracy"] == before[name]["test_accuracy"] and after["params"] == before[name]["params"]


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


def test_a_scheme_and_its_options_are_one_entry_of_config_schemes():
    config = tiny_config()
    config.schemes = ("euler", {"name": "lm", "constrain": True, "label": "lm_constrained"},
                      {"name": "backward_euler", "iterations": 3})
    config.depths = (14,)
    config.seeds = (0,)
    by_name = {cell.name: cell for cell in compare_schemes.cells(config)}
    assert set(by_name) == {"euler-d14-s0", "lm_constrained-d14-s0", "backward_euler-d14-s0"}
    assert by_name["lm_constrained-d14-s0"].overrides["model_options"] == {
        "depth": 14, "scheme": "lm", "scheme_options": {"constrain": True}}
    assert by_name["backward_euler-d14-s0"].labels["scheme"] == "backward_euler"
    # the F-evaluation count reads the options: 2 stages at depth 14 with 1 transition + 1 implicit block
    # of 3 sweeps each, and stage 1 with 2 implicit blocks: 3 * 2 + (1 + 3) * 2 = 14
    assert compare_schemes.evaluations_per_forward(config, "backward_euler", 14) == 14
    config.scheme_options = {"backward_euler": {"iterations": 2}}  # the old second address
    with pytest.raises(ValueError, match="config.scheme_options is gone"):
        compare_schemes.cells(config)


def test_every_config_builds_its_grid():
    for module in (demo, fashion_mnist, mnist, fashion_mnist_gpu, cifar10_lm_resnet):
        config = module.get_config()
        # every (scheme, depth, seed) except the cells that compute Euler's network
        identical = compare_schemes.identical_cells(config)
        expected = sum(1 for s in compare_schemes.specs(config) for d in config.depths if (s, int(d)) not in identical)
        assert len(compare_schemes.cells(config)) == expected * len(config.seeds)
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
