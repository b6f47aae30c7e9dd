"""PASCAL VOC semantic segmentation data: the directory layout, palette PNGs, and TFDS.

The VOC layout (VOC2007 / VOC2012, as unpacked from the devkit tar):

    VOCdevkit/VOC2012/
      JPEGImages/<id>.jpg                    the images (RGB)
      SegmentationClass/<id>.png             class labels as a palette ("P" mode) PNG: pixel value =
                                             class index 0..20, 255 = object boundary / void (ignored)
      ImageSets/Segmentation/{train,val,trainval}.txt   one image id per line

    source = VOCSegmentation("~/data/VOCdevkit", "train", size=(320, 320))
    example = source[0]          # {"image": uint8 [320, 320, 3], "mask": uint8 [320, 320]}
    batches = load("~/data/VOCdevkit", "val", batch_size=8, size=(500, 500), shuffle=False)

The palette is VOC's colour map (`voc_colormap`: class 1 aeroplane is (128, 0, 0), 15 person
(192, 128, 128), 255 (224, 224, 192)). Label PNGs saved as RGB instead of palette images are
mapped back through it.

TFDS: `tfds_source(name, split)` reads a TFDS-prepared dataset in a random-access format
(array_record) whose features include an image and a segmentation mask. TFDS's own `voc`
builder (4.9) stores only boxes and image-level labels, no masks, so for VOC segmentation it
says so and the directory reader is the way; datasets that carry masks (e.g. a custom builder
with `image` and `segmentation_mask`) are read with it.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from cnn.data.iterator import BatchIterator
from cnn.tasks.detection.voc import VOC_CLASSES

IGNORE_LABEL = 255
VOC_SEGMENTATION_CLASSES = ("background", *VOC_CLASSES)
IMAGE_DIR, LABEL_DIR, SPLIT_DIR = "JPEGImages", "SegmentationClass", os.path.join("ImageSets", "Segmentation")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def voc_colormap(num_colors: int = 256) -> np.ndarray:
    """VOC's label colour map, uint8 `[num_colors, 3]`: the bits of the index, three at a time,
    fill the colour channels from the most significant bit down."""
    colors = np.zeros((num_colors, 3), np.uint8)
    for index in range(num_colors):
        value, red, green, blue = index, 0, 0, 0
        for bit in range(8):
            red |= ((value >> 0) & 1) << (7 - bit)
            green |= ((value >> 1) & 1) << (7 - bit)
            blue |= ((value >> 2) & 1) << (7 - bit)
            value >>= 3
        colors[index] = (red, green, blue)
    return colors


def colorize(mask: np.ndarray) -> np.ndarray:
    """A label map `[h, w]` (0..255) as an RGB image `[h, w, 3]` in VOC's colours."""
    return voc_colormap()[np.asarray(mask, np.uint8)]


def read_label_png(path: str | os.PathLike) -> np.ndarray:
    """A segmentation label PNG as uint8 `[height, width]` class indices.

    Palette ("P") and greyscale ("L") images hold the indices directly; RGB images are mapped
    back through `voc_colormap`.

    Raises:
      ValueError: an RGB colour that is not in the colour map, or an unsupported image mode.
    """
    from PIL import Image

    with Image.open(path) as image:
        if image.mode in ("P", "L"):
            return np.asarray(image, np.uint8).copy()
        if image.mode not in ("RGB", "RGBA"):
            raise ValueError(f"{path}: label image mode {image.mode!r} is not supported (use 'P', 'L' or 'RGB')")
        rgb = np.asarray(image.convert("RGB"), np.uint8)
    colors = voc_colormap()
    codes = (colors[:, 0].astype(np.int64) << 16) | (colors[:, 1].astype(np.int64) << 8) | colors[:, 2]
    lookup = dict(zip(codes.tolist(), range(len(codes))))
    pixel_codes = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    unique, inverse = np.unique(pixel_codes, return_inverse=True)
    unknown = [int(c) for c in unique if int(c) not in lookup]
    if unknown:
        shown = [((c >> 16) & 255, (c >> 8) & 255, c & 255) for c in unknown[:5]]
        raise ValueError(f"{path}: colours {shown} are not VOC label colours")
    return np.asarray([lookup[int(c)] for c in unique], np.uint8)[inverse].reshape(rgb.shape[:2])


def write_label_png(path: str | os.PathLike, mask: np.ndarray) -> None:
    """Saves uint8 `[height, width]` class indices as a palette PNG with VOC's colours."""
    from PIL import Image

    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.min(initial=0) < 0 or mask.max(initial=0) > 255:
        raise ValueError(f"mask must be [height, width] with values in 0..255, got shape {mask.shape}")
    image = Image.frombytes("P", (mask.shape[1], mask.shape[0]), np.ascontiguousarray(mask, np.uint8).tobytes())
    image.putpalette(voc_colormap().reshape(-1).tolist())
    image.save(path)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """An image file as uint8 RGB `[height, width, 3]`."""
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), np.uint8).copy()


