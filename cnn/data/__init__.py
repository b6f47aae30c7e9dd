"""Data: offline TFDS builders, the embedded default dataset, synthetic data, augmentation.

    from cnn import data
    train = data.load("digits", "train", batch_size=128, seed=0)   # BatchIterator of numpy batches
    meta = data.info("digits")                                    # classes, shapes, sizes, mean/std
    batch = next(train); x = meta.normalize(batch["image"])

Modules: `datasets` (load/info/normalize), `builders` (offline TFDS builders), `files` (raw-file
lookup, checksums, IDX/CIFAR readers), `embedded` (digits, fashion_mnist_small), `synthetic`
(shapes with masks/boxes, ODE and heat-equation trajectories), `augment` (JAX augmentation),
`iterator` (BatchIterator).
"""

from cnn.data import augment, synthetic
from cnn.data.datasets import DatasetInfo, available, get_source, info, load, normalize, parse_split
from cnn.data.iterator import Batch, BatchIterator

__all__ = [
    "Batch",
    "BatchIterator",
    "DatasetInfo",
    "augment",
    "available",
    "get_source",
    "info",
    "load",
    "normalize",
    "parse_split",
    "synthetic",
]
