"""Shared pieces of the trainer tests: a tiny config and the digits data (used by subprocesses too)."""

from __future__ import annotations

import functools
import json
import pathlib
from typing import Any

import numpy as np

from cnn.data import BatchIterator

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
NON_DETERMINISTIC_KEYS = ("train/examples_per_sec",)


@functools.lru_cache(maxsize=None)
def _sklearn_digits() -> dict[str, dict[str, np.ndarray]]:
    """sklearn's 8x8 digits as float images in [0, 1], split 1437 train / 360 test in file order."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images[..., None] / 16.0).astype(np.float32)
    labels = digits.target.astype(np.int32)
    return {
        "train": {"image": images[:1437], "label": labels[:1437]},
        "test": {"image": images[1437:], "label": labels[1437:]},
    }


def have_data_load() -> bool:
    import cnn.data

    return hasattr(cnn.data, "load")


def digits_datasets(split: str, **kwargs: Any) -> BatchIterator:
    """A `fit(..., datasets=)` factory for the digits: `cnn.data.load("digits")` when it exists."""
    import cnn.data

    if have_data_load():
        return cnn.data.load("digits", split, **kwargs)
    batch_size = kwargs.pop("batch_size")
    return BatchIterator(_sklearn_digits()[split], batch_size, **kwargs)


def tiny_config(**overrides: Any):
    """simple_cnn (8, 16) on digits, batch 32, single device, no progress bar, no plot."""
    from cnn.train.loop import default_config

    config = default_config()
    config.dataset = "digits"
    config.num_classes = 10
    config.batch_size = 32
    config.eval_batch_size = 128
    config.num_train_steps = 40
    config.model = "simple_cnn"
    config.model_options.widths = (8, 16)
    config.parallelism = "single"
    config.optimizer.learning_rate = 0.1
    config.optimizer.weight_decay = 1e-4
    config.log_every_steps = 5
    config.eval_every_steps = 20
    config.checkpoint.every_steps = 10
    config.progress = False
    config.plot = False
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return config


def read_metrics(workdir: str | pathlib.Path, *, deterministic_only: bool = True) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl (without wall-clock throughput by default)."""
    records = []
    for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if deterministic_only:
            record = {k: v for k, v in record.items() if k not in NON_DETERMINISTIC_KEYS}
        records.append(record)
    return records


def flat_leaves(tree: Any) -> list[np.ndarray]:
    import jax

    return [np.asarray(leaf) for leaf in jax.tree_util.tree_leaves(tree)]
