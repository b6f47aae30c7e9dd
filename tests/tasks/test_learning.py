"""Fast checks that segmentation, detection and transfer learn through the one trainer.

Each trains a few dozen steps on synthetic or embedded data and must beat a baseline computed
from the same data (not copied from a run) by a margin derived from the data's size:

* segmentation: test mIoU above that of predicting the majority class (background) everywhere;
* detection: test mAP@0.5 above the untrained network's (evaluated by the same trainer);
* transfer (feature extraction from a digits-trained trunk): test accuracy above chance by
  three binomial standard errors of the test set.
"""

from __future__ import annotations

import numpy as np

import cnn.train
from cnn.data import BatchIterator, synthetic
from cnn.tasks import transfer
from cnn.tasks.detection import YoloSpec
from cnn.tasks.detection.task import detection_task
from cnn.tasks.segmentation import segmentation_task


def _config(**fields):
    config = cnn.train.default_config()
    config.update({"parallelism": "single", "progress": False, "plot": False, "log_every_steps": 10, **fields})
    config.checkpoint.every_steps = 0
    return config


def test_segmentation_beats_predicting_background_everywhere(tmp_path):
    arrays = {split: synthetic.shapes(n, image_size=16, max_objects=2, min_size=6, max_size=10, seed=seed)
              for split, n, seed in (("train", 256, 0), ("test", 64, 1))}

    def datasets(split, *, batch_size, **kwargs):
        return BatchIterator({k: arrays[split][k] for k in ("image", "mask")}, batch_size, **kwargs)

    config = _config(model="unet", num_classes=4, batch_size=16, eval_batch_size=64, num_train_steps=200,
                     eval_every_steps=50, model_options={"depth": 2, "width": 16, "batch_norm": True})
    config.optimizer.update({"name": "adam", "learning_rate": 5e-3})
    result = cnn.train.fit(config, tmp_path, task=segmentation_task(num_classes=4), datasets=datasets)
    masks = arrays["test"]["mask"]
    # All-background prediction: IoU of class 0 is the background fraction, 0 for the others.
    baseline = np.mean(masks == 0) / 4
    # Margin: one object class half-segmented adds 1/8 to the mean of 4 IoUs.
    assert result.final_eval["mean_iou"] > baseline + 0.125, (result.final_eval["mean_iou"], baseline)


def test_detection_beats_the_untrained_network(tmp_path):
    spec = YoloSpec(grid_size=4, boxes_per_cell=1, num_classes=3)

    def shapes(n, seed):
        s = synthetic.shapes(n, image_size=32, min_objects=1, max_objects=1, min_size=10, max_size=16, seed=seed)
        return {"image": s["image"], "boxes": s["boxes"], "classes": np.maximum(s["box_classes"] - 1, 0),
                "valid": s["box_valid"]}

    arrays = {"train": shapes(512, 0), "test": shapes(64, 1)}

    def datasets(split, *, batch_size, **kwargs):
        return BatchIterator(arrays[split], batch_size, **kwargs)

    task = detection_task(spec, image_size=(32, 32))
    fields = dict(model="yolo_v1_tiny", num_classes=3, batch_size=32, eval_batch_size=64,
                  model_options={"hidden_units": 64, "dropout_rate": 0.0})
    untrained = cnn.train.fit(_config(**fields, num_train_steps=1, optimizer={"learning_rate": 0.0}),
                              tmp_path / "untrained", task=task, datasets=datasets)
    config = _config(**fields, num_train_steps=250, eval_every_steps=50)
    config.optimizer.update({"name": "adam", "learning_rate": 2e-3, "grad_clip_norm": 10.0})
    trained = cnn.train.fit(config, tmp_path / "trained", task=task, datasets=datasets)
    # 64 test images with one object each: one more correct detection per class moves an AP by
    # about 1/21; demand two such steps over the untrained network.
    assert trained.final_eval["map"] > untrained.final_eval["map"] + 2 / 21, (trained.final_eval, untrained.final_eval)


def test_feature_extraction_beats_chance(tmp_path):
    """A digits-trained trunk, frozen, with a new head trained on a 200-image subset."""
    pretrain = _config(dataset="digits", model="simple_cnn", model_options={"widths": (8, 16)}, batch_size=64,
                       num_train_steps=60, eval_every_steps=60)
    source = cnn.train.fit(pretrain, tmp_path / "source")
    head = transfer.head_pattern(transfer.head_paths("simple_cnn", input_shape=(8, 8, 1), widths=(8, 16)))
    target = _config(dataset="digits", model="simple_cnn", model_options={"widths": (8, 16)}, batch_size=32,
                     num_train_steps=40, eval_every_steps=40, seed=3)
    config = transfer.transfer_config(target, "extraction", head=head)
    model = cnn.models.create(config.model, num_classes=10, **config.model_options.to_dict())
    start = transfer.swap_head(source.state.variables(), model, rng=7, input_shape=(8, 8, 1), head=head)
    datasets = transfer.few_label_datasets("digits", 20, seed=0)
    result = cnn.train.fit(config, tmp_path / "extraction", datasets=datasets, init_variables=start)
    count = result.final_eval["count"]
    chance = 0.1
    margin = 3 * np.sqrt(chance * (1 - chance) / count)
    assert result.final_eval["accuracy"] > chance + margin, result.final_eval
