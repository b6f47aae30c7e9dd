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
        assert row["map_speedup"] == pytest.approx(row["separate_seconds_per_step"] / row["map_seconds_per_step"])
        assert row["ensemble_images_per_second"] == pytest.approx(
            row["members"] * record["batch_size"] / row["ensemble_seconds_per_step"])
    saved = json.loads((tmp_path / "ensemble.json").read_text())
    assert saved["rows"][1]["members"] == 2 and "| 2 |" in (tmp_path / "ensemble.md").read_text()
