"""experiments/block_stability.py on a finished tiny comparison: one row per non-transition
block (hand count), each block's 'inside' fraction recomputed from its stability region."""

import json

import numpy as np

from cnn.data import load
from experiments import block_stability, compare_schemes
from tests.experiments.test_compare_schemes import tiny_config


def test_block_stability_rows_and_regions(tmp_path):
    config = tiny_config()
    config.schemes = ("euler", "lm")
    config.depths = (14,)
    config.seeds = (0,)
    compare_schemes.run(config, tmp_path)
    report = block_stability.main(["--workdir", str(tmp_path), "--cells", "euler-d14-s0", "lm-d14-s0",
                                   "--examples", "3", "--num-steps", "6"])
    record = json.loads((tmp_path / "stability.json").read_text())
    # depth 14: 2 blocks per stage; stages 2 and 3 start with a shape-changing transition block
    assert [row[0] for row in record["summary"]] == ["euler-d14-s0", "lm-d14-s0"]
    assert [row[2] for row in record["summary"]] == [4, 4]
    lm_rules = [row[2] for row in record["blocks"] if row[0] == "lm-d14-s0"]
    assert lm_rules[0] == "euler (start step)" and all(rule.startswith("lm (k=") for rule in lm_rules[1:])
    # the fraction inside, recomputed: Euler's region is the disc |1 + z| <= 1
    spectra, _ = block_stability.cell_spectra(tmp_path / "cells" / "euler-d14-s0", 3, 6)
    for spectrum, row in zip([s for s in spectra if not s.transition],
                             [r for r in record["blocks"] if r[0] == "euler-d14-s0"]):
        inside = np.abs(1 + spectrum.leading_h_lambda) <= 1 + 1e-9
        assert float(row[4]) == round(float(np.mean(inside)), 2)
    assert (tmp_path / "plots" / "stability_lm-d14-s0.png").stat().st_size > 1000
    assert "| euler-d14-s0 |" in report.read_text()


def test_a_cell_trained_in_an_ensemble_pack_is_read_as_its_member(tmp_path):
    """Seeds 0 and 1 train as one pack (no checkpoints in the cells): each cell's variables are
    its member's, checked by recomputing the cell's recorded test loss from them (numpy)."""
    config = tiny_config()
    config.schemes, config.depths, config.seeds = ("euler",), (8,), (0, 1)
    compare_schemes.run(config, tmp_path)
    losses = []
    for seed in (0, 1):
        cell_dir = tmp_path / "cells" / f"euler-d8-s{seed}"
        summary = json.loads((cell_dir / "cell.json").read_text())
        assert summary["trained_in"].startswith("packs/") and not (cell_dir / "checkpoints").exists()
        variables, stored = block_stability.cell_variables(cell_dir)
        assert stored["seed"] == seed
        model, images = block_stability.cell_model_and_images(stored, 10_000)  # the whole test split
        labels = next(iter(load(stored["dataset"], stored["eval_split"], 10_000, shuffle=False,
                                drop_remainder=False)))["label"]
        logits = np.asarray(model.apply(variables, images, train=False), np.float64)
        log_probs = logits - logits.max(-1, keepdims=True)
        log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
        loss = -np.mean(log_probs[np.arange(len(logits)), np.asarray(labels)])
        np.testing.assert_allclose(loss, summary["test_loss"], rtol=1e-4)
        losses.append(loss)
    assert abs(losses[0] - losses[1]) > 1e-3  # the members differ, so the wrong one would fail above
