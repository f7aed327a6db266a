"""The server's training state: the session, the step sequence and the checks every request passes.

Every check runs before the trainer is touched, so a refused request changes no weight, no optimizer slot
and no metric. Steps are numbered inside the session from 0: the next step is applied once; the step just
applied, sent again (its reply was lost), gets the same reply without a second update.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass, field

import numpy as np

from server_part.trainer import ServerTrainer
from splitlearning.contract import PROTOCOL_VERSION, Agreement, Spec
from splitlearning.errors import InvalidRequest, PreconditionFailed, SessionNotFound, TooLarge

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepResult:
    step: int
    iv_gradient: np.ndarray
    metrics: list[float]


@dataclass
class _Session:
    id: str
    next_step: int = 0
    last: StepResult | None = field(default=None, repr=False)


class TrainingState:
    """Serialises requests onto one `ServerTrainer` and enforces the session's step order."""

    def __init__(self, trainer: ServerTrainer, max_batch_size: int, session_id: str | None = None) -> None:
        self.trainer = trainer
        self.max_batch_size = max_batch_size
        self._session = _Session(session_id or uuid.uuid4().hex, next_step=trainer.iterations)
        self._lock = threading.Lock()
        self.compute_seconds = 0.0  # running total of time inside trainer.train (read by the telemetry)

    @property
    def session_id(self) -> str:
        return self._session.id

    @property
    def next_step(self) -> int:
        return self._session.next_step

    def handshake(
        self, protocol_version: int, iv: Spec, label: Spec | None, session_id: str, max_batch_size: int
    ) -> Agreement:
        expected = self.trainer.contract
        if protocol_version != PROTOCOL_VERSION:
            raise PreconditionFailed(
                f"protocol version {protocol_version} is not spoken here: expected {PROTOCOL_VERSION}"
            )
        if iv != expected.iv:
            raise PreconditionFailed(f"cut mismatch: the server part expects iv {expected.iv}, the client sends {iv}")
        if label is not None and label != expected.label:
            raise PreconditionFailed(
                f"label mismatch: the server part expects label {expected.label}, the client sends {label}"
            )
        if max_batch_size > self.max_batch_size:
            raise PreconditionFailed(
                f"batch size {max_batch_size} is over this server's limit of {self.max_batch_size} samples"
            )
        self._check_session(session_id)
        return Agreement(
            session_id=self._session.id,
            next_step=self._session.next_step,
            contract=expected,
            max_batch_size=self.max_batch_size,
            metric_names=self.trainer.metric_names,
        )

    def train(self, session_id: str, step: int, iv: np.ndarray, labels: np.ndarray, reset: bool) -> StepResult:
        self._check_session(session_id)
        with self._lock:
            session = self._session
            if session.last is not None and step == session.last.step:
                log.info("step %d sent again; answering from the first reply, no second update", step)
                return session.last
            if step != session.next_step:
                raise PreconditionFailed(
                    f"step {step} is out of order: the server expects step {session.next_step}"
                    + (" (a gap: steps were skipped)" if step > session.next_step else " (already applied)")
                )
            self._check_batch(iv, labels)
            started = time.perf_counter()
            grad, metrics = self.trainer.train(iv, labels, reset)
            self.compute_seconds += time.perf_counter() - started
            session.last = StepResult(step, grad, metrics)
            session.next_step = step + 1
            return session.last

    def evaluate(self, session_id: str, iv: np.ndarray, labels: np.ndarray, reset: bool) -> list[float]:
        self._check_session(session_id)
        self._check_batch(iv, labels)
        with self._lock:
            return self.trainer.evaluate(iv, labels, reset)

    def predict(self, session_id: str, iv: np.ndarray) -> np.ndarray:
        self._check_session(session_id)
        self._check_iv(iv)
        with self._lock:
            return self.trainer.predict(iv)

    # -- checks ------------------------------------------------------------------------------------------

    def _check_session(self, session_id: str) -> None:
        if session_id and session_id != self._session.id:
            raise SessionNotFound(f"unknown session {session_id!r}: this server holds session {self._session.id!r}")

    def _check_iv(self, iv: np.ndarray) -> int:
        batch = self.trainer.contract.iv.check_batch(iv, "iv")
        if batch == 0:
            raise InvalidRequest("iv: the batch is empty; send at least one sample")
        if batch > self.max_batch_size:
            raise TooLarge(f"iv: batch of {batch} samples is over this server's limit of {self.max_batch_size}")
        if iv.dtype.kind == "f" and not np.isfinite(iv).all():
            raise InvalidRequest("iv: contains NaN or Inf; the client's forward pass has diverged")
        return batch

    def _check_batch(self, iv: np.ndarray, labels: np.ndarray) -> None:
        batch = self._check_iv(iv)
        label_batch = self.trainer.contract.label.check_batch(labels, "labels")
        if label_batch != batch:
            raise InvalidRequest(f"labels: {label_batch} labels for an iv batch of {batch} samples")
        classes = self.trainer.num_classes
        if classes is not None and labels.size and (labels.min() < 0 or labels.max() >= classes):
            raise InvalidRequest(
                f"labels: values must lie in [0, {classes}), got min {labels.min()} and max {labels.max()}"
            )
        if labels.dtype.kind == "f" and not np.isfinite(labels).all():
            raise InvalidRequest("labels: contain NaN or Inf")
