"""A deterministic, resumable, shardable batch iterator over random-access data.

Every loader in `cnn.data` returns a `BatchIterator`. Its order is a pure function of
`(seed, epoch)`, and its position is a small JSON-serializable dict, so the training engine
can checkpoint it next to the model and a resumed run sees exactly the batches an
uninterrupted run would have seen.

Sharding keeps global batches intact: global batch `s` is the slice `perm[s*B:(s+1)*B]` of the
epoch permutation, and shard `i` of `n` yields rows `[i*B/n, (i+1)*B/n)` of it. Concatenating
the shards' batches in shard order gives exactly the batch a single process would see.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

import numpy as np

Batch = dict[str, np.ndarray]


class RandomAccessSource(Protocol):
    """Anything with a length and integer indexing that returns a dict of arrays."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Mapping[str, Any]: ...


def _num_examples(source: Mapping[str, np.ndarray] | RandomAccessSource) -> int:
    if isinstance(source, Mapping):
        lengths = {name: len(array) for name, array in source.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"source arrays must share their first dimension, got lengths {lengths}")
        return next(iter(lengths.values()))
    return len(source)


def _gather(source: Mapping[str, np.ndarray] | RandomAccessSource, indices: np.ndarray) -> Batch:
    if isinstance(source, Mapping):
        return {name: np.asarray(array[indices]) for name, array in source.items()}
    if hasattr(source, "__getitems__"):  # batched random access (TFDS / array_record data sources)
        records = source.__getitems__([int(i) for i in indices])
    else:
        records = [source[int(i)] for i in indices]
    return {name: np.stack([np.asarray(r[name]) for r in records]) for name in records[0]}


class BatchIterator(Iterator[Batch]):
    """Iterates `{name: [batch, ...]}` numpy batches in a seeded order, with a resumable position.

    Args:
      source: a dict of equally long arrays (e.g. `{"image": [N, H, W, C], "label": [N]}`) or a
        random-access source whose items are such dicts (e.g. a TFDS array_record data source).
      batch_size: the *global* batch size; each of `num_shards` shards yields
        `batch_size // num_shards` rows.
      shuffle: draw a fresh permutation per epoch from `(seed, epoch)`; else keep file order.
      seed: integer seed of the order.
      drop_remainder: drop the last partial global batch of an epoch (required when sharding).
      num_epochs: stop after this many epochs; `None` repeats forever.
      shard_index, num_shards: which slice of every global batch this process yields.
      transform: optional `fn(batch) -> batch` applied to each numpy batch (e.g. to float).
    """

    def __init__(
        self,
        source: Mapping[str, np.ndarray] | RandomAccessSource,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_remainder: bool = True,
        num_epochs: int | None = None,
        shard_index: int = 0,
        num_shards: int = 1,
        transform: Callable[[Batch], Batch] | None = None,
    ):
        self.num_examples = _num_examples(source)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_shards < 1 or not 0 <= shard_index < num_shards:
            raise ValueError(
                f"shard_index must be in [0, num_shards), got shard_index={shard_index}, num_shards={num_shards}"
            )
        if batch_size % num_shards:
            raise ValueError(
                f"batch_size={batch_size} is not divisible by num_shards={num_shards}; "
                f"use a multiple of {num_shards}"
            )
        if num_shards > 1 and not drop_remainder:
            raise ValueError("drop_remainder must be True when num_shards > 1 (shards need equal batches)")
        if drop_remainder and batch_size > self.num_examples:
            raise ValueError(
                f"batch_size={batch_size} exceeds the {self.num_examples} examples and drop_remainder=True "
                "would yield nothing; lower batch_size"
            )
        if num_epochs is not None and num_epochs < 1:
            raise ValueError(f"num_epochs must be >= 1 or None, got {num_epochs}")
        self.source = source
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_remainder = drop_remainder
        self.num_epochs = num_epochs
        self.shard_index = shard_index
        self.num_shards = num_shards
        self.transform = transform
        self._epoch = 0
        self._step = 0  # global batches already yielded in the current epoch
        self._order: np.ndarray | None = None
        self._order_epoch = -1

    @property
    def steps_per_epoch(self) -> int:
        """Global batches per epoch."""
        full, rest = divmod(self.num_examples, self.batch_size)
        return full if self.drop_remainder or rest == 0 else full + 1

    @property
    def local_batch_size(self) -> int:
        return self.batch_size // self.num_shards

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The permutation of example indices used in `epoch` (identity when not shuffling)."""
        if not self.shuffle:
            return np.arange(self.num_examples)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)

    def get_state(self) -> dict[str, int]:
        """The position: enough to continue exactly where this iterator stands."""
        return {"epoch": self._epoch, "step": self._step, "seed": self.seed}

    def set_state(self, state: Mapping[str, int]) -> None:
        """Moves to a position returned by `get_state` (of an iterator with the same settings)."""
        if int(state.get("seed", self.seed)) != self.seed:
            raise ValueError(f"state was saved with seed={state['seed']}, this iterator has seed={self.seed}")
        self._epoch, self._step = int(state["epoch"]), int(state["step"])

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> Batch:
        if self._step >= self.steps_per_epoch:
            self._epoch, self._step = self._epoch + 1, 0
        if self.num_epochs is not None and self._epoch >= self.num_epochs:
            raise StopIteration
        if self._order_epoch != self._epoch:
            self._order, self._order_epoch = self.epoch_order(self._epoch), self._epoch
        start = self._step * self.batch_size
        global_indices = self._order[start : start + self.batch_size]
        local = len(global_indices) // self.num_shards
        indices = global_indices[self.shard_index * local : (self.shard_index + 1) * local]
        self._step += 1
        batch = _gather(self.source, indices)
        return self.transform(batch) if self.transform is not None else batch
