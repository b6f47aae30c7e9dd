"""experiments/detection.py end to end (tiny: the loss falls; slow: the recorded mAP is reached)."""

import json

import numpy as np
import pytest

from cnn.tasks.detection import LOSS_TERMS, YoloSpec
from cnn.tasks.detection.augmentation import make_augmentation
from cnn.tasks.detection.task import detection_task
from experiments import detection as experiment
from experiments.configs import detection as configs


def test_task_checks_the_batch_and_the_augmentation_its_options():
    task = detection_task(YoloSpec(grid_size=2, num_classes=3), image_size=(32, 32))
    with pytest.raises(ValueError, match=r"lacks \['boxes', 'classes', 'valid'\]"):
        task.select({"image": np.zeros((1, 32, 32, 3), np.uint8)})
    with pytest.raises(ValueError, match="scale=1.5"):
        make_augmentation((32, 32), scale=1.5)
    assert make_augmentation((32, 32), scale=0.0, shift=0.0, flip=False, exposure=1.0, saturation=1.0) is None


def test_experiment_runs_end_to_end_on_a_tiny_config(tmp_path):
    numbers = experiment.main(configs.get_tiny_config(), tmp_path)
    for name in ("results.md", "results.json", "detections.png", "learning_curve.png", "metrics.jsonl", "config.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    text = (tmp_path / "results.md").read_text()
    assert "mAP@0.5 (VOC2010+ all-point)" in text and "mAP@0.5 (VOC07 11-point)" in text
    assert 0.0 <= numbers["map_voc2010"] <= 1.0 and 0.0 <= numbers["map_voc07"] <= 1.0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["final_eval"]["map"] == pytest.approx(numbers["map_voc2010"]) and saved["steps"] == 40
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in train] == [10, 20, 30, 40]
    # the YOLO loss (augmented batches) falls well within 40 steps: measured 10.4 -> 3.7
    assert train[-1]["train/loss"] < 0.5 * train[0]["train/loss"], train
    assert all(r["train/loss"] == pytest.approx(sum(r[f"train/{k}"] for k in LOSS_TERMS), rel=1e-5)
               for r in train)
    assert records[-1]["eval/map"] == pytest.approx(numbers["map_voc2010"])


# The recorded run (experiments/detection.py's docstring) reached test mAP@0.5 = 0.931 on a CPU;
# the threshold leaves room for other platforms' floating point.
RECORDED_MAP_THRESHOLD = 0.85


@pytest.mark.slow
def test_default_config_reaches_the_recorded_map(tmp_path):
    config = configs.get_config()
    config.progress = False
    numbers = experiment.main(config, tmp_path)
    assert numbers["map_voc2010"] >= RECORDED_MAP_THRESHOLD, numbers
