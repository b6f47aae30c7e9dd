"""`load`, `info` and `normalize`: one entry point for every dataset of the project.

Names (`available()` lists them):

* embedded, need nothing but the package: "digits" (sklearn 8x8 digits, the default),
  "fashion_mnist_small" (committed Fashion-MNIST subset); synthetic: "shapes".
* TFDS datasets: "mnist", "fashion_mnist", "cifar10", "cifar100". For these, in order:
  1. a dataset already prepared by TFDS in a random-access format under the TFDS data dir
     (`tfds_data_dir`, else env `TFDS_DATA_DIR`, else `~/tensorflow_datasets`) is read with
     `tfds.data_source(name, data_dir=...)`: the standard way (prepare it once, with TensorFlow
     or network, via `tfds build mnist --file_format=array_record`). Records prepared in the
     default tfrecord format need TensorFlow to read, so they are skipped;
  2. otherwise the offline builder (`cnn.data.builders`) prepares the dataset from the original
     distribution files found under `data_dir` (else env `CNN_DATA_DIR`, else
     `~/.cache/cnn/data`) into `prepared_dir` (else env `CNN_PREPARED_DIR`, else
     `~/.cache/cnn/prepared`), once, and reads it from there.

Splits are "train" and "test", optionally sliced like TFDS: "train[:5000]", "train[90%:]",
"test[-1000:]" (percent boundaries round to the nearest example).

Every source yields `{"image": uint8 [H, W, C], "label": int32}` examples ("shapes" adds masks
and boxes); `load` wraps it in a `BatchIterator`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import pathlib
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from cnn.data import embedded, files
from cnn.data.iterator import Batch, BatchIterator
from cnn.data.stats import STATS_FILE, cached_statistics, pixel_statistics

SPLITS = ("train", "test")
TFDS_DATASETS = ("mnist", "fashion_mnist", "cifar10", "cifar100")
EMBEDDED_DATASETS = ("digits", "fashion_mnist_small")
SYNTHETIC_DATASETS = ("shapes",)
SHAPES_SPLIT_SIZES = {"train": 2048, "test": 512}
SHAPES_SPLIT_SEEDS = {"train": 0, "test": 1}


def available() -> list[str]:
    """Every dataset name `load` accepts."""
    return sorted(EMBEDDED_DATASETS + SYNTHETIC_DATASETS + TFDS_DATASETS)


def _check_name(name: str) -> None:
    if name not in available():
        raise ValueError(f"name={name!r} is not a known dataset; valid: {available()}")


_SPLIT_PATTERN = re.compile(r"^(?P<base>\w+)(?:\[(?P<start>-?\d+%?)?:(?P<stop>-?\d+%?)?\])?$")


def parse_split(split: str) -> tuple[str, str | None, str | None]:
    """Splits "train[10%:90%]" into ("train", "10%", "90%"); a plain name gives (name, None, None).

    Raises:
      ValueError: malformed `split`, or its base name is not "train"/"test".
    """
    match = _SPLIT_PATTERN.match(split.replace(" ", ""))
    if match is None or match["base"] not in SPLITS:
        raise ValueError(
            f"split={split!r} is not valid; use one of {list(SPLITS)}, "
            "optionally sliced like 'train[:5000]' or 'train[90%:]'"
        )
    return match["base"], match["start"], match["stop"]


def _bound(spec: str | None, n: int, default: int) -> int:
    if spec is None:
        return default
    value = int(np.floor(n * int(spec[:-1]) / 100 + 0.5)) if spec.endswith("%") else int(spec)
    return min(max(value + n if value < 0 else value, 0), n)


def slice_bounds(split: str, num_examples: int) -> tuple[int, int]:
    """`[start, stop)` of the examples that `split` selects among `num_examples` (python slicing)."""
    _, start, stop = parse_split(split)
    return _bound(start, num_examples, 0), _bound(stop, num_examples, num_examples)


class _Slice:
    """A contiguous window `[start, stop)` of a random-access source."""

    def __init__(self, source, start: int, stop: int):
        self.source, self.start, self.stop = source, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, index: int):
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} examples")
        return self.source[self.start + int(index)]

    def __getitems__(self, indices: Sequence[int]):
        return self.source.__getitems__([self.start + int(i) for i in indices])


class TfdsSource:
    """A TFDS random-access data source viewed as `{"image": uint8 [H,W,C], "label": int32}` records."""

    def __init__(self, data_source, description: str):
        self.data_source = data_source
        self.description = description

    def __len__(self) -> int:
        return len(self.data_source)

    @staticmethod
    def _convert(record: Mapping[str, Any]) -> dict[str, np.ndarray]:
        image = np.asarray(record["image"], np.uint8)
        if image.ndim == 2:
            image = image[..., None]
        return {"image": image, "label": np.int32(record["label"])}

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return self._convert(self.data_source[int(index)])

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, np.ndarray]]:
        return [self._convert(r) for r in self.data_source.__getitems__([int(i) for i in indices])]


def _standard_tfds_builder(name: str, tfds_data_dir: str | os.PathLike | None):
    """`(builder, None)` for a dataset prepared by TFDS itself in a random-access format, else
    `(None, why not)`."""
    import tensorflow_datasets as tfds

    from cnn.data.builders import is_prepared

    try:
        builder = tfds.builder(name, data_dir=None if tfds_data_dir is None else str(tfds_data_dir))
        if not is_prepared(builder):
            return None, f"no TFDS-prepared copy at {builder.data_path}"
        formats = {f.value for f in builder.info.available_file_formats()} | {builder.info.file_format.value}
    except Exception as error:  # a damaged or foreign data dir must not block the offline path
        return None, f"the TFDS data dir is not usable ({error})"
    if not formats & {"array_record", "parquet"}:
        return None, f"the TFDS-prepared copy at {builder.data_path} is {sorted(formats)}, which needs TensorFlow"
    return builder, None


def _tfds_data_source(name: str, split: str, *, data_dir, prepared_dir, tfds_data_dir, try_tfds, verify_checksums):
    import tensorflow_datasets as tfds

    from cnn.data import builders

    base, _, _ = parse_split(split)
    standard, why_not = _standard_tfds_builder(name, tfds_data_dir) if try_tfds else (None, "try_tfds=False")
    if standard is not None:
        source = tfds.data_source(name, split=base, data_dir=str(standard.data_dir_root), download=False)
        return TfdsSource(source, f"TFDS data_source {standard.data_path}"), standard
    logging.info("%s: %s; using the offline builder", name, why_not)
    try:
        builder = builders.prepare(
            name, data_dir=data_dir, prepared_dir=prepared_dir, verify_checksums=verify_checksums
        )
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{error}\nStandard TFDS data dir not used: {why_not}.") from None
    return TfdsSource(builder.as_data_source(base), f"offline TFDS builder {builder.data_path}"), builder


@functools.lru_cache(maxsize=4)
def _raw_split_arrays(name: str, split: str, data_dir: str, verify_checksums: bool) -> dict[str, np.ndarray]:
    raw = files.locate(name, data_dir)
    if verify_checksums:
        files.verify_raw_checksums(raw)
    images, labels = files.read_split(raw, split)
    images.setflags(write=False)
    return {"image": images, "label": labels.astype(np.int32)}


@functools.lru_cache(maxsize=4)
def _shapes_split(split: str) -> dict[str, np.ndarray]:
    from cnn.data import synthetic

    return synthetic.shapes(SHAPES_SPLIT_SIZES[split], seed=SHAPES_SPLIT_SEEDS[split])


def get_source(
    name: str = "digits",
    split: str = "train",
    *,
    data_dir: str | os.PathLike | None = None,
    prepared_dir: str | os.PathLike | None = None,
    tfds_data_dir: str | os.PathLike | None = None,
    try_tfds: bool = True,
    verify_checksums: bool = True,
    in_memory: bool = False,
) -> Mapping[str, np.ndarray] | TfdsSource | _Slice:
    """The examples of `name`/`split`: a dict of arrays (embedded, synthetic) or a random-access source.

    With `in_memory=True` a TFDS dataset is read straight from its raw distribution files into
    arrays (checksums verified), skipping TFDS: the whole split sits in RAM (MNIST 47 MB,
    CIFAR-10 150 MB), batches are gathered by fancy indexing, and an input pipeline keeps up
    with an accelerator. The examples and their order are the same as the TFDS path's.

    Raises:
      ValueError: unknown `name` or `split` (lists the valid ones); corrupted raw files.
      FileNotFoundError: raw files needed but missing (names the file and every place searched).
    """
    _check_name(name)
    base, _, _ = parse_split(split)
    if name == "digits":
        source: Any = embedded.digits(base)
    elif name == "fashion_mnist_small":
        source = embedded.fashion_mnist_small(base)
    elif name == "shapes":
        source = _shapes_split(base)
    elif in_memory:
        source = _raw_split_arrays(name, base, str(files.resolve_data_dir(data_dir)), verify_checksums)
    else:
        source, _ = _tfds_data_source(
            name,
            split,
            data_dir=data_dir,
            prepared_dir=prepared_dir,
            tfds_data_dir=tfds_data_dir,
            try_tfds=try_tfds,
            verify_checksums=verify_checksums,
        )
    n = len(next(iter(source.values()))) if isinstance(source, Mapping) else len(source)
    start, stop = slice_bounds(split, n)
    if (start, stop) == (0, n):
        return source
    if isinstance(source, Mapping):
        return {key: value[start:stop] for key, value in source.items()}
    return _Slice(source, start, stop)


def load(
    name: str = "digits",
    split: str = "train",
    batch_size: int = 128,
    *,
    shuffle: bool = True,
    seed: int = 0,
    drop_remainder: bool = True,
    data_dir: str | os.PathLike | None = None,
    num_epochs: int | None = None,
    shard_index: int = 0,
    num_shards: int = 1,
    prepared_dir: str | os.PathLike | None = None,
    tfds_data_dir: str | os.PathLike | None = None,
    try_tfds: bool = True,
    verify_checksums: bool = True,
    transform: Callable[[Batch], Batch] | None = None,
    in_memory: bool = False,
) -> BatchIterator:
    """A deterministic, resumable, shardable iterator of numpy batches of a dataset.

    Args:
      name: one of `available()`; "digits" is the embedded default.
      split: "train" or "test", optionally sliced ("train[:90%]").
      batch_size: GLOBAL batch size; shard `shard_index` of `num_shards` yields its slice.
      shuffle, seed: a fresh permutation per epoch from `(seed, epoch)`.
      drop_remainder: drop the last partial batch of an epoch.
      data_dir: where raw distribution files are looked for (TFDS datasets only).
      num_epochs: stop after this many epochs (None: forever).
      prepared_dir: where the offline builders write their array_record files.
      tfds_data_dir: a standard TFDS data dir to try first (None: TFDS's default).
      try_tfds: look for a standard TFDS-prepared copy before the offline builder.
      verify_checksums: check raw files against their published checksums when preparing.
      transform: optional `fn(batch) -> batch` on every numpy batch.
      in_memory: read a TFDS dataset's raw files straight into RAM, without TFDS (fast input for
        accelerators; see `get_source`).

    Returns:
      A `BatchIterator` of `{"image": uint8 [B, H, W, C], "label": int32 [B]}` (plus "mask",
      "instance_mask", "boxes", "box_classes", "box_valid" for "shapes").
    """
    source = get_source(
        name,
        split,
        data_dir=data_dir,
        prepared_dir=prepared_dir,
        tfds_data_dir=tfds_data_dir,
        try_tfds=try_tfds,
        verify_checksums=verify_checksums,
        in_memory=in_memory,
    )
    return BatchIterator(
        source,
        batch_size,
        shuffle=shuffle,
        seed=seed,
        drop_remainder=drop_remainder,
        num_epochs=num_epochs,
        shard_index=shard_index,
        num_shards=num_shards,
        transform=transform,
    )


# --------------------------------------------------------------------------------------------
# Dataset information and normalization.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a model and a training run need to know about a dataset.

    `mean` / `std` are per channel, of the pixel values divided by 255, over every pixel of the
    train split (population std); `normalize` uses them.
    """

    name: str
    num_classes: int
    image_shape: tuple[int, int, int]
    splits: Mapping[str, int]
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str

    def normalize(self, images):
        """`(images / 255 - mean) / std` as float32 (numpy or JAX, like the input)."""
        return normalize(images, self.mean, self.std)


