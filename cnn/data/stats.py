"""Per-channel normalization statistics, computed from a train split and cached in a JSON file."""

from __future__ import annotations

import json
import logging
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np

STATS_FILE = "cnn_normalization.json"


def pixel_statistics(source, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of `image / 255` over every pixel of `source`.

    `source` is a dict with "image" `[n, H, W, C]` or a random-access source of `{"image": ...}`
    records. Sums are exact int64 over uint8 values, so the result does not depend on chunking.
    """
    if isinstance(source, Mapping):
        n = len(source["image"])
        read = lambda lo, hi: np.asarray(source["image"][lo:hi])  # noqa: E731
    else:
        n = len(source)
        read = lambda lo, hi: np.stack([r["image"] for r in source.__getitems__(list(range(lo, hi)))])  # noqa: E731
    if n == 0:
        raise ValueError("cannot compute statistics of an empty split")
    total = squares = 0
    count = 0
    for lo in range(0, n, chunk):
        images = read(lo, min(lo + chunk, n)).astype(np.int64)
        images = images.reshape(-1, images.shape[-1])
        total = total + images.sum(0)
        squares = squares + (images * images).sum(0)
        count += len(images)
    mean = total / count
    variance = squares / count - mean**2
    return tuple(float(v) for v in mean / 255), tuple(float(v) for v in np.sqrt(np.maximum(variance, 0)) / 255)


def write_statistics(path: pathlib.Path, key: Mapping[str, Any], mean, std) -> None:
    """Writes the cache file atomically; a read-only location is logged and skipped."""
    record = {
        "key": dict(key),
        "mean": list(mean),
        "std": list(std),
        "of": "pixel / 255 over the train split, per channel",
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, path)
    except OSError as error:
        logging.info("cannot cache normalization statistics at %s: %s", path, error)


def cached_statistics(
    path: pathlib.Path, source, key: Mapping[str, Any]
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Statistics from the cache at `path` if it was written for `key`, else computed and cached."""
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("key") == dict(key):
            return tuple(cached["mean"]), tuple(cached["std"])
    mean, std = pixel_statistics(source)
    write_statistics(path, key, mean, std)
    return mean, std