def find_voc_root(path: str | os.PathLike) -> pathlib.Path:
    """The directory holding `JPEGImages`, `SegmentationClass` and `ImageSets/Segmentation`.

    Accepts that directory itself, a `VOCdevkit` directory (VOC2012 preferred over VOC2007), or
    a directory containing `VOCdevkit`.

    Raises:
      FileNotFoundError: no such directory (names every place looked at).
    """
    base = pathlib.Path(path).expanduser()
    candidates = [base]
    for parent in (base, base / "VOCdevkit"):
        candidates += [parent / "VOC2012", parent / "VOC2007"]
    for candidate in candidates:
        if all((candidate / sub).is_dir() for sub in (IMAGE_DIR, LABEL_DIR, SPLIT_DIR)):
            return candidate
    raise FileNotFoundError(
        f"no VOC segmentation layout ({IMAGE_DIR}/, {LABEL_DIR}/, {SPLIT_DIR}/) under path={str(path)!r}; "
        f"looked in: {', '.join(str(c) for c in candidates)}"
    )


def read_image_ids(root: str | os.PathLike, split: str) -> list[str]:
    """The image ids listed in `ImageSets/Segmentation/<split>.txt` (blank lines skipped).

    Raises:
      ValueError: no such split (lists the splits found).
    """
    root = find_voc_root(root)
    split_dir = root / SPLIT_DIR
    path = split_dir / f"{split}.txt"
    if not path.is_file():
        found = sorted(p.stem for p in split_dir.glob("*.txt"))
        raise ValueError(f"split={split!r} has no list {path}; splits found: {found}")
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def fit_to_size(
    image: np.ndarray, mask: np.ndarray, size: Sequence[int], *, image_fill: int = 0, ignore_label: int = IGNORE_LABEL
) -> tuple[np.ndarray, np.ndarray]:
    """Pads (bottom/right; image with `image_fill`, mask with `ignore_label`) and center-crops an
    image `[h, w, 3]` and its mask `[h, w]` to `size = (height, width)`.

    Padding with the ignore label keeps every real pixel in the evaluation while letting images
    of different sizes share a batch (VOC images are at most 500x500).
    """
    target_h, target_w = (int(v) for v in size)
    height, width = mask.shape
    pad_h, pad_w = max(target_h - height, 0), max(target_w - width, 0)
    image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), constant_values=image_fill)
    mask = np.pad(mask, ((0, pad_h), (0, pad_w)), constant_values=ignore_label)
    top, left = (mask.shape[0] - target_h) // 2, (mask.shape[1] - target_w) // 2
    return image[top : top + target_h, left : left + target_w], mask[top : top + target_h, left : left + target_w]


class VOCSegmentation:
    """Random access to a VOC-layout split: item `i` is `{"image": uint8 [h, w, 3], "mask": uint8 [h, w]}`.

    Args:
      root: the VOC directory (see `find_voc_root`).
      split: a list in `ImageSets/Segmentation` ("train", "val", "trainval", ...).
      size: `(height, width)` to pad/crop every example to (`fit_to_size`), so that examples
        batch together; None keeps each image's own size.

    Attributes:
      ids: the image ids, in list order.
    """

    def __init__(self, root: str | os.PathLike, split: str, *, size: Sequence[int] | None = None):
        self.root = find_voc_root(root)
        self.split = split
        self.ids = read_image_ids(self.root, split)
        self.size = None if size is None else tuple(int(v) for v in size)
        if self.size is not None and (len(self.size) != 2 or min(self.size) < 1):
            raise ValueError(f"size must be (height, width) with positive sides, got size={size!r}")

    def __len__(self) -> int:
        return len(self.ids)

    def image_path(self, image_id: str) -> pathlib.Path:
        for suffix in IMAGE_SUFFIXES:
            path = self.root / IMAGE_DIR / f"{image_id}{suffix}"
            if path.is_file():
                return path
        raise FileNotFoundError(f"image {image_id!r} of split {self.split!r} not found in {self.root / IMAGE_DIR}")

    def label_path(self, image_id: str) -> pathlib.Path:
        path = self.root / LABEL_DIR / f"{image_id}.png"
        if not path.is_file():
            raise FileNotFoundError(f"label {path} of image {image_id!r} (split {self.split!r}) not found")
        return path

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        image_id = self.ids[int(index)]
        image = read_image(self.image_path(image_id))
        mask = read_label_png(self.label_path(image_id))
        if image.shape[:2] != mask.shape:
            raise ValueError(f"image {image_id!r}: image is {image.shape[:2]} but its label is {mask.shape}")
        if self.size is not None:
            image, mask = fit_to_size(image, mask, self.size)
        return {"image": image, "mask": mask}


