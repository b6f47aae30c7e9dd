"""benchmarks/ensemble.py in quick mode: it runs, and its ratios are computed from its own timings."""

import json
import pathlib
import sys

import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parents[2] / "benchmarks"


def test_ensemble_benchmark_quick(tmp_path):
    sys.path.insert(0, str(BENCHMARKS))
    import ensemble as bench

    record = bench.main(["--quick", "--out", str(tmp_path)])
    rows = {row["members"]: row for row in record["rows"]}
    assert sorted(rows) == [1, 2]
    for row in rows.values():
        assert row["speedup"] == pytest.approx(row["separate_seconds_per_step"] / row["ensemble_seconds_per_step"])
        assert row["grouped_speedup"] == pytest.approx(row["separate_seconds_per_step"] / row["grouped_seconds_per_step"])
        assert row["ensemble_images_per_second"] == pytest.approx(
            row["members"] * record["batch_size"] / row["ensemble_seconds_per_step"])
    # the convolution profile (quick: the first stage's shape) and every pass, three ways
    convolutions = record["convolutions"]
    assert [(r["stage"], r["side"], r["channels"], r["members"]) for r in convolutions] == [(1, 32, 16, 2)] * 3
    assert [r["pass"] for r in convolutions] == list(bench.CONV_PASSES)
    for row in convolutions:
        assert row["per member vs separate"] == pytest.approx(row["per member ms"] / row["separate ms"])
        assert row["grouped vs separate"] == pytest.approx(row["grouped ms"] / row["separate ms"])
    saved = json.loads((tmp_path / "ensemble.json").read_text())
    assert saved["rows"][1]["members"] == 2 and "| 2 |" in (tmp_path / "ensemble.md").read_text()
    assert "| 1 (32, 16) | kernel gradient |" in (tmp_path / "ensemble.md").read_text()


def test_convolution_profile_shapes_follow_the_stages():
    """Side halves (rounded up) and width doubles per stage, as in a CIFAR ResNet."""
    sys.path.insert(0, str(BENCHMARKS))
    import ensemble as bench

    rows = bench.convolution_profile(2, 2, 7, 4, repeats=1, steps_per_repeat=1, stages=3)
    assert [(r["stage"], r["side"], r["channels"]) for r in rows[::3]] == [(1, 7, 4), (2, 4, 8), (3, 2, 16)]
