"""Retrying what is safe to retry: exponential backoff with jitter, bounded in time, reported when it gives up.

Safe to retry: a step (the server answers a resend of its last step from its first reply, with no second
update), a handshake, an evaluation restarted from its first batch, a prediction. Retried on: UNAVAILABLE
(server down or restarting, connection cut), DEADLINE_EXCEEDED (no answer in time), CANCELLED (the stream
was cut under us) and a training stream the server closed.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import grpc

from client_part import stopping
from client_part.transport import RemoteError

log = logging.getLogger(__name__)

T = TypeVar("T")

# ABORTED: a U-shape step collided with the client's own previous, not yet wound up, stream, or an evaluate or
# predict call named a step that the (restarted) server is not at: the rejoin that follows agrees on one.
RETRYABLE = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED, grpc.StatusCode.ABORTED}
)


class RetriesExhausted(ConnectionError):
    """Retrying did not succeed within the policy's bound; the message says how many tries and how long."""


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff `initial`, `initial * multiplier`, ... capped at `maximum`, each times a random factor in
    [1 - jitter, 1]; give up once `timeout` seconds have passed since the first failure."""

    timeout: float = 120.0
    initial: float = 0.1
    maximum: float = 2.0
    multiplier: float = 2.0
    jitter: float = 0.5

    def delays(self, rng: random.Random) -> Iterator[float]:
        delay = self.initial
        while True:
            yield delay * (1.0 - self.jitter * rng.random())
            delay = min(delay * self.multiplier, self.maximum)


def is_retryable(error: BaseException) -> bool:
    if isinstance(error, RemoteError):
        return error.code in RETRYABLE
    return isinstance(error, ConnectionError) and not isinstance(error, RetriesExhausted)


def call(
    policy: RetryPolicy,
    what: str,
    attempt: Callable[[bool], T],
    rng: random.Random | None = None,
    sleep: Callable[[float], None] | None = None,
    stop: Callable[[], bool] = lambda: False,
) -> T:
    """Run `attempt(retrying)` until it succeeds or fails with an error that is not retryable, or the bound
    is reached (RetriesExhausted). `retrying` is False on the first attempt, True after a failure. Once `stop()`
    says so, no further attempt is made: the wait before it ends at once with `stopping.Stopped`."""
    delays: Iterator[float] | None = None  # made on the first failure: the common path allocates nothing
    started: float | None = None
    attempts = 0
    while True:
        attempts += 1
        try:
            return attempt(attempts > 1)
        except (RemoteError, ConnectionError) as error:
            if not is_retryable(error):
                raise
            now = time.monotonic()
            started = now if started is None else started
            delays = delays or policy.delays(rng or random.Random())
            delay = next(delays)
            if now + delay - started > policy.timeout:
                raise RetriesExhausted(
                    f"{what}: gave up after {attempts} attempts in {now - started:.1f} s "
                    f"(retry timeout {policy.timeout:g} s): {error}"
                ) from error
            if stop():
                raise stopping.Stopped(f"stopped on request while retrying {what}") from error
            log.warning("%s failed (%s); retry %d in %.2f s", what, error, attempts, delay)
            if sleep is None:
                stopping.sleep(delay, stop, f"retrying {what}")
            else:
                sleep(delay)
