"""The thread pool a `Host`'s gRPC server runs its calls on: bounded, and its threads end once idle.

`concurrent.futures.ThreadPoolExecutor` starts a thread per call until it holds `max_workers`, then keeps them
all for the life of the process: after a burst of calls (hostile ones too) the server's thread count stayed at
its bound (issue 26: 16 threads before, 55 long after the calls had gone). Here a thread that has had no call
for `idle_seconds` ends; the bound stays the same, so admission's arithmetic (admission.py) still holds.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

# Seconds a thread waits for another call before it ends (creating one again costs well under a millisecond).
IDLE_SECONDS = 5.0


@dataclass(frozen=True)
class _Work:
    future: futures.Future[Any]
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    def run(self) -> None:
        if not self.future.set_running_or_notify_cancel():
            return
        try:
            result = self.fn(*self.args, **self.kwargs)
        except BaseException as error:  # handed to the future, as ThreadPoolExecutor does
            self.future.set_exception(error)
        else:
            self.future.set_result(result)


class IdleEndingThreadPool(futures.Executor):
    """At most `max_workers` threads, started as work comes; each ends after `idle_seconds` without work."""

    def __init__(self, max_workers: int, thread_name_prefix: str, idle_seconds: float = IDLE_SECONDS) -> None:
        if max_workers < 1:
            raise ValueError(f"max_workers must be at least 1, got {max_workers}")
        self.max_workers = max_workers
        self._prefix = thread_name_prefix
        self._idle_seconds = idle_seconds
        self._queue: deque[_Work] = deque()
        self._ready = threading.Condition(threading.Lock())
        self._threads: set[threading.Thread] = set()
        self._idle = 0  # threads alive and running no work (waiting for some, or about to)
        self._names = itertools.count()
        self._shutdown = False

    @property
    def threads(self) -> int:
        """Threads alive now."""
        with self._ready:
            return len(self._threads)

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> futures.Future[T]:
        future: futures.Future[T] = futures.Future()
        with self._ready:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._queue.append(_Work(future, fn, args, kwargs))
            if self._idle >= len(self._queue):  # an idle thread takes it
                self._ready.notify()
            elif len(self._threads) < self.max_workers:
                thread = threading.Thread(target=self._serve, name=f"{self._prefix}_{next(self._names)}", daemon=True)
                self._threads.add(thread)
                self._idle += 1
                thread.start()
            # else: every thread is busy; the first to finish takes it
        return future

    def _serve(self) -> None:
        while True:
            with self._ready:
                while not self._queue:
                    # A wait that times out re-checks the queue before ending: no work is ever left behind.
                    if self._shutdown or (not self._ready.wait(self._idle_seconds) and not self._queue):
                        self._idle -= 1
                        self._threads.discard(threading.current_thread())
                        return
                work = self._queue.popleft()
                self._idle -= 1
            work.run()
            del work  # its arguments (a call's state) go now, not when the next work comes
            with self._ready:
                self._idle += 1

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No more work; idle threads end now, busy ones when their work ends (joined when `wait`)."""
        with self._ready:
            self._shutdown = True
            if cancel_futures:
                while self._queue:
                    self._queue.popleft().future.cancel()
            self._ready.notify_all()
            threads = list(self._threads)
        if wait:
            for thread in threads:
                thread.join()
