"""YOLO v1 detection as a `cnn.train.Task`: the YOLO loss on encoded targets, VOC mAP at evaluation.

    task = detection_task(YoloSpec(grid_size=4, boxes_per_cell=2, num_classes=3), image_size=(64, 64))
    result = cnn.train.fit(config, "runs/yolo", task=task)    # config.dataset = "shapes"
    result.final_eval["map"]

A detection batch (numpy or jax arrays):

    {"image":   [batch, height, width, channels]  uint8 (0..255) or float (0..1),
     "boxes":   [batch, max_objects, 4]           xyxy in pixels,
     "classes": [batch, max_objects]              int in [0, C),
     "valid":   [batch, max_objects]              bool, False for padding rows}

Targets are encoded inside the step (`encode_batch`) from the boxes, after augmentation
(`config.augment = AUGMENTATION`) has moved images and boxes together; images enter the network
in [-1, 1]. Evaluation runs the network, decodes and suppresses on device (`detect`), gathers
every image's detections and ground truth on the host, and computes VOC AP per class and mAP.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cnn.metrics.detection import evaluate_detections
from cnn.tasks.detection.decode import detect
from cnn.tasks.detection.encode import YoloSpec, encode_batch
from cnn.tasks.detection.loss import yolo_loss
from cnn.train.task import Task, options_tuple

AUGMENTATION = "cnn.tasks.detection.augmentation:make_augmentation"
DETECTION_KEYS = ("boxes", "scores", "classes", "valid")
TRUTH_KEYS = ("true_boxes", "true_classes", "true_valid")


def to_network_range(images: jax.Array) -> jax.Array:
    """Images in [0, 1] (or uint8) -> float32 in [-1, 1], the network's input."""
    images = jnp.asarray(images)
    if jnp.issubdtype(images.dtype, jnp.integer):
        return images.astype(jnp.float32) / 127.5 - 1.0
    return images.astype(jnp.float32) * 2.0 - 1.0


def detection_task(
    spec: YoloSpec,
    *,
    image_size: tuple[int, int],
    lambda_coord: float = 5.0,
    lambda_noobj: float = 0.5,
    rescore: bool = True,
    score_threshold: float = 0.01,
    nms_iou_threshold: float = 0.5,
    max_per_class: int = 10,
    max_detections: int = 20,
    eval_iou_threshold: float = 0.5,
    ap_method: str = "voc2010",
) -> Task:
    """The YOLO v1 `Task` (Redmon et al. 2016) for a model built with the spec's grid.

    Args:
      spec: grid size S, boxes per cell B, classes C (the model gets S and B as options).
      image_size: `(height, width)` in pixels of the batches.
      lambda_coord, lambda_noobj, rescore: the loss weights and confidence target (`yolo_loss`).
      score_threshold, nms_iou_threshold, max_per_class, max_detections: decoding (`detect`).
      eval_iou_threshold, ap_method: the VOC evaluation (0.5 and all-point: mAP@0.5 as VOC 2010+).

    Training metrics: `loss` and its five terms. Summary: `map`, `ap/<class>`, `images`; the best
    checkpoint has the highest `map`.
    """
    image_size = (int(image_size[0]), int(image_size[1]))
    decode_options = dict(score_threshold=float(score_threshold), iou_threshold=float(nms_iou_threshold),
                          max_per_class=int(max_per_class), max_detections=int(max_detections))

    def loss(outputs: jax.Array, batch: Mapping[str, jax.Array]):
        targets = encode_batch(batch["boxes"], batch["classes"], batch["valid"], spec=spec, image_size=image_size)
        value, terms = yolo_loss(outputs, targets, spec=spec, lambda_coord=float(lambda_coord),
                                 lambda_noobj=float(lambda_noobj), rescore=bool(rescore))
        return value, terms

    def eval_outputs(outputs: jax.Array, batch: Mapping[str, jax.Array], weight: jax.Array):
        found = detect(outputs, spec=spec, image_size=image_size, **decode_options)
        return {"boxes": found.boxes, "scores": found.scores, "classes": found.classes, "valid": found.valid,
                "true_boxes": batch["boxes"], "true_classes": batch["classes"], "true_valid": batch["valid"]}

    def summarize(totals: Mapping[str, Any]) -> dict[str, Any]:
        images = len(totals["valid"])
        if images == 0:
            raise ValueError("the evaluation held no image")
        detections = [{key: np.asarray(totals[key][i]) for key in DETECTION_KEYS} for i in range(images)]
        truths = [{"boxes": np.asarray(totals["true_boxes"][i]), "classes": np.asarray(totals["true_classes"][i]),
                   "valid": np.asarray(totals["true_valid"][i], bool)} for i in range(images)]
        evaluation = evaluate_detections(detections, truths, num_classes=spec.num_classes,
                                         iou_threshold=float(eval_iou_threshold), method=str(ap_method))
        summary: dict[str, Any] = {"map": float(evaluation.mean_ap), "images": float(images)}
        for index, value in enumerate(evaluation.average_precision):
            if not np.isnan(value):
                summary[f"ap/{index}"] = float(value)
        return summary

    return Task(
        name="detection",
        options=options_tuple(grid_size=spec.grid_size, boxes_per_cell=spec.boxes_per_cell,
                              num_classes=spec.num_classes, image_size=image_size, lambda_coord=float(lambda_coord),
                              lambda_noobj=float(lambda_noobj), rescore=bool(rescore), **decode_options,
                              eval_iou_threshold=float(eval_iou_threshold), ap_method=str(ap_method)),
        batch_keys=("image", "boxes", "classes", "valid"),
        loss=loss,
        eval_sums=eval_outputs,
        summarize=summarize,
        gather_keys=DETECTION_KEYS + TRUTH_KEYS,
        best_metric="map",
        best_mode="max",
        augment_keys=(("image", "image"), ("boxes", "boxes"), ("valid", "box_valid")),
        inputs=lambda batch: to_network_range(batch["image"]),
        model_options=(("boxes_per_cell", spec.boxes_per_cell), ("grid_size", spec.grid_size)),
        progress_metric="",
    )




def make_detect_fn(
    spec: YoloSpec,
    *,
    image_size: tuple[int, int],
    score_threshold: float = 0.01,
    nms_iou_threshold: float = 0.5,
    max_per_class: int = 10,
    max_detections: int = 20,
):
    """A jitted `detect_fn(state, images) -> Detections` (inference mode, per-class NMS), with
    the images in [0, 1] float or uint8 as in a batch."""
    from cnn.train.task import prepare_images

    @jax.jit
    def detect_fn(state, images: jax.Array):
        predictions = state.apply_fn(state.variables(), to_network_range(prepare_images(images)), train=False)
        return detect(predictions, spec=spec, image_size=image_size, score_threshold=score_threshold,
                      iou_threshold=nms_iou_threshold, max_per_class=max_per_class, max_detections=max_detections)

    return detect_fn


__all__ = ["AUGMENTATION", "DETECTION_KEYS", "TRUTH_KEYS", "detection_task", "make_detect_fn", "to_network_range"]
