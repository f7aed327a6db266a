"""Stopping on request (SIGINT, SIGTERM): the exception, and waits that notice a request within a tenth of a
second.

A signal handler only sets a flag (`threading.Event.set`, never waited on in the main thread, whose handler
could otherwise deadlock on the event's lock); the long waits poll it in short slices instead.
"""

from __future__ import annotations

import time
from collections.abc import Callable

POLL = 0.1  # seconds between looks at the flag while waiting


class Stopped(KeyboardInterrupt):
    """Stopped on request (SIGTERM/SIGINT); the message says where, and whether a checkpoint was saved."""


def sleep(seconds: float, stop: Callable[[], bool], what: str) -> None:
    """`time.sleep(seconds)`, cut short by `stop()`: then `Stopped` naming `what` was interrupted."""
    deadline = time.monotonic() + seconds
    while True:
        if stop():
            raise Stopped(f"stopped on request while {what}")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        time.sleep(min(POLL, remaining))
