"""Data: offline TFDS builders, the embedded default dataset, synthetic generators, augmentation."""

from cnn.data.iterator import Batch, BatchIterator

__all__ = ["Batch", "BatchIterator"]
