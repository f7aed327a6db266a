"""The call threads' pool (splitlearning/serving/pool.py): bounded, no work lost, and its idle threads end."""

from __future__ import annotations

import threading
import time

import pytest

from splitlearning.serving.pool import IdleEndingThreadPool

WAIT = 10.0  # seconds: a bound on waits, not a timing under test


def test_every_work_runs_on_at_most_max_workers_threads() -> None:
    pool = IdleEndingThreadPool(4, "test-pool", idle_seconds=0.01)  # short: threads end and start again meanwhile
    lock, running, most = threading.Lock(), [0], [0]

    def work(index: int) -> int:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.001)
        with lock:
            running[0] -= 1
        return index

    futures = [pool.submit(work, index) for index in range(300)]
    assert [future.result(timeout=WAIT) for future in futures] == list(range(300))
    assert 1 <= most[0] <= 4
    pool.shutdown()
    assert pool.threads == 0


def test_idle_threads_end_and_come_back() -> None:
    pool = IdleEndingThreadPool(3, "test-pool", idle_seconds=0.05)
    release = threading.Event()
    futures = [pool.submit(release.wait, WAIT) for _ in range(3)]
    assert pool.threads == 3
    release.set()
    assert all(future.result(timeout=WAIT) for future in futures)
    deadline = time.monotonic() + WAIT
    while pool.threads and time.monotonic() < deadline:
        time.sleep(0.01)
    assert pool.threads == 0
    assert pool.submit(lambda: "again").result(timeout=WAIT) == "again"
    pool.shutdown()


def test_an_error_goes_to_the_future_and_shutdown_refuses_new_work() -> None:
    pool = IdleEndingThreadPool(1, "test-pool")
    with pytest.raises(ZeroDivisionError):
        pool.submit(lambda: 1 / 0).result(timeout=WAIT)
    pool.shutdown(wait=True)
    assert pool.threads == 0
    with pytest.raises(RuntimeError):
        pool.submit(lambda: None)