def load(
    root: str | os.PathLike,
    split: str,
    batch_size: int,
    *,
    size: Sequence[int],
    shuffle: bool = True,
    seed: int = 0,
    drop_remainder: bool = True,
    num_epochs: int | None = None,
    shard_index: int = 0,
    num_shards: int = 1,
) -> BatchIterator:
    """A `BatchIterator` of `{"image": uint8 [B, h, w, 3], "mask": uint8 [B, h, w]}` from a VOC layout."""
    return BatchIterator(
        VOCSegmentation(root, split, size=size), batch_size, shuffle=shuffle, seed=seed,
        drop_remainder=drop_remainder, num_epochs=num_epochs, shard_index=shard_index, num_shards=num_shards,
    )


class TfdsSegmentationSource:
    """Random access to a TFDS data source, as `{"image": uint8 [h, w, c], "mask": uint8 [h, w]}`."""

    def __init__(self, data_source: Any, image_key: str, mask_key: str, description: str):
        self.data_source, self.image_key, self.mask_key = data_source, image_key, mask_key
        self.description = description

    def __len__(self) -> int:
        return len(self.data_source)

    def _convert(self, record: Any) -> dict[str, np.ndarray]:
        mask = np.asarray(record[self.mask_key])
        if mask.ndim == 3 and mask.shape[-1] == 1:
            mask = mask[..., 0]
        return {"image": np.asarray(record[self.image_key], np.uint8), "mask": mask.astype(np.uint8)}

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return self._convert(self.data_source[int(index)])

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, np.ndarray]]:
        return [self._convert(r) for r in self.data_source.__getitems__([int(i) for i in indices])]


def tfds_source(
    name: str = "voc/2012",
    split: str = "train",
    *,
    data_dir: str | os.PathLike | None = None,
    image_key: str = "image",
    mask_key: str | None = None,
) -> TfdsSegmentationSource:
    """A TFDS-prepared segmentation dataset (random-access format) as image/mask examples.

    Args:
      name: the TFDS name (with config), e.g. "voc/2012".
      split: a TFDS split ("train", "validation", "train[:10%]", ...).
      data_dir: the TFDS data dir (None: TFDS's default).
      image_key: the image feature.
      mask_key: the mask feature; None picks the only feature whose name contains
        "segmentation" or "mask".

    Raises:
      ValueError: the dataset has no (unique) mask feature: TFDS's `voc` stores boxes only
        (the message lists the features and points to `VOCSegmentation`).
      FileNotFoundError: the dataset is not prepared under `data_dir`, or only in a format that
        needs TensorFlow to read.
    """
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=None if data_dir is None else str(data_dir))
    features = list(builder.info.features.keys())
    if mask_key is None:
        masks = [f for f in features if "segmentation" in f or "mask" in f]
        if len(masks) != 1:
            raise ValueError(
                f"TFDS dataset {name!r} has {'no' if not masks else 'several'} segmentation mask feature"
                f"{'' if not masks else 's ' + str(masks)} (features: {features}); "
                + ("TFDS's voc stores boxes and image labels only: read the VOC directory with "
                   "cnn.tasks.segmentation.voc.VOCSegmentation" if not masks else "pass mask_key")
            )
        mask_key = masks[0]
    for argument, key in (("image_key", image_key), ("mask_key", mask_key)):
        if key not in features:
            raise ValueError(f"{argument}={key!r} is not a feature of {name!r}; features: {features}")
    if not (pathlib.Path(builder.data_path) / "dataset_info.json").is_file():
        raise FileNotFoundError(
            f"TFDS dataset {name!r} is not prepared at {builder.data_path}; prepare it with "
            f"`tfds build {name} --file_format=array_record`"
        )
    formats = {f.value for f in builder.info.available_file_formats()} | {builder.info.file_format.value}
    if not formats & {"array_record", "parquet"}:
        raise FileNotFoundError(
            f"TFDS dataset {name!r} at {builder.data_path} is stored as {sorted(formats)}, which needs "
            "TensorFlow to read; prepare it with --file_format=array_record"
        )
    source = tfds.data_source(name, split=split, data_dir=str(builder.data_dir_root), download=False)
    return TfdsSegmentationSource(source, image_key, mask_key, f"TFDS data_source {builder.data_path}")


__all__ = [
    "IGNORE_LABEL",
    "TfdsSegmentationSource",
    "VOCSegmentation",
    "VOC_SEGMENTATION_CLASSES",
    "colorize",
    "find_voc_root",
    "fit_to_size",
    "load",
    "read_image",
    "read_image_ids",
    "read_label_png",
    "tfds_source",
    "voc_colormap",
    "write_label_png",
]
