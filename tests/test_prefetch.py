"""`batches.prefetch`: the next batch is made ready on a helper thread while the current one trains, in order,
and errors arrive at the batch they belong to."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import numpy as np
import pytest

from client_part import batches


def test_items_come_in_order_prepared_on_another_thread() -> None:
    threads: list[str] = []

    def prepare(item: int) -> int:
        threads.append(threading.current_thread().name)
        return item * 10

    assert list(batches.prefetch(iter(range(5)), prepare)) == [0, 10, 20, 30, 40]
    assert threads and all(name.startswith("split-prefetch") for name in threads)


def test_the_next_item_is_ready_before_the_caller_asks_for_it() -> None:
    prepared: list[int] = []
    second_ready = threading.Event()

    def prepare(item: int) -> int:
        prepared.append(item)
        if item == 1:
            second_ready.set()
        return item

    ready = batches.prefetch(iter(range(3)), prepare)
    assert next(ready) == 0
    assert second_ready.wait(timeout=10)  # prepared while the caller still holds item 0
    assert prepared[:2] == [0, 1]
    assert list(ready) == [1, 2]


def test_errors_arrive_at_their_item() -> None:
    def source() -> Iterator[int]:
        yield 1
        yield 2
        raise ValueError("the data ran dry")

    def prepare(item: int) -> int:
        if item == 2:
            raise TypeError("bad labels in batch 2")
        return item

    ready = batches.prefetch(source(), prepare)
    assert next(ready) == 1
    with pytest.raises(TypeError, match="batch 2"):
        next(ready)
    with pytest.raises(ValueError, match="ran dry"):
        list(batches.prefetch(source(), lambda item: item))


def test_fit_batches_are_the_same_through_prefetch() -> None:
    x, y = np.arange(40.0).reshape(10, 4), np.arange(10)
    order = batches.epoch_order(10, seed=3, epoch=1, shuffle=True)
    plain = list(batches.iterate(x, y, 3, order, start=1))
    fetched = list(batches.prefetch(batches.iterate(x, y, 3, order, start=1), lambda batch: batch))
    assert len(plain) == len(fetched) == 3
    for (xa, ya), (xb, yb) in zip(plain, fetched, strict=True):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
