"""Ablations end to end on a tiny budget: rows per variant and the parameter identities."""

import pytest

from experiments import ablations, grid
from experiments.configs import ablations as ablation_config


def tiny_config(variants):
    config = ablation_config.get_config()
    config.depth = 8
    config.seeds = (0,)
    config.model_options = {"width": 4}
    config.progress = False
    config.variants = {name: config.variants[name] for name in variants}
    train = config.train
    train.num_train_steps = 2
    train.num_epochs = 0.0
    train.optimizer.warmup_epochs = 0.0
    train.optimizer.warmup_steps = 1
    train.parallelism = "single"
    train.eval_every_steps = 2
    train.log_every_steps = 1
    train.eval_split = "test[:64]"
    train.plot = False
    train.checkpoint.every_steps = 0
    return config


def test_ablation_grid_rows_and_parameter_identities(tmp_path):
    variants = ("euler", "lm", "lm_fixed_pos", "euler_tied_d14", "euler_tied_d32")
    config = tiny_config(variants)
    report = ablations.run(config, tmp_path)
    summaries = {s["group"]: s for s in grid.finished_summaries(ablations.cells(config), tmp_path)}
    assert set(summaries) == set(variants)
    euler = summaries["euler"]["params"]
    # one k per block that reads a history: at depth 8 stages 2 and 3 are a single transition
    # block (an Euler start step, no k); stage 1's block keeps its k (a history may be passed in)
    assert summaries["lm"]["params"] == euler + 1
    assert summaries["lm_fixed_pos"]["params"] == euler  # fixed k: no parameter
    # Tied stages: an entry block and one shared block per stage whatever the depth (n >= 2).
    assert summaries["euler_tied_d14"]["params"] == summaries["euler_tied_d32"]["params"]
    # Depth 8 (n = 1) has one block per stage; depth 14 tied adds one shared block to stages 2
    # and 3 (widths 8 and 16; stage 1's two blocks share one): two 3x3 convs + two BNs each.
    shared_blocks = sum(2 * (3 * 3 * c * c + 2 * c) for c in (8, 16))
    assert summaries["euler_tied_d14"]["params"] == euler + shared_blocks
    text = report.read_text()
    for name in variants:
        assert f"| {name} |" in text
    assert (tmp_path / "plots" / "ablations.png").stat().st_size > 1000
    assert (tmp_path / "results.csv").read_text().count("\n") == len(variants) + 1


def test_bad_variants_are_rejected():
    config = tiny_config(("euler", "lm"))
    config.baseline = "rk9"
    with pytest.raises(ValueError, match="baseline='rk9'"):
        ablations.cells(config)
    config = tiny_config(("euler",))
    config.variants.euler.depth = 14
    with pytest.raises(ValueError, match="unknown fields"):
        ablations.cells(config)
    config = tiny_config(("euler",))
    config.variants.euler.model_options = {"scheme": "lm"}  # the scheme has one address: variant.scheme
    with pytest.raises(ValueError, match=r"variants.euler.model_options sets \['scheme'\]"):
        ablations.cells(config)
    config = tiny_config(("euler",))
    del config.variants.euler["scheme"]
    with pytest.raises(ValueError, match="variants.euler has no 'scheme'"):
        ablations.cells(config)


def test_a_variant_scheme_value_becomes_the_models_scheme_and_options():
    config = tiny_config(("euler", "lm_constrained", "euler_tied"))
    by_group = {cell.group: cell.overrides["model_options"] for cell in ablations.cells(config)}
    assert by_group == {
        "euler": {"depth": 8, "scheme": "euler"},
        "lm_constrained": {"depth": 8, "scheme": "lm", "scheme_options": {"constrain": True, "k_bounds": (-1.0, 1.0)}},
        "euler_tied": {"depth": 8, "scheme": "euler", "tied": True},
    }
