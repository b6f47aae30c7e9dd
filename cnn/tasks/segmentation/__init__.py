"""Semantic segmentation: per-pixel loss with an ignore label, VOC data, the segmentation Task.

    from cnn.tasks import segmentation
    loss = segmentation.pixel_cross_entropy(logits, masks)                # ignore label 255
    source = segmentation.voc.VOCSegmentation("~/data/VOCdevkit", "train", size=(320, 320))
    task = segmentation.segmentation_task(num_classes=21)
    result = cnn.train.fit(config, "runs/fcn8s", task=task)             # mIoU, confusion matrix

Models (registered in `cnn.models`): "fcn32s", "fcn16s", "fcn8s", "segnet", "unet",
"dilated_frontend", "dilated_context". Metrics: `cnn.metrics.segmentation`.
"""

from cnn.tasks.segmentation import voc
from cnn.tasks.segmentation.loss import (
    IGNORE_LABEL,
    median_frequency_weights,
    per_pixel_cross_entropy,
    pixel_cross_entropy,
)
from cnn.tasks.segmentation.task import (
    AUGMENTATION,
    make_predict_fn,
    normalize_images,
    segmentation_augmentation,
    segmentation_task,
    summarize_segmentation,
)

__all__ = [
    "AUGMENTATION",
    "IGNORE_LABEL",
    "make_predict_fn",
    "median_frequency_weights",
    "normalize_images",
    "per_pixel_cross_entropy",
    "pixel_cross_entropy",
    "segmentation_augmentation",
    "segmentation_task",
    "summarize_segmentation",
    "voc",
]
