"""Object detection: boxes and IoU, PASCAL VOC annotations, YOLO v1 targets, loss, decoding, NMS.

    from cnn.tasks import detection
    spec = detection.YoloSpec(grid_size=7, boxes_per_cell=2, num_classes=20)
    targets = detection.encode_batch(boxes, classes, valid, spec=spec, image_size=(448, 448))
    loss, terms = detection.yolo_loss(model.apply(variables, images, train=False), targets, spec=spec)
    dets = detection.detect(predictions, spec=spec, image_size=(448, 448))

The network itself is `cnn.models.create("yolo_v1")` / `"yolo_v1_tiny"` (`cnn/models/yolo.py`);
the VOC mAP is `cnn.metrics.detection`. Training is `cnn.train.fit(config, workdir,
task=cnn.tasks.detection.task.detection_task(spec, image_size=...))` (the task module is imported
on demand, since it pulls in the training engine).
"""

from cnn.tasks.detection import boxes, nms, voc  # modules (the NMS function is nms.nms)
from cnn.tasks.detection.boxes import BOX_FORMATS, area, convert, iou, pairwise_iou
from cnn.tasks.detection.decode import decode_predictions, detect
from cnn.tasks.detection.encode import (
    YoloSpec,
    encode_batch,
    encode_targets,
    split_predictions,
    targets_to_predictions,
)
from cnn.tasks.detection.loss import LOSS_TERMS, responsible_predictor, yolo_loss
from cnn.tasks.detection.nms import Detections, multiclass_nms
from cnn.tasks.detection.voc import Annotation, AnnotatedObject, parse_annotation, parse_pascal_v1, parse_voc_xml

__all__ = [
    "BOX_FORMATS",
    "AnnotatedObject",
    "Annotation",
    "Detections",
    "LOSS_TERMS",
    "YoloSpec",
    "area",
    "boxes",
    "convert",
    "decode_predictions",
    "detect",
    "encode_batch",
    "encode_targets",
    "iou",
    "multiclass_nms",
    "nms",
    "pairwise_iou",
    "parse_annotation",
    "parse_pascal_v1",
    "parse_voc_xml",
    "responsible_predictor",
    "split_predictions",
    "targets_to_predictions",
    "voc",
    "yolo_loss",
]
