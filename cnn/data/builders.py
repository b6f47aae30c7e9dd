"""Offline TFDS builders for MNIST, Fashion-MNIST, CIFAR-10 and CIFAR-100, from the original files.

TFDS's own builders download their files and store images with `tfds.features.Image`, whose PNG
encoding needs TensorFlow. These builders read the original distribution files from a local
directory (see `cnn.data.files`) and store each example as one array_record record with
`tfds.features.Tensor` images, so they prepare and read with TFDS alone: no TensorFlow, no
network. Records keep the original file order (`disable_shuffling=True`): record `i` of a split is
example `i` of the distribution files (CIFAR train: `data_batch_1` ... `data_batch_5` in turn).

The prepared data lives under `prepared_dir` (argument, else env `CNN_PREPARED_DIR`, else
`~/.cache/cnn/prepared`) as a normal TFDS data directory (`<prepared_dir>/cnn_mnist/1.0.0/`),
so `tfds.builder("cnn_mnist", data_dir=prepared_dir)` reads it too once `cnn.data` is imported.

Preparing full MNIST takes about 5 s on one CPU core (60,000 + 10,000 records, 24 MB).
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import shutil
import uuid

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core import utils as tfds_utils

from cnn.data import files, stats

DEFAULT_PREPARED_DIR = pathlib.Path("~/.cache/cnn/prepared")
_SOURCE_RECORD = "cnn_source.json"  # fingerprint of the raw files a prepared dataset was built from

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


def resolve_prepared_dir(prepared_dir: str | os.PathLike | None) -> pathlib.Path:
    """Where prepared array_record data goes: argument, else env `CNN_PREPARED_DIR`, else `~/.cache/cnn/prepared`."""
    if prepared_dir is None:
        prepared_dir = os.environ.get("CNN_PREPARED_DIR") or DEFAULT_PREPARED_DIR
    return pathlib.Path(prepared_dir).expanduser()


class _OfflineBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared logic: `_split_generators` reads `self.raw_files` (or locates them in `manual_dir`)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Built offline from the original distribution files."}
    RAW_NAME: str = ""  # key into cnn.data.files (LAYOUTS, KNOWN_CHECKSUMS)
    IMAGE_SHAPE: tuple[int, int, int] = (0, 0, 0)
    NUM_CLASSES: int = 0
    CLASS_NAMES: tuple[str, ...] | None = None
    DESCRIPTION = ""
    HOMEPAGE = ""
    CITATION = ""

    # Set by `prepare` before `download_and_prepare`; TFDS CLI users get the manual_dir lookup.
    raw_files: files.RawFiles | None = None
    verify_checksums: bool = True
    train_statistics: tuple[tuple[float, ...], tuple[float, ...]] | None = None

    @tfds_utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS's default lookup touches `importlib_resources` (a backport not installed on
        # Python >= 3.9) for builders defined in a package; the answer is simply this file.
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        label = (
            tfds.features.ClassLabel(names=list(self.CLASS_NAMES))
            if self.CLASS_NAMES
            else tfds.features.ClassLabel(num_classes=self.NUM_CLASSES)
        )
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.DESCRIPTION,
            features=tfds.features.FeaturesDict(
                {"image": tfds.features.Tensor(shape=self.IMAGE_SHAPE, dtype=np.uint8), "label": label}
            ),
            supervised_keys=("image", "label"),
            homepage=self.HOMEPAGE,
            citation=self.CITATION,
            disable_shuffling=True,  # record i == example i of the original files
        )

    def _raw(self, dl_manager) -> files.RawFiles:
        raw = self.raw_files or files.locate(self.RAW_NAME, dl_manager.manual_dir)
        if self.verify_checksums:
            files.verify_raw_checksums(raw)
        return raw

    def _read_split(self, raw: files.RawFiles, split: str) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def _set_class_names(self, raw: files.RawFiles) -> None:
        """Hook: fills in class names that are only known from the raw files (CIFAR-100)."""

    def _split_generators(self, dl_manager):
        raw = self._raw(dl_manager)
        self._set_class_names(raw)
        splits = {}
        for split in ("train", "test"):
            images, labels = self._read_split(raw, split)
            if images.shape[1:] != self.IMAGE_SHAPE:
                raise ValueError(
                    f"{self.RAW_NAME} {split}: images have shape {images.shape[1:]}, expected {self.IMAGE_SHAPE}"
                )
            if len(images) != len(labels):
                raise ValueError(f"{self.RAW_NAME} {split}: {len(images)} images but {len(labels)} labels")
            if labels.size and (labels.min() < 0 or labels.max() >= self.NUM_CLASSES):
                raise ValueError(
                    f"{self.RAW_NAME} {split}: labels must lie in [0, {self.NUM_CLASSES}), "
                    f"found [{labels.min()}, {labels.max()}]"
                )
            if split == "train":  # the normalization statistics, while the pixels are at hand
                self.train_statistics = stats.pixel_statistics({"image": images})
            splits[split] = self._generate_examples(images, labels)
        return splits

    def _generate_examples(self, images: np.ndarray, labels: np.ndarray):
        # One record per example keeps true random access (a batch read touches B small records).
        for index in range(len(images)):
            yield index, {"image": images[index], "label": int(labels[index])}


class CnnMnist(_OfflineBuilder):
    """MNIST (LeCun, Cortes, Burges), from the four original IDX `.gz` files."""

    RAW_NAME = "mnist"
    IMAGE_SHAPE = (28, 28, 1)
    NUM_CLASSES = 10
    CLASS_NAMES = tuple(str(d) for d in range(10))
    DESCRIPTION = "MNIST handwritten digits, 28x28 grayscale, 60,000 train / 10,000 test, built offline."
    HOMEPAGE = "http://yann.lecun.com/exdb/mnist/"
    CITATION = "LeCun, Cortes, Burges. The MNIST database of handwritten digits. CC BY-SA 3.0."

    def _read_split(self, raw, split):
        return files.read_split(raw, "train" if split == "train" else "test")


class CnnFashionMnist(CnnMnist):
    """Fashion-MNIST (Xiao, Rasul, Vollgraf 2017), from the four original IDX `.gz` files."""

    RAW_NAME = "fashion_mnist"
    CLASS_NAMES = FASHION_MNIST_CLASSES
    DESCRIPTION = "Fashion-MNIST (Zalando), 28x28 grayscale, 60,000 train / 10,000 test, built offline."
    HOMEPAGE = "https://github.com/zalandoresearch/fashion-mnist"
    CITATION = "Xiao, Rasul, Vollgraf. Fashion-MNIST. arXiv:1708.07747, 2017. MIT License."


class CnnCifar10(_OfflineBuilder):
    """CIFAR-10 (Krizhevsky 2009), from the python-pickle or binary batches (or their .tar.gz)."""

    RAW_NAME = "cifar10"
    IMAGE_SHAPE = (32, 32, 3)
    NUM_CLASSES = 10
    CLASS_NAMES = CIFAR10_CLASSES
    DESCRIPTION = "CIFAR-10, 32x32 colour, 50,000 train / 10,000 test, built offline."
    HOMEPAGE = "https://www.cs.toronto.edu/~kriz/cifar.html"
    CITATION = "Krizhevsky. Learning Multiple Layers of Features from Tiny Images. 2009."

    def _read_split(self, raw, split):
        return files.read_split(raw, split)

    def _set_class_names(self, raw):
        names = files.read_cifar_label_names(raw)
        if self.CLASS_NAMES is not None and names is not None and tuple(names) != self.CLASS_NAMES:
            raise ValueError(f"{raw.directory}: label names {names} differ from {list(self.CLASS_NAMES)}")
        if self.CLASS_NAMES is None:
            if names is None or len(names) != self.NUM_CLASSES:
                raise FileNotFoundError(
                    f"{raw.dataset}: the class-name file (meta / fine_label_names.txt) beside {raw.directory} "
                    f"is missing or does not list {self.NUM_CLASSES} names"
                )
            self.info.features["label"].names = names


class CnnCifar100(CnnCifar10):
    """CIFAR-100 fine labels, from the python-pickle or binary files (or their .tar.gz)."""

    RAW_NAME = "cifar100"
    NUM_CLASSES = 100
    CLASS_NAMES = None  # read from the `meta` file, as TFDS does
    DESCRIPTION = "CIFAR-100 (fine labels), 32x32 colour, 50,000 train / 10,000 test, built offline."


BUILDERS: dict[str, type[_OfflineBuilder]] = {
    "mnist": CnnMnist,
    "fashion_mnist": CnnFashionMnist,
    "cifar10": CnnCifar10,
    "cifar100": CnnCifar100,
}


def statistics_key(builder: tfds.core.DatasetBuilder) -> dict[str, object]:
    """What a cached statistics file must match: dataset, version and train size."""
    return {
        "dataset": builder.name,
        "version": str(builder.version),
        "train_examples": int(builder.info.splits["train"].num_examples),
    }


def is_prepared(builder: tfds.core.DatasetBuilder) -> bool:
    """Whether `builder`'s data exists (without TFDS's warning about absent folders)."""
    return pathlib.Path(builder.data_path, "dataset_info.json").is_file() and builder.is_prepared()


def prepare(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    prepared_dir: str | os.PathLike | None = None,
    verify_checksums: bool = True,
) -> tfds.core.DatasetBuilder:
    """Returns the offline builder of `name`, preparing it from the raw files first if needed.

    A prepared dataset is reused while the raw files it was built from are unchanged (same
    paths, sizes and modification times) or absent; if different raw files are found it is
    rebuilt from them. The raw files are verified (checksums) before anything prepared is
    touched, and a rebuild writes next to the previous copy, which is put back if the rebuild
    fails: a corrupted raw file never costs the good prepared dataset.

    Raises:
      ValueError: unknown `name`, or a corrupted file (checksum, truncation); the message says
        whether a previously prepared copy was kept.
      FileNotFoundError: nothing prepared and raw files missing (names file and places searched).
    """
    if name not in BUILDERS:
        raise ValueError(f"name={name!r} has no offline builder; valid: {sorted(BUILDERS)}")
    root = resolve_prepared_dir(prepared_dir)
    builder = BUILDERS[name](data_dir=str(root), file_format="array_record")
    record_path = pathlib.Path(builder.data_path) / _SOURCE_RECORD
    previous = is_prepared(builder)
    if previous:
        try:
            raw = files.locate(name, data_dir)
        except FileNotFoundError:
            return builder  # raw files gone: the prepared copy is all there is
        recorded = json.loads(record_path.read_text()) if record_path.is_file() else None
        if recorded == raw.fingerprint():
            return builder
        logging.info("%s: raw files changed since %s was prepared; rebuilding", name, builder.data_path)
    else:
        raw = files.locate(name, data_dir)
    kept = (
        f" The previously prepared copy at {builder.data_path} was left as it was; it is used again once the raw "
        "files are restored (or removed)."
        if previous
        else ""
    )
    if verify_checksums:
        try:
            files.verify_raw_checksums(raw)
        except ValueError as error:
            raise ValueError(f"{error}{kept}") from None
    return _build(name, raw, root, kept=kept)


def _build(name: str, raw: files.RawFiles, root: pathlib.Path, *, kept: str) -> tfds.core.DatasetBuilder:
    """Prepares `name` from verified raw files into `root`; a previous copy is moved aside first
    and put back if preparing fails."""
    data_path = pathlib.Path(BUILDERS[name](data_dir=str(root), file_format="array_record").data_path)
    backup = None
    if data_path.exists():
        backup = root / ".previous" / f"{data_path.parent.name}-{data_path.name}-{uuid.uuid4().hex[:8]}"
        backup.parent.mkdir(parents=True, exist_ok=True)
        data_path.rename(backup)  # same file system: atomic, nothing copied
    try:
        builder = BUILDERS[name](data_dir=str(root), file_format="array_record")
        builder.raw_files = raw
        builder.verify_checksums = False  # verified by prepare() before anything was touched
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(
                manual_dir=str(raw.directory), download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
            )
        )
        pathlib.Path(builder.data_path, _SOURCE_RECORD).write_text(json.dumps(raw.fingerprint(), indent=1))
        if builder.train_statistics is not None:
            path = pathlib.Path(builder.data_path) / stats.STATS_FILE
            stats.write_statistics(path, statistics_key(builder), *builder.train_statistics)
    except BaseException as error:
        if backup is not None:
            if data_path.exists():
                shutil.rmtree(data_path)
            backup.rename(data_path)
        if kept and isinstance(error, ValueError):  # e.g. a truncated file found while decoding
            raise ValueError(f"{error}{kept}") from error
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)
    return builder
