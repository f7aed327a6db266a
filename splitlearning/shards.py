"""Data shards for several data holders: each client trains on the K-th of N parts of one training split.

`take` cuts (x, y) into `count` parts of sizes differing by at most one and returns one of them:

- `random` (IID): a permutation of all samples drawn from `seed`, cut into contiguous parts;
- `label` (non-IID): the samples ordered by label (stably: within a label, in the dataset's order), cut
  into contiguous parts, so that each part holds a contiguous range of classes.

Every data holder given the same data, shard count, `by` and seed gets its own part and no other's: the
parts are disjoint and together hold every sample once. numpy is imported when a shard is taken, not when
this module is (the CLIs parse `--shard` without it).
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

BY = ("random", "label")
MAX_LISTED_CLASSES = 20  # `describe` names the classes up to this many, else counts them
_SHARD = re.compile(r"\s*([0-9]+)\s*/\s*([0-9]+)\s*")


@dataclass(frozen=True)
class Shard:
    """The `index`-th of `count` shards, 1-based: `Shard(2, 3)` is the second of three."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if not 1 <= self.index <= self.count:
            raise ValueError(f"a shard is the K-th of N with 1 <= K <= N, got {self.index}/{self.count}")

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse(text: str) -> Shard:
    """An argparse `type`: 'K/N' (the K-th of N shards, 1 <= K <= N), refused with what was expected and the
    text given."""
    match = _SHARD.fullmatch(text)
    if match is None or not 1 <= int(match[1]) <= int(match[2]):
        raise argparse.ArgumentTypeError(f"expected K/N with 1 <= K <= N (the K-th of N shards), got {text!r}")
    return Shard(int(match[1]), int(match[2]))


parse.__name__ = "K/N"  # argparse names the type in its own messages (parse raises only its own)


def labels(y: np.ndarray) -> np.ndarray:
    """One label per sample, as `label` shards order them: `y` itself when 1-d, its column when (n, 1), the
    argmax over the last axis when (n, classes) with more than one column (one-hot or probabilities)."""
    import numpy as np

    y = np.asarray(y)
    if y.ndim == 1:
        return y
    if y.ndim == 2:
        return y[:, 0] if y.shape[1] == 1 else np.argmax(y, axis=-1)
    raise ValueError(
        f"shards by label need one label per sample (shape (n,), (n, 1) or one-hot (n, classes)), "
        f"got labels of shape {list(y.shape)}"
    )


def take(
    x: np.ndarray, y: np.ndarray, shard: Shard, by: str = "random", seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """The samples of `shard` among (x, y), cut `by` 'random' (IID, the permutation drawn from
    `np.random.default_rng(seed)`; the shard's samples come in that permutation's order) or 'label' (non-IID:
    a stable sort of the labels, see `labels`, cut into contiguous parts; the shard's samples then come in an
    order drawn from `seed`, so a validation hold-out from its end holds every class of the shard). Shard sizes
    differ by at most one; the same arguments always give the same shard."""
    import numpy as np

    if by not in BY:
        raise ValueError(f"shards are cut by {' or '.join(BY)}, got {by!r}")
    n = len(x)
    if len(y) != n:
        raise ValueError(f"cannot shard {n} samples with {len(y)} labels")
    if shard.count > n:
        raise ValueError(f"cannot cut {n} samples into {shard.count} shards: each shard needs at least one sample")
    order = np.random.default_rng(seed).permutation(n) if by == "random" else np.argsort(labels(y), kind="stable")
    chosen = np.array_split(order, shard.count)[shard.index - 1]
    if by == "label":
        chosen = chosen[np.random.default_rng(seed).permutation(len(chosen))]
    return x[chosen], y[chosen]


def describe(y_shard: np.ndarray, shard: Shard, by: str) -> str:
    """One line for the logs: 'shard 2/3 by label: 479 samples, classes 3, 4, 5, 6'. The classes are named
    when the labels are integers (or one-hot) of at most `MAX_LISTED_CLASSES` values, else counted."""
    import numpy as np

    keys = labels(y_shard)
    distinct = np.unique(keys)
    how = "at random" if by == "random" else f"by {by}"
    head = f"shard {shard} {how}: {len(keys)} samples"
    if not np.issubdtype(distinct.dtype, np.integer):
        return f"{head}, {len(distinct)} distinct labels"
    if len(distinct) > MAX_LISTED_CLASSES:
        return f"{head}, {len(distinct)} classes"
    return f"{head}, {'class' if len(distinct) == 1 else 'classes'} {', '.join(str(int(c)) for c in distinct)}"
