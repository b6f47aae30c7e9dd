"""YOLO v1 (the small CPU variant) on synthetic shapes detection data.

    python -m experiments.detection --workdir runs/detection
    python -m experiments.detection --workdir runs/detection --config.num_train_steps=3000  # shorter, mAP about 0.78

`experiments/detection.py` turns this into a `cnn.train.fit` config (seed, model, batch size,
steps, optimizer, augmentation, logging) and the detection task (grid, loss weights, decoding,
VOC evaluation); `data`, `class_names` and `num_figure_images` are its own.
"""

import ml_collections

SHAPE_NAMES = ("circle", "square", "triangle")


def get_config() -> ml_collections.ConfigDict:
    """The recorded run (its mAP@0.5 is in experiments/detection.py's docstring)."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.model = "yolo_v1_tiny"
    # The paper's dropout 0.5 after fc1 slows a short run badly (test mAP@0.5 0.20 instead of
    # 0.65 after 2000 of 3000 steps); with fresh data and augmentation it is not needed here.
    config.model_options = ml_collections.ConfigDict({"dropout_rate": 0.0, "hidden_units": 256})
    config.num_classes = len(SHAPE_NAMES)
    config.class_names = SHAPE_NAMES
    config.grid_size = 7
    config.boxes_per_cell = 2
    config.image_size = 64

    # cnn.data.synthetic.shapes: non-overlapping circles / squares / triangles with exact boxes.
    # With sides >= 8 px two objects can never share a 64/7 = 9.1 px cell, so every object gets
    # a target (YOLO v1 holds one object per cell). The fully connected head memorizes small
    # training sets (4096 images: train loss 0.45, test mAP 0.55), hence 16384 images.
    config.data = ml_collections.ConfigDict({
        "num_train": 16384, "num_test": 512, "train_seed": 0, "test_seed": 1,
        "min_objects": 1, "max_objects": 4, "min_size": 10, "max_size": 24, "noise": 8.0,
    })

    config.batch_size = 32
    # test mAP@0.5 after 3000 / 5000 steps (cosine schedule over the run): 0.78 / 0.93
    config.num_train_steps = 5000
    config.optimizer = ml_collections.ConfigDict({"name": "adam", "learning_rate": 1e-3, "schedule": "cosine",
                                                  "warmup_steps": 100, "grad_clip_norm": 10.0, "weight_decay": 0.0})
    config.loss = ml_collections.ConfigDict({"lambda_coord": 5.0, "lambda_noobj": 0.5, "rescore": True})
    # The paper's augmentation (random scaling and translation, there up to 20% of the image
    # size) at 10%, plus mirroring.
    config.augment = ml_collections.ConfigDict({"scale": 0.1, "shift": 0.1, "flip": True})
    config.detect = ml_collections.ConfigDict(
        {"score_threshold": 0.01, "iou_threshold": 0.5, "max_per_class": 10, "max_detections": 20}
    )
    config.eval = ml_collections.ConfigDict({"iou_threshold": 0.5, "method": "voc2010"})
    config.eval_batch_size = 128
    config.parallelism = "auto"
    config.log_every_steps = 50
    config.eval_every_steps = 1000
    config.progress = True
    config.num_figure_images = 8
    return config


def get_tiny_config() -> ml_collections.ConfigDict:
    """A seconds-long run for tests and fast notebooks (it runs end to end, it does not learn much)."""
    config = get_config()
    config.image_size = 32
    config.data.update({"num_train": 64, "num_test": 32, "max_objects": 2, "min_size": 6, "max_size": 12})
    config.batch_size = 16
    config.num_train_steps = 40
    config.optimizer.warmup_steps = 5
    config.eval_batch_size = 32
    config.parallelism = "single"
    config.log_every_steps = 10
    config.eval_every_steps = 0
    config.progress = False
    config.num_figure_images = 2
    return config
