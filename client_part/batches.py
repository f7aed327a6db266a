"""Batches of the client's data: numpy arrays or a batched `tf.data.Dataset`.

The order of an epoch is a function of (seed, epoch) alone, never of process history, so a resumed run
sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np
import tensorflow as tf

from splitlearning.contract import Spec

Batch = tuple[Any, Any]
T = TypeVar("T")
U = TypeVar("U")
_DONE = object()


def epoch_order(size: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """Sample indices for one epoch."""
    if not shuffle:
        return np.arange(size)
    return np.random.default_rng([seed, epoch]).permutation(size)


def num_batches(data: Any, batch_size: int) -> int | None:
    if isinstance(data, tf.data.Dataset):
        count = int(data.cardinality())
        return count if count >= 0 else None
    return -(-len(data) // batch_size)


def iterate(x: Any, y: Any, batch_size: int, order: np.ndarray | None = None, start: int = 0) -> Iterator[Batch]:
    """Yield (x, y) batches; `x` may be a batched dataset of (x, y) pairs (then `y` is None)."""
    if isinstance(x, tf.data.Dataset):
        if y is not None:
            raise ValueError("when x is a tf.data.Dataset it must yield (x, y) pairs; do not pass y")
        for element in x.skip(start):
            if not isinstance(element, tuple) or len(element) < 2:
                raise ValueError("a training dataset must yield (x, y) pairs")
            yield element[0], element[1]
        return
    if y is not None and len(x) != len(y):
        raise ValueError(f"x has {len(x)} samples but y has {len(y)}")
    size = len(x)
    for begin in range(start * batch_size, size, batch_size):
        if order is None:
            window = slice(begin, begin + batch_size)
            yield x[window], (y[window] if y is not None else None)
        else:
            index = order[begin : begin + batch_size]
            yield x[index], (y[index] if y is not None else None)


def labels(y: Any, spec: Spec | None) -> np.ndarray:
    """`y` as the agreed label `spec` takes it: sparse labels as a column (as Keras takes them) become a vector,
    and the dtype becomes the spec's where it casts safely (else a `TypeError`)."""
    if spec is None:
        raise RuntimeError("the agreed contract names no label")
    values = np.asarray(y)
    if values.ndim == len(spec.shape) + 2 and values.shape[-1] == 1:
        values = values.reshape(values.shape[:-1])
    if values.dtype != spec.dtype:
        if not np.can_cast(values.dtype, spec.dtype, casting="same_kind"):
            raise TypeError(
                f"labels of dtype {values.dtype.name} cannot become {spec.dtype.name}, "
                f"the server's label dtype ({spec})"
            )
        values = values.astype(spec.dtype)
    return values


def iterate_inputs(x: Any, batch_size: int) -> Iterator[Any]:
    """Yield input batches only (for predict); a dataset may yield x or (x, ...)."""
    if isinstance(x, tf.data.Dataset):
        for element in x:
            yield element[0] if isinstance(element, tuple) else element
        return
    for begin in range(0, len(x), batch_size):
        yield x[begin : begin + batch_size]


def prefetch(source: Iterator[T], prepare: Callable[[T], U]) -> Iterator[U]:
    """`prepare(item)` for each item of `source`, in order, the next one made ready on a helper thread while
    the caller works on the current one (as `tf.data`'s prefetch does for Keras `fit`). Errors from `source`
    or `prepare` reach the caller at the item they belong to."""

    def produce() -> U | object:
        item = next(source, _DONE)
        return item if item is _DONE else prepare(item)  # type: ignore[arg-type]

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="split-prefetch") as pool:
        future = pool.submit(produce)
        while (ready := future.result()) is not _DONE:
            future = pool.submit(produce)
            yield ready  # type: ignore[misc]
