"""`benchmarks/demo_ensembles.py --quick`: both modes train the same grid (same cells, the same
accuracies up to rounding) and the record holds the side-by-side wall times. Slow (two
experiment processes, about a minute on 2 cores); no timed asserts."""

import json

import pytest

from tests.benchmarks.helpers import load_script


@pytest.mark.slow
def test_quick_side_by_side_trains_the_same_cells_both_ways(tmp_path):
    load_script("demo_ensembles").main(["--quick", "--out", str(tmp_path)])
    record = json.loads((tmp_path / "demo_ensembles.json").read_text())
    runs = {run["ensembles"]: run for run in record["runs"]}
    assert set(runs) == {True, False}
    # demo.py's schemes at depth 8, seeds 0 and 1; LM at one block per stage is Euler's network
    expected = {f"{scheme}-d8-s{seed}" for scheme in ("euler", "midpoint") for seed in (0, 1)}
    assert set(runs[True]["accuracies"]) == set(runs[False]["accuracies"]) == expected
    assert record["max_accuracy_difference"] <= 2 / 64  # 4 steps: at most a couple of the 64 test images
    assert record["speedup"] == pytest.approx(runs[False]["seconds"] / runs[True]["seconds"])
    assert "with and without ensembles" in (tmp_path / "demo_ensembles.md").read_text()
