"""Reply first, update after: a step's optimizer update held back until `settle`, applied once, under a lock.

A trainer computes a step's gradients (and the reply they make), hands its update here (`defer`) and returns;
`settle` applies it, from any thread, exactly once. Everything that reads or writes the trainer's weights
settles first, so nothing ever sees a step half applied. An update that fails leaves the holder refusing every
later call: the peers already hold that step's reply, so training on would silently diverge from `fit`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import tensorflow as tf


class DeferredUpdate:
    """At most one pending optimizer update, applied on `device` by `settle`; `diverged` says, in the error
    message, whose weights stop following whose steps when an update fails."""

    def __init__(
        self, device: str, diverged: str = "this server's weights no longer follow the client's steps"
    ) -> None:
        self.device = device
        self._diverged = diverged
        self._pending: Callable[[], object] | None = None
        self._lock = threading.Lock()
        self.failed: str | None = None  # why a pending update could not be applied

    def defer(self, update: Callable[[], object]) -> None:
        with self._lock:
            self._pending = update

    def settle(self) -> bool:
        """Apply the pending update, if any (it runs once). True if one was applied. Raises RuntimeError, now
        and on every later call, once an update has failed."""
        with self._lock:
            if self.failed is not None:
                raise RuntimeError(self.failed)
            pending, self._pending = self._pending, None
            if pending is None:
                return False
            try:
                with tf.device(self.device):
                    pending()
            except Exception as error:
                self.failed = (
                    f"the optimizer update of an answered step failed ({type(error).__name__}: {error}); "
                    f"{self._diverged}: restart it from a checkpoint"
                )
                raise RuntimeError(self.failed) from error
            return True
