"""Which aligned rows every step of a vertical split trains on: a pure function of the aligned row count, the
batch size and the agreed seed, so every party derives the same batches without sending any (docs/vertical.md,
"Batch order"; docs/protocol.md states it for implementations in other languages).

The aligned table's first `train_rows` rows train and the next `test_rows` are held out. Epoch `e` visits the
training rows sorted by the key `SHA-256(TAG ‖ seed ‖ e ‖ row)` (seed, epoch and row each as 8 bytes,
big-endian; keys compared as bytes), in batches of `batch_size` (the last one smaller when it does not divide):
step `s` is batch `s mod steps_per_epoch` of epoch `s div steps_per_epoch`. Held-out batch `b` is rows
`train_rows + b·batch_size` onwards, in order. A hash, not a seeded generator: numpy's generators promise no
stream across versions, and a party written in another language must get the same order from the docs alone.
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass

import numpy as np

TAG = b"splitlearning-vertical-order-v1"


def epoch_order(rows: int, seed: int, epoch: int) -> np.ndarray:
    """The training rows of epoch `epoch` in the order it visits them (int64 indices into 0..rows-1)."""
    prefix = TAG + seed.to_bytes(8, "big") + epoch.to_bytes(8, "big")
    keys = [hashlib.sha256(prefix + row.to_bytes(8, "big")).digest() for row in range(rows)]
    return np.array(sorted(range(rows), key=keys.__getitem__), dtype=np.int64)


@dataclass(frozen=True)
class BatchOrder:
    """The batches of a vertical run, as every party derives them."""

    train_rows: int
    test_rows: int
    batch_size: int
    epochs: int
    seed: int

    def __post_init__(self) -> None:
        if self.train_rows < 1:
            raise ValueError(f"no training rows: {self.train_rows} of the aligned rows train")
        if self.test_rows < 0 or self.batch_size < 1 or self.epochs < 1:
            raise ValueError(f"bad batch order: {self}")
        if not 0 <= self.seed < 2**64:
            raise ValueError(f"the seed must be in 0..2**64-1, got {self.seed}")

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.train_rows / self.batch_size)

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs

    @property
    def test_batches(self) -> int:
        return math.ceil(self.test_rows / self.batch_size)

    def epoch_of(self, step: int) -> int:
        """The 0-based epoch step `step` belongs to."""
        return step // self.steps_per_epoch

    def ends_epoch(self, step: int) -> bool:
        """Whether step `step` is the last of its epoch (an evaluation follows it)."""
        return (step + 1) % self.steps_per_epoch == 0

    def rows_in(self, step: int) -> int:
        """How many rows step `step` trains on (without working out the epoch's order)."""
        if not 0 <= step < self.total_steps:
            raise ValueError(f"step {step} is outside 0..{self.total_steps - 1}")
        start = (step % self.steps_per_epoch) * self.batch_size
        return min(self.batch_size, self.train_rows - start)

    def train_rows_of(self, step: int) -> np.ndarray:
        """The aligned rows step `step` trains on, in batch order."""
        if not 0 <= step < self.total_steps:
            raise ValueError(f"step {step} is outside 0..{self.total_steps - 1}")
        order = self._order(self.epoch_of(step))
        start = (step % self.steps_per_epoch) * self.batch_size
        return order[start : start + self.batch_size]

    def test_rows_of(self, batch: int) -> np.ndarray:
        """The aligned rows of held-out batch `batch`."""
        if not 0 <= batch < self.test_batches:
            raise ValueError(f"held-out batch {batch} is outside 0..{self.test_batches - 1}")
        start = self.train_rows + batch * self.batch_size
        return np.arange(start, min(start + self.batch_size, self.train_rows + self.test_rows), dtype=np.int64)

    @functools.lru_cache(maxsize=2)  # noqa: B019 - a few small arrays, for the instance's life
    def _order(self, epoch: int) -> np.ndarray:
        return epoch_order(self.train_rows, self.seed, epoch)


def split_rows(aligned: int, test_fraction: float) -> tuple[int, int]:
    """(train, test) rows of `aligned` rows: the last round(aligned · test_fraction) are held out."""
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"the held-out fraction must be in [0, 1), got {test_fraction}")
    test = round(aligned * test_fraction)
    return aligned - test, test
