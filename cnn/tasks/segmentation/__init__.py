"""Semantic segmentation: per-pixel loss with an ignore label, VOC data, training and evaluation.

    from cnn.tasks import segmentation
    loss = segmentation.pixel_cross_entropy(logits, masks)                # ignore label 255
    source = segmentation.voc.VOCSegmentation("~/data/VOCdevkit", "train", size=(320, 320))
    step = cnn.train.compile_single(segmentation.make_train_step(num_classes=21))
    result = segmentation.evaluate(state, batches, num_classes=21)       # mIoU, confusion matrix

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
from cnn.tasks.segmentation.train import (
    EvaluationResult,
    FitResult,
    default_config,
    evaluate,
    fit,
    init_state,
    make_augmentation,
    make_eval_step,
    make_predict_fn,
    make_train_step,
    overlay_params,
    preprocess_images,
)

__all__ = [
    "IGNORE_LABEL",
    "EvaluationResult",
    "FitResult",
    "default_config",
    "evaluate",
    "fit",
    "init_state",
    "make_augmentation",
    "make_eval_step",
    "make_predict_fn",
    "make_train_step",
    "median_frequency_weights",
    "overlay_params",
    "per_pixel_cross_entropy",
    "pixel_cross_entropy",
    "preprocess_images",
    "voc",
]
