"""`cnn.models.summary`: per-layer output shapes and parameter counts, and its CLI."""

import subprocess
import sys
import time

import pytest

import cnn.models as models
from cnn.models import summary


@pytest.fixture(scope="module")
def resnet50_summary():
    start = time.perf_counter()
    result = summary.summarize(models.create("resnet50"), (1, 224, 224, 3), name="resnet50")
    return result, time.perf_counter() - start


def test_resnet50_rows(resnet50_summary):
    result, seconds = resnet50_summary
    assert seconds < 10  # traced, not compiled
    rows = {row.path: row for row in result.rows}
    assert rows[()].params == result.total_params == 25_557_032
    assert rows[()].output_shape == "(1, 1000)"
    assert rows[("conv1",)].output_shape == "(1, 112, 112, 64)" and rows[("conv1",)].params == 64 * 3 * 7 * 7
    assert rows[("maxpool",)].output_shape == "(1, 56, 56, 64)" and rows[("maxpool",)].params == 0
    assert rows[("layer4",)].output_shape == "(1, 7, 7, 2048)"
    assert rows[("fc",)].params == 2048 * 1000 + 1000
    # a bottleneck's F and its projection shortcut: 64->64 (1x1), 64->64 (3x3), 64->256 (1x1) + 3 BNs
    assert rows[("layer1", "block0")].params == 64 * 64 + 9 * 64 * 64 + 64 * 256 + 2 * (64 + 64 + 256)
    assert rows[("layer1", "shortcut")].params == 64 * 256 + 2 * 256
    # leaf rows (no child rows) add up to the total
    paths = set(rows)
    leaves = [r for r in result.rows if not any(p[: len(r.path)] == r.path and p != r.path for p in paths)]
    assert sum(r.params for r in leaves) == result.total_params
    assert result.batch_stats == 53_120
    # rows come in call order: the stem before the stages, the head last
    order = [r.path for r in result.rows if len(r.path) == 1]
    assert order == [("conv1",), ("bn1",), ("maxpool",), ("layer1",), ("layer2",), ("layer3",), ("layer4",), ("fc",)]


def test_table_depth(resnet50_summary):
    result, _ = resnet50_summary
    shallow = result.table(depth=1).splitlines()
    assert len(shallow) == 2 + 9 + 4  # header, rule; root + 8 top-level modules; rule + 3 totals
    assert "Total params: 25,557,032" in result.table()


def test_cli_main(capsys):
    text = summary.main(["lecun_convnet"])
    assert capsys.readouterr().out.strip() == text.strip()
    assert "(1, 75, 75, 64)" in text and "(1, 14, 14, 64)" in text and "(1, 6, 6, 256)" in text
    assert "Total params: 52,197" in text
    text = summary.main(["googlenet", "--input-shape", "96,96,3", "--num-classes", "10", "--option",
                         "aux_logits=True", "--depth", "1"])
    assert "aux1" in text and "(1, 6, 6, 512)" in text  # inception4a at 96x96 input


def test_cli_bad_input_shape():
    with pytest.raises(ValueError, match=r"--input-shape='224,224' must be height,width,channels"):
        summary.main(["resnet18", "--input-shape", "224,224"])


def test_cli_subprocess():
    completed = subprocess.run(
        [sys.executable, "-m", "cnn.models.summary", "resnet18", "--depth", "1"],
        capture_output=True, text=True, timeout=120, check=True,
    )
    assert "Total params: 11,689,512" in completed.stdout
    failed = subprocess.run(
        [sys.executable, "-m", "cnn.models.summary", "resnet19"], capture_output=True, text=True, timeout=120
    )
    assert failed.returncode != 0 and "unknown model name='resnet19'" in failed.stderr
