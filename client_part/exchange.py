"""The training step across the cut, called from inside the compiled step (splitlearning/training/first_part.py).

`StepExchange` sends one step whole (`train`) or in micro-batches (`send` each as its forward pass is done, then
`receive` each answer), retrying after a rejoin of the session, and does the end-of-step bookkeeping once for both
paths: the step's time and bytes into the meter, the running metrics kept, the step counted.

With stale gradients (`stale`) up to two whole steps are in flight: `send_stale` sends the next step at once and
`receive_stale` reads the oldest one's answer; after a failure every step in flight is sent again, in order, on a
new stream (the server answers those it applied from its two-step reply cache). A step counts (`Position.step`)
when its answer is read.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from client_part import retry
from client_part.link import Link
from client_part.position import Position
from client_part.retry import RetryPolicy
from client_part.session import Session
from client_part.telemetry import ClientMeter
from client_part.transport import Transport
from splitlearning.contract import Spec
from splitlearning.top_k import sparsify
from splitlearning.training.first_part import Pipeline, Stale

Request = tuple[int, np.ndarray, np.ndarray, bool]  # `Transport.send`'s arguments for a whole step


class StepExchange:
    """Steps of `session` over `link` (the pipelined path sends on `transport` itself: standard cut, no noise).

    `micro_batches` > 1 pipelines each step; `iv` is the cut's spec (a part of a batch smaller than
    `micro_batches` is empty, and so is its answer); `sent` is shown each pipelined step's IV, once all of it
    has been sent."""

    def __init__(
        self,
        session: Session,
        link: Link,
        transport: Transport,
        position: Position,
        meter: ClientMeter,
        policy: RetryPolicy,
        stop: Callable[[], bool],
        micro_batches: int,
        iv: Spec,
        sent: Callable[[np.ndarray], None] | None = None,
    ) -> None:
        self.micro_batches = micro_batches
        self._shown = sent  # the pipelined step's whole IV, once sent (the leakage meter; `link` sees the rest)
        self.last_metrics: list[float] = []  # the running metrics after the last step (loss first)
        self._session = session
        self._link = link
        self._transport = transport
        self._position = position
        self._meter = meter
        self._policy = policy
        self._stop = stop
        self._iv = iv
        self._sent: list[bool] = []  # per micro-batch of the step in flight: was it sent (not empty)?
        self._parts: list[tuple[Any, ...]] = []  # the step in flight's sent micro-batches: `Transport.send`'s args
        self._started = 0.0  # when the step in flight's first part went out
        self._flight: list[tuple[Request, float]] = []  # stale gradients: the steps sent and not answered, oldest first

    def sparsified(self, iv: np.ndarray) -> np.ndarray:
        """The IV as this step sends it: with top-k, each sample's largest entries (no error feedback for an IV:
        splitlearning/top_k.py); else itself."""
        fraction = self._session.agreement.approximations.top_k
        return sparsify(iv, fraction) if fraction else iv

    def pipeline(self) -> Pipeline:
        """The pipelined step's calls, for the trainer."""
        return Pipeline(self.micro_batches, self.send, self.receive)

    def train(self, iv: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """One whole step: dLoss/dIV for `iv`."""
        session, position = self._session, self._position
        started = time.perf_counter()
        step = position.step
        iv = self.sparsified(iv)

        def attempt(retrying: bool) -> tuple[np.ndarray, list[float]]:
            session.rejoin_if_stale(step)
            return session.guarded(self._link.train, step, iv, labels, position.reset_metrics)

        grad, metrics = retry.call(self._policy, f"step {step}", attempt, stop=self._stop)
        self._done(started, metrics)
        return grad

    def send(self, index: np.ndarray, iv: np.ndarray, labels: np.ndarray, size: np.ndarray) -> np.ndarray:
        """Send micro-batch `index` of a step of `size` samples, without waiting for its answer."""
        transport = self._transport
        if int(index) == 0:
            self._sent, self._parts = [], []
            self._started = time.perf_counter()
        batch = int(size)
        self._sent.append(len(iv) > 0)  # a batch smaller than micro_batches leaves some parts empty
        if len(iv):
            iv = self.sparsified(iv)
            parts = min(self.micro_batches, batch)
            part = sum(self._sent) - 1
            # The arrays are views of the step's tensors, alive until the step ends: kept to send again.
            self._parts.append((iv, labels, self._position.reset_metrics and part == 0, part, parts, batch))
            transport.send(self._position.step, *self._parts[-1])
        return np.zeros((), np.int64)

    def receive(self, index: np.ndarray) -> np.ndarray:
        """The answer to micro-batch `index`: its dLoss/dIV. After a failure the whole step goes again, on a new
        stream, and the answers already used are dropped."""
        k = int(index)
        if not self._sent[k]:
            return np.zeros((0, *self._iv.shape), self._iv.dtype)
        transport, session, step = self._transport, self._session, self._position.step
        answered = sum(self._sent[:k])  # micro-batches of this step answered so far

        def attempt(retrying: bool) -> tuple[np.ndarray, list[float]]:
            if retrying:
                session.rejoin_if_stale(step)
                for part in self._parts:
                    transport.send(step, *part)
                for _ in range(answered):
                    session.guarded(transport.receive, step)
            return session.guarded(transport.receive, step)

        grad, metrics = retry.call(self._policy, f"step {step}, micro-batch {answered}", attempt, stop=self._stop)
        if k == max(i for i, sent in enumerate(self._sent) if sent):  # the step's last answer
            if self._shown is not None:
                self._shown(np.concatenate([part[0] for part in self._parts]))
            self._done(self._started, metrics)
        return grad

    def stale(self) -> Stale:
        """The stale-gradient step's calls, for the trainer."""
        return Stale(self.send_stale, self.receive_stale)

    @property
    def in_flight(self) -> int:
        """Stale gradients: steps sent whose answer is not read yet."""
        return len(self._flight)

    def forget(self) -> None:
        """Drop the steps in flight (a restore: they are trained again from the restored step)."""
        self._flight.clear()

    def send_stale(self, iv: np.ndarray, labels: np.ndarray) -> None:
        """Send the next step (after those in flight) without waiting for its answer."""
        transport, position = self._transport, self._position
        started = time.perf_counter()
        # The first step sent after an epoch starts (or a restore) restarts the server's running metrics; a resend
        # repeats its flag.
        request: Request = (position.step + len(self._flight), self.sparsified(iv), labels, position.reset_metrics)
        position.reset_metrics = False
        self._flight.append((request, started))
        if self._shown is not None:
            self._shown(iv)
        self._session.guarded(transport.send, *request)

    def receive_stale(self) -> np.ndarray:
        """The answer to the oldest step in flight: its dLoss/dIV. After a failure, a rejoin and every step in
        flight sent again, in order; the answers to all but the oldest stay queued for the next calls."""
        transport, session, step = self._transport, self._session, self._position.step
        flight = self._flight

        def attempt(retrying: bool) -> tuple[np.ndarray, list[float]]:
            if retrying:
                session.rejoin_if_stale(step)
                for request, _ in flight:
                    session.guarded(transport.send, *request)
            return session.guarded(transport.receive, step)

        grad, metrics = retry.call(self._policy, f"step {step}", attempt, stop=self._stop)
        _, started = flight.pop(0)
        self._done(started, metrics, reset=False)
        return grad

    def _done(self, started: float, metrics: list[float], reset: bool = True) -> None:
        """The end of a step, whole or pipelined: its time and bytes measured, its metrics kept, the step counted."""
        self._meter.exchange(time.perf_counter() - started, *self._transport.take_bytes())
        self.last_metrics = metrics
        if reset:  # a stale step's flag went with its request (`send_stale`)
            self._position.reset_metrics = False
        self._position.step += 1
