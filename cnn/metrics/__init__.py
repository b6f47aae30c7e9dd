"""cnn.metrics."""
from cnn.metrics import detection  # noqa: E402,F401  (VOC AP and mAP)
from cnn.metrics import segmentation  # noqa: E402,F401  (confusion matrix, mIoU)
