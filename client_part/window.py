"""A local loss's exchange: every step's IV and labels go out without waiting for the reply.

With a local auxiliary loss (splitlearning/training/local_loss.py) the client's update needs nothing from the
server, whose replies carry its running metrics and no dLoss/dIV. `LocalLossWindow.send` queues each step's request
on the training stream and returns at once; at most `size` requests (`WINDOW`, 8) are unanswered at a time, and
the oldest reply is read only when the window is full. A reply is small (the metrics), so the window only bounds
what a resend must hold and how far the client's step may run ahead of the server's; 8 steps cover a round trip
of 8 client steps, far more than a step's compute on a slow link needs to hide it.

`drain` reads every reply still due, so the client's step (`Position.step`, which counts the steps sent) and the
server's agree: the client drains at the end of each epoch, before a checkpoint, on a stop request, and before
evaluate, predict and the end of the session.

Faults: a failed read (or a broken stream) rejoins the session (`Session.rejoin_window`); the handshake's next step
N says which steps the server applied: the requests of steps before N are dropped (their replies carried metrics
only) and those from N on are sent again, in order, on the new stream.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from client_part import retry
from client_part.position import Position
from client_part.retry import RetryPolicy
from client_part.session import Session
from client_part.telemetry import ClientMeter
from client_part.transport import Transport

WINDOW = 8  # requests sent and unanswered at most


@dataclass(frozen=True)
class _Sent:
    """One step's request, kept (its arrays copied) until its reply is read, to be sent again after a failure."""

    step: int
    iv: np.ndarray
    labels: np.ndarray
    reset: bool


class LocalLossWindow:
    """The steps of `session` over `transport`, at most `size` unanswered. `prepare` turns the step's IV into the
    one sent (top-k's sparsification, else itself); `shown` sees each IV sent (the leakage meter), where given."""

    def __init__(
        self,
        session: Session,
        transport: Transport,
        position: Position,
        meter: ClientMeter,
        policy: RetryPolicy,
        stop: Callable[[], bool],
        prepare: Callable[[np.ndarray], np.ndarray],
        shown: Callable[[np.ndarray], None] | None = None,
        size: int = WINDOW,
    ) -> None:
        if size < 1:
            raise ValueError(f"the window must hold at least 1 request, got {size}")
        self.size = size
        self.last_metrics: list[float] = []  # the server's running metrics in the last reply read (loss first)
        self.first_read_after = 0  # requests unanswered when the first reply was read (how far the client ran)
        self._session = session
        self._transport = transport
        self._position = position
        self._meter = meter
        self._policy = policy
        self._stop = stop
        self._prepare = prepare
        self._shown = shown
        self._pending: deque[_Sent] = deque()
        self._read = 0  # replies read so far

    @property
    def in_flight(self) -> int:
        """Requests sent and not yet answered."""
        return len(self._pending)

    def send(self, iv: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Send this step's IV and labels (copied: the step's tensors do not outlive it) and count the step;
        first read the oldest reply while the window is full."""
        transport, position = self._transport, self._position
        began = time.perf_counter()
        while len(self._pending) >= self.size:
            self._receive_oldest()
        request = _Sent(position.step, self._prepare(np.array(iv)), np.array(labels), position.reset_metrics)
        self._pending.append(request)
        transport.send(request.step, request.iv, request.labels, request.reset)
        if self._shown is not None:
            self._shown(request.iv)
        position.reset_metrics = False
        position.step += 1
        self._meter.exchange(time.perf_counter() - began, *transport.take_bytes())
        return np.zeros((), np.int64)

    def drain(self) -> None:
        """Read every reply still due: the server has applied every step sent."""
        while self._pending:
            self._receive_oldest()

    def forget(self) -> None:
        """Step numbers go back (a restore, a new round): what was in flight is not sent again."""
        self._pending.clear()

    def _receive_oldest(self) -> None:
        session, transport = self._session, self._transport

        def attempt(retrying: bool) -> list[float] | None:
            if retrying:
                self._resend()
            if not self._pending:  # the server had applied them all; their replies are lost with the stream
                return None
            return session.guarded(transport.receive_metrics, self._pending[0].step)

        unanswered = len(self._pending)
        metrics = retry.call(self._policy, f"step {self._pending[0].step}", attempt, stop=self._stop)
        if metrics is None:
            return
        if not self._read:
            self.first_read_after = unanswered
        self._read += 1
        self._pending.popleft()
        self.last_metrics = metrics

    def _resend(self) -> None:
        """Rejoin, drop the requests the server applied, and send the rest again in order."""
        pending, step = self._pending, self._position.step
        next_step = self._session.rejoin_window(pending[0].step if pending else step, step)
        while pending and pending[0].step < next_step:
            pending.popleft()
        self._transport.end_stream()  # a stream the failure left open carries no reply of the new attempt
        for request in pending:
            self._transport.send(request.step, request.iv, request.labels, request.reset)
