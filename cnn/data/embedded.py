"""Datasets that need nothing but the installed package: sklearn digits and a Fashion-MNIST subset.

`digits` (the default of `make demo` and of the tests) is scikit-learn's `load_digits`: 1,797 real
8x8 handwritten digits (a copy of the UCI "Optical Recognition of Handwritten Digits" test set),
pixel values 0..16. They are scaled to uint8 by `round(v * 255 / 16)` (exactly
`(255 * v + 8) // 16`, so 0 -> 0, 8 -> 128, 16 -> 255) and split stratified by class with a fixed
seed: in every class, `round(0.2 * count)` examples go to "test". That gives **1,438 train and 359
test** examples (per class train/test: 142/36, 146/36, 142/35, 146/37, 145/36, 146/36, 145/36,
143/36, 139/35, 144/36).

`fashion_mnist_small` is a committed subset of the real Fashion-MNIST (MIT license, notice in
`cnn/data/assets/fashion_mnist_small/LICENSE`): the first 500 training images of each class
(5,000) and the first 100 test images of each class (1,000), in original file order, stored in
the original IDX `.gz` format (2.6 MB). It is harder than digits, so comparisons between models are less
squeezed against the ceiling, and its test split is almost three times larger: a logistic
regression on raw pixels scores 95.8% on digits (359 test examples, std error 1.1%) but 83.2% on
fashion_mnist_small (1,000 test examples, std error 1.2%).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import pathlib

import numpy as np

from cnn.data import files

DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0

ASSETS_DIR = pathlib.Path(__file__).resolve().parent / "assets"
FASHION_SMALL_DIR = ASSETS_DIR / "fashion_mnist_small"
FASHION_SMALL_PER_CLASS = {"train": 500, "test": 100}
# SHA-256 of the committed files, checked on every load (written by `write_fashion_mnist_small`).
FASHION_SMALL_SHA256 = {
    "train-images-idx3-ubyte.gz": "b240910d2f9a3dad10993db98ccd0cce3dd9149f4e70b24a0b03b57d41908dae",
    "train-labels-idx1-ubyte.gz": "ae0d767c2f6dbbdea3abe9cbf56dacf5c2069a5513b4a9e0ff10b1923bc33661",
    "t10k-images-idx3-ubyte.gz": "04516f9d284037ea6cce7310aafaed77e8f8c1547f1127ef4aa754c46f47f8f5",
    "t10k-labels-idx1-ubyte.gz": "540f63e62544edb8406d1292429a47e6cdb42e4fa2eaa233f072b34e1f6bc46c",
}


def digits_uint8() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 sklearn digits: images uint8 `[1797, 8, 8, 1]` (0..255) and labels int32 `[1797]`."""
    from sklearn.datasets import load_digits  # deferred: sklearn import is slow-ish

    digits = load_digits()
    values = digits.images.astype(np.int64)  # 0..16, integers stored as float64
    images = ((255 * values + 8) // 16).astype(np.uint8)[..., None]
    return images, digits.target.astype(np.int32)


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """Indices of a per-class random split: `round(test_fraction * count)` of each class to "test".

    Returns `{"train": sorted indices, "test": sorted indices}`; deterministic in `seed`.
    """
    test = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        order = np.random.default_rng([seed, int(c)]).permutation(len(members))
        test.append(members[order[: int(np.floor(test_fraction * len(members) + 0.5))]])
    test_indices = np.sort(np.concatenate(test))
    train_indices = np.setdiff1d(np.arange(len(labels)), test_indices)
    return {"train": train_indices, "test": test_indices}


@functools.lru_cache(maxsize=None)
def _digits_split(split: str) -> dict[str, np.ndarray]:
    images, labels = digits_uint8()
    indices = stratified_split(labels, DIGITS_TEST_FRACTION, DIGITS_SPLIT_SEED)[split]
    out = {"image": images[indices], "label": labels[indices]}
    for array in out.values():
        array.setflags(write=False)  # shared by every caller
    return out


def digits(split: str) -> dict[str, np.ndarray]:
    """The "train" or "test" split of sklearn digits: `{"image": uint8 [n,8,8,1], "label": int32 [n]}`."""
    if split not in ("train", "test"):
        raise ValueError(f"split={split!r} is not a split of digits; valid: ['test', 'train']")
    return _digits_split(split)


def _write_idx_gz(path: pathlib.Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as f:
        f.write(header + np.ascontiguousarray(array, np.uint8).tobytes())


def fashion_small_indices(labels: np.ndarray, per_class: int) -> np.ndarray:
    """The first `per_class` indices of every class, in original order (the subset rule)."""
    chosen = [np.flatnonzero(labels == c)[:per_class] for c in range(10)]
    return np.sort(np.concatenate(chosen))


def write_fashion_mnist_small(source_dir: str | os.PathLike, out_dir: str | os.PathLike = FASHION_SMALL_DIR) -> None:
    """Writes the embedded subset from the full Fashion-MNIST IDX files in `source_dir`.

    `source_dir` is searched like any raw-data directory (e.g. `../shared/data`).
    """
    raw = files.locate("fashion_mnist", source_dir)
    files.verify_raw_checksums(raw)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for prefix, split in (("train", "train"), ("t10k", "test")):
        role = "train" if split == "train" else "test"
        images = files.read_idx(raw.paths[f"{role}_images"])
        labels = files.read_idx(raw.paths[f"{role}_labels"])
        keep = fashion_small_indices(labels, FASHION_SMALL_PER_CLASS[split])
        _write_idx_gz(out / f"{prefix}-images-idx3-ubyte.gz", images[keep])
        _write_idx_gz(out / f"{prefix}-labels-idx1-ubyte.gz", labels[keep])


@functools.lru_cache(maxsize=None)
def _fashion_small_split(split: str) -> dict[str, np.ndarray]:
    prefix = "train" if split == "train" else "t10k"
    arrays = {}
    for kind in ("images", "labels"):
        name = f"{prefix}-{kind}-idx{3 if kind == 'images' else 1}-ubyte.gz"
        path = FASHION_SMALL_DIR / name
        if not path.is_file():
            raise FileNotFoundError(
                f"embedded file {path} is missing; the package was installed without its data files "
                "(install from a git checkout, or list cnn/data/assets/*/* as package data)"
            )
        actual = hashlib.sha256(path.read_bytes()).hexdigest()
        if actual != FASHION_SMALL_SHA256[name]:
            raise ValueError(
                f"embedded file {path} is corrupted: sha256 {actual}, expected {FASHION_SMALL_SHA256[name]}"
            )
        arrays[kind] = files.read_idx(path)
    out = {"image": arrays["images"][..., None], "label": arrays["labels"].astype(np.int32)}
    for array in out.values():
        array.setflags(write=False)
    return out


def fashion_mnist_small(split: str) -> dict[str, np.ndarray]:
    """The embedded Fashion-MNIST subset: `{"image": uint8 [n,28,28,1], "label": int32 [n]}`."""
    if split not in ("train", "test"):
        raise ValueError(f"split={split!r} is not a split of fashion_mnist_small; valid: ['test', 'train']")
    return _fashion_small_split(split)