@functools.lru_cache(maxsize=None)
def _in_memory_info(name: str) -> DatasetInfo:
    if name == "shapes":
        from cnn.data import synthetic

        splits = {s: _shapes_split(s) for s in SPLITS}
        class_names = tuple(synthetic.SHAPE_CLASSES[1:])
        source = "synthetic shapes (cnn.data.synthetic.shapes)"
    else:
        loader = embedded.digits if name == "digits" else embedded.fashion_mnist_small
        splits = {s: loader(s) for s in SPLITS}
        if name == "digits":
            class_names = tuple(str(d) for d in range(10))
            source = "sklearn.datasets.load_digits, stratified 80/20 split (cnn.data.embedded)"
        else:
            from cnn.data.builders import FASHION_MNIST_CLASSES as class_names

            source = f"embedded Fashion-MNIST subset {embedded.FASHION_SMALL_DIR}"
    mean, std = pixel_statistics(splits["train"])  # cheap: computed once per process
    return DatasetInfo(
        name=name,
        num_classes=len(class_names),
        image_shape=tuple(splits["train"]["image"].shape[1:]),
        splits={s: len(v["image"]) for s, v in splits.items()},
        class_names=class_names,
        mean=mean,
        std=std,
        source=source,
    )


def info(
    name: str = "digits",
    *,
    data_dir: str | os.PathLike | None = None,
    prepared_dir: str | os.PathLike | None = None,
    tfds_data_dir: str | os.PathLike | None = None,
    try_tfds: bool = True,
    verify_checksums: bool = True,
) -> DatasetInfo:
    """Number of classes, image shape, split sizes, class names and normalization statistics.

    For TFDS datasets this prepares the data if needed (as `load` would) and caches the
    statistics in `cnn_normalization.json` next to the prepared data (or in `prepared_dir` when
    that directory is read-only).
    """
    _check_name(name)
    if name not in TFDS_DATASETS:
        return _in_memory_info(name)
    source, builder = _tfds_data_source(
        name,
        "train",
        data_dir=data_dir,
        prepared_dir=prepared_dir,
        tfds_data_dir=tfds_data_dir,
        try_tfds=try_tfds,
        verify_checksums=verify_checksums,
    )
    from cnn.data import builders

    tfds_info = builder.info
    splits = {s: int(tfds_info.splits[s].num_examples) for s in SPLITS}
    stats_path = pathlib.Path(builder.data_path) / STATS_FILE
    if not os.access(str(builder.data_path), os.W_OK):
        stats_path = (
            builders.resolve_prepared_dir(prepared_dir) / "normalization" / f"{builder.name}-{builder.version}.json"
        )
    mean, std = cached_statistics(stats_path, source, builders.statistics_key(builder))
    return DatasetInfo(
        name=name,
        num_classes=int(tfds_info.features["label"].num_classes),
        image_shape=tuple(int(d) for d in source[0]["image"].shape),
        splits=splits,
        class_names=tuple(tfds_info.features["label"].names),
        mean=mean,
        std=std,
        source=source.description,
    )


def normalize(images, mean: Sequence[float], std: Sequence[float]):
    """`(images / 255 - mean) / std` per channel, float32; `images` is uint8 `[..., C]` (numpy or JAX).

    Float inputs are taken to be on the 0..1 scale already (no division by 255).
    """
    if type(images).__module__.startswith("jax"):
        import jax.numpy as xp
    else:
        xp = np
    values = xp.asarray(images)
    values = values.astype(xp.float32) / 255.0 if xp.issubdtype(values.dtype, xp.integer) else values.astype(xp.float32)
    mean = xp.asarray(mean, xp.float32)
    std = xp.asarray(std, xp.float32)
    if mean.shape != (values.shape[-1],) or std.shape != (values.shape[-1],):
        raise ValueError(
            f"mean and std must have one entry per channel ({values.shape[-1]}), got {mean.shape} and {std.shape}"
        )
    return (values - mean) / std
