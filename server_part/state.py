"""The server's training state: the session, the step sequence and the checks every request passes.

Every check runs before the trainer is touched, so a refused request changes no weight, no optimizer slot
and no metric. Steps are numbered inside the session from 0: the next step is applied once; the step just
applied, sent again (its reply was lost), gets the same reply without a second update.

With checkpoints, a handshake that lists the steps the client can resume from moves the server to the latest
step both sides hold (restoring an older checkpoint of its own if need be). One client trains in a session at
a time: another client's handshake is refused while the holder has a training stream open.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from server_part.checkpoints import ServerCheckpoints
from server_part.middle_trainer import NOT_STANDARD, MiddleTrainer, PendingStep
from server_part.trainer import ServerTrainer
from splitlearning import encodings
from splitlearning.contract import PROTOCOL_VERSION, Agreement, CutMode, Spec
from splitlearning.errors import (
    Conflict,
    InvalidRequest,
    PreconditionFailed,
    SessionBusy,
    SessionNotFound,
    ShuttingDown,
    StepMismatch,
    TooLarge,
)

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
    encoding: int = encodings.RAW
    next_micro_batch: int = 0  # of the step in progress, when the client pipelines micro-batches
    micro_plan: tuple[int, int] = (0, 0)  # that step's (micro-batches, samples), fixed by its first micro-batch
    micro_seen: int = 0  # samples of that step received so far
    micro_replies: list[StepResult] = field(default_factory=list, repr=False)  # that step's replies so far
    last: StepResult | None = field(default=None, repr=False)
    # The replies of the last step when it was pipelined, one per micro-batch: its retry cache.
    last_micro: list[StepResult] | None = field(default=None, repr=False)
    in_flight: int | None = None  # U-shape: the step whose forward ran and whose backward is awaited
    last_ushape: HalfStep | None = field(default=None, repr=False)  # U-shape: the last applied step, to replay


@dataclass(frozen=True)
class HalfStep:
    """U-shape: a step between its forward and its backward; held by one training stream's handler only.

    A replay of the last applied step (its answers were lost) has no pending forward: `replay` holds the
    dLoss/dIV its backward answered, and `outputs` the forward's."""

    step: int
    outputs: np.ndarray
    pending: PendingStep | None = field(repr=False)
    replay: np.ndarray | None = field(default=None, repr=False)


class TrainingState:
    """Serialises requests onto one `ServerTrainer` and enforces the session's step order."""

    def __init__(
        self,
        trainer: ServerTrainer | MiddleTrainer,
        max_batch_size: int,
        session_id: str | None = None,
        wire_encodings: Sequence[str | int] = ("raw",),
        checkpoints: ServerCheckpoints | None = None,
    ) -> None:
        self.trainer = trainer
        self.max_batch_size = max_batch_size
        self.checkpoints = checkpoints
        self._holder: str | None = None  # client id of the client training in the session
        self._streams = 0  # training streams open now
        self._closed = False
        self.resent = 0  # steps answered again from the first reply (their reply was lost)
        self.restarted = 0  # pipelined steps started over after the client rejoined mid-step
        # The wire encodings a client may choose; raw is always among them.
        self.wire_encodings = (encodings.RAW, *encodings.parse_list(wire_encodings))
        self._session = _Session(session_id or uuid.uuid4().hex, next_step=trainer.iterations)
        self._lock = threading.Lock()
        self.compute_seconds = 0.0  # running total of time inside trainer.train (read by the telemetry)

    @property
    def session_id(self) -> str:
        return self._session.id

    @property
    def next_step(self) -> int:
        return self._session.next_step

    @property
    def mode(self) -> CutMode:
        return CutMode.USHAPE if isinstance(self.trainer, MiddleTrainer) else CutMode.STANDARD

    @property
    def encoding(self) -> int:
        """The wire encoding the last handshake chose for the IV and its gradient."""
        return self._session.encoding

    def handshake(
        self,
        protocol_version: int,
        iv: Spec,
        label: Spec | None,
        session_id: str,
        max_batch_size: int,
        mode: CutMode = CutMode.STANDARD,
        preferred_encodings: Sequence[int] = (),
        restorable_steps: Sequence[int] = (),
        client_id: str = "",
    ) -> Agreement:
        expected = self.trainer.contract
        if protocol_version != PROTOCOL_VERSION:
            raise PreconditionFailed(
                f"protocol version {protocol_version} is not spoken here: expected {PROTOCOL_VERSION}"
            )
        if mode is not self.mode:
            raise PreconditionFailed(
                f"cut mode mismatch: this server holds {self.mode.describe()}, but the client is built for "
                f"{mode.describe()}; start both parts with the same --cut"
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
        self._check_session(session_id, joining=True)
        # The U-shape's exchanges stay raw: narrowing applies to the standard cut's IV and gradient.
        allowed = self.wire_encodings if self.mode is CutMode.STANDARD else (encodings.RAW,)
        encoding = encodings.negotiate(preferred_encodings, allowed)
        with self._lock:
            self._check_open()
            if self._holder is not None and client_id != self._holder and self._streams > 0:
                raise SessionBusy(
                    "the session is in use by another client (one client per session): "
                    "wait until it disconnects, or start another server"
                )
            next_step = self._agree(restorable_steps) if restorable_steps else self._session.next_step
            # Only an accepted handshake changes the session: a refused one must not re-encode the holder's steps.
            self._holder = client_id
            # A client rejoins after a failure: a pipelined step it left unfinished starts over from its first
            # micro-batch, so what the unfinished one added (gradients, running metrics) is dropped.
            if self._session.next_micro_batch:
                log.info("step %d was left unfinished: it starts over", self._session.next_step)
                self.restarted += 1
                self._discard_micro()
            self._session.encoding = encoding
        return Agreement(
            session_id=self._session.id,
            next_step=next_step,
            contract=expected,
            max_batch_size=self.max_batch_size,
            metric_names=self.trainer.metric_names,
            mode=self.mode,
            encoding=encoding,
        )

    def train(self, session_id: str, step: int, iv: np.ndarray, labels: np.ndarray, reset: bool) -> StepResult:
        self._check_session(session_id)
        with self._lock:
            self._check_open()
            session = self._session
            if session.last is not None and step == session.last.step:
                self._count_resent(step, "its reply")
                return session.last
            if session.next_micro_batch:
                self._discard_micro()
                raise PreconditionFailed(
                    f"step {step} came whole while micro-batches of step {session.next_step} were due"
                )
            if step != session.next_step:
                raise PreconditionFailed(
                    f"step {step} is out of order: the server expects step {session.next_step}"
                    + (" (a gap: steps were skipped)" if step > session.next_step else " (already applied)")
                )
            self._check_batch(iv, labels)
            started = time.perf_counter()
            grad, metrics = self.trainer.train(iv, labels, reset)
            self.compute_seconds += time.perf_counter() - started
            session.last, session.last_micro = StepResult(step, grad, metrics), None
            session.next_step = step + 1
            self._after_step()
            return session.last

    @contextmanager
    def stream(self, client_id: str | None = None) -> Iterator[None]:
        """Count a training stream as open while the block runs (the session is in use meanwhile). A stream
        that names a client other than the one whose handshake holds the session is refused (SessionBusy);
        one that names none (`None`) is taken as the holder's."""
        with self._lock:
            if client_id is not None and self._holder is not None and client_id != self._holder:
                raise SessionBusy(
                    "the session is held by another client, which joined after this one (one client per "
                    "session): handshake again to take it back once that client disconnects"
                )
            self._streams += 1
        try:
            yield
        finally:
            with self._lock:
                self._streams -= 1

    def settle(self) -> None:
        """Apply the update the last step left pending (the servicer calls this once its reply is sent). Not
        counted in `compute_seconds`, the time spent answering steps: it overlaps the client's backward."""
        with self._lock:
            self.trainer.settle()

    def close(self) -> None:
        """Refuse further steps (UNAVAILABLE), after the step in flight; save a checkpoint if configured."""
        with self._lock:
            self._closed = True
            if self.checkpoints is not None and not self._session.next_micro_batch and self._session.in_flight is None:
                self.checkpoints.save(self._session.next_step)

    def reopen(self) -> None:
        """Accept steps again (a stopped server started anew)."""
        with self._lock:
            self._closed = False

    def _after_step(self) -> None:
        if self.checkpoints is not None:
            self.checkpoints.after_step(self._session.next_step)

    def _agree(self, offered: Sequence[int]) -> int:
        """The latest step that the client offers and this server holds: in memory, as the step its retry cache
        answers (the client lost that reply), or as a checkpoint (restored here). The step to send next."""
        session = self._session
        held = set(self.checkpoints.steps()) if self.checkpoints is not None else set()
        held.add(session.next_step)
        cached = self._cached_step()
        if cached is not None:
            held.add(cached)
        common = set(offered) & held
        if not common:
            # No common step: answer where the server stands; the client decides (and says) what that means.
            log.warning("client offers steps %s, server holds %s", sorted(offered), sorted(held))
            return session.next_step
        step = max(common)
        if step == cached:
            return step  # its resend is answered from the first reply
        if step != session.next_step:
            assert self.checkpoints is not None
            log.info("resuming at step %d (was at step %d): restoring its checkpoint", step, session.next_step)
            self._discard_micro()
            self.checkpoints.restore(step)
            session.next_step, session.in_flight = step, None
            session.last = session.last_micro = session.last_ushape = None
        return step

    # -- the U-shape's step: a forward and a backward, two exchanges on one training stream ----------------

    def begin_step(self, session_id: str, step: int, iv: np.ndarray) -> HalfStep:
        """Run the middle's forward for `step`; the returned half-step is finished by `finish_step`."""
        middle = self._middle()
        self._check_session(session_id)
        with self._lock:
            self._check_open()
            session = self._session
            replay = session.last_ushape
            if replay is not None and step == replay.step and step + 1 == session.next_step:
                self._check_iv(iv)
                self._count_resent(step, "its forward and its backward")
                return replay
            if step != session.next_step:
                raise PreconditionFailed(
                    f"step {step} is out of order: the server expects step {session.next_step}"
                    + (" (a gap: steps were skipped)" if step > session.next_step else " (already applied)")
                )
            if session.in_flight is not None:
                # Usually the client's own previous stream, cut and not yet wound up here: retry shortly.
                raise Conflict(f"step {step} is already in flight on another training stream; retry shortly")
            self._check_iv(iv)
            started = time.perf_counter()
            outputs, pending = middle.forward(iv)
            self.compute_seconds += time.perf_counter() - started
            session.in_flight = step
            return HalfStep(step, outputs, pending)

    def finish_step(self, half: HalfStep | None, session_id: str, step: int, output_gradient: np.ndarray) -> np.ndarray:
        """Back-propagate `output_gradient` through `half`'s forward, update, advance; return dLoss/dIV."""
        middle = self._middle()
        self._check_session(session_id)
        if half is None or half.step != step:
            raise InvalidRequest(f"output_gradient for step {step} arrived without that step's forward (send iv first)")
        if output_gradient.shape != half.outputs.shape or output_gradient.dtype != half.outputs.dtype:
            raise InvalidRequest(
                f"output_gradient: shape {list(output_gradient.shape)} {output_gradient.dtype.name} does not match "
                f"the middle's outputs {list(half.outputs.shape)} {half.outputs.dtype.name}"
            )
        if output_gradient.dtype.kind == "f" and not np.isfinite(output_gradient).all():
            raise InvalidRequest("output_gradient: contains NaN or Inf; the client's head has diverged")
        with self._lock:
            session = self._session
            if half.pending is None:  # a replay: answered again, no second update
                if session.last_ushape is not half:
                    raise PreconditionFailed(
                        f"step {step} can no longer be answered again: the session was moved to step "
                        f"{session.next_step} (resumed from a checkpoint); send that step's forward"
                    )
                assert half.replay is not None
                return half.replay
            if session.in_flight != step or session.next_step != step:  # a resume moved the session meanwhile
                raise PreconditionFailed(
                    f"step {step} is no longer in flight: the session was moved to step {session.next_step} "
                    "(resumed from a checkpoint); send that step's forward again"
                )
            started = time.perf_counter()
            iv_gradient = middle.backward(half.pending, output_gradient)
            self.compute_seconds += time.perf_counter() - started
            self._session.last_ushape = HalfStep(step, half.outputs, None, iv_gradient)
            self._session.in_flight = None
            self._session.next_step = step + 1
            self._after_step()
            return iv_gradient

    def abandon(self, half: HalfStep) -> None:
        """The stream ended between a forward and its backward: no update happened; the step may start again."""
        with self._lock:
            if half.pending is not None and self._session.in_flight == half.step:
                self._middle().undo_forward(half.pending)
                self._session.in_flight = None
                log.warning("step %d abandoned between its forward and its backward: undone, no update", half.step)

    def train_micro(
        self,
        session_id: str,
        step: int,
        micro_batch: int,
        micro_batches: int,
        step_samples: int,
        iv: np.ndarray,
        labels: np.ndarray,
        reset: bool,
    ) -> StepResult:
        """One micro-batch of a pipelined step; the last of them applies the step's one update.

        Micro-batches must come in order; anything else is refused and drops the step's partial gradients and
        what it added to the running metrics. A client that rejoins (handshakes again) after a failure starts an
        unfinished step over from its first micro-batch. The last applied step, when it was pipelined, is
        answered again from its stored replies, one per micro-batch, with no second update.
        """
        self._check_session(session_id)
        trainer = self.trainer
        if not isinstance(trainer, ServerTrainer):
            raise PreconditionFailed(NOT_STANDARD)
        # The request's own consistency first: a malformed micro-batch changes nothing, not even the step's
        # partial gradients.
        if not 0 <= micro_batch < micro_batches:
            raise InvalidRequest(f"micro_batch {micro_batch} does not lie in [0, {micro_batches})")
        self._check_batch(iv, labels)
        batch = len(iv)
        if step_samples > self.max_batch_size:
            raise TooLarge(f"step_samples {step_samples} is over this server's limit of {self.max_batch_size}")
        if not 0 < batch <= step_samples:
            raise InvalidRequest(f"step_samples {step_samples} must lie in [{batch}, {self.max_batch_size}]")
        with self._lock:
            session = self._session
            if session.last_micro is not None and step == session.last_micro[0].step and not session.next_micro_batch:
                return self._resent_micro(session.last_micro, step, micro_batch, micro_batches)
            expected = (session.next_step, session.next_micro_batch)
            if (step, micro_batch) != expected:
                self._discard_micro()
                raise PreconditionFailed(
                    f"micro-batch {micro_batch} of step {step} is out of order: the server expects micro-batch "
                    f"{expected[1]} of step {expected[0]}"
                )
            if micro_batch == 0:
                session.micro_plan, session.micro_seen, session.micro_replies = (micro_batches, step_samples), 0, []
            seen = session.micro_seen + batch
            last = micro_batch + 1 == micro_batches
            if (
                session.micro_plan != (micro_batches, step_samples)
                or seen > step_samples
                or (last and seen != step_samples)
            ):
                planned = session.micro_plan
                self._discard_micro()
                raise PreconditionFailed(
                    f"micro-batch {micro_batch} of step {step} breaks the step's plan: {planned[0]} micro-batches "
                    f"of {planned[1]} samples in all, {seen} with this one (the step's partial gradients are dropped)"
                )
            session.micro_seen = seen
            started = time.perf_counter()
            first = micro_batch == 0
            grad, metrics = trainer.train_micro(iv, labels, batch / step_samples, last, reset and first, first=first)
            self.compute_seconds += time.perf_counter() - started
            result = StepResult(step, grad, metrics)
            session.micro_replies.append(result)
            session.last = None
            session.next_micro_batch = 0 if last else micro_batch + 1
            session.next_step = step + 1 if last else step
            if last:
                session.last_micro, session.micro_replies = session.micro_replies, []
                self._after_step()
            return result

    def _resent_micro(self, replies: list[StepResult], step: int, micro_batch: int, micro_batches: int) -> StepResult:
        if micro_batches != len(replies):
            raise PreconditionFailed(
                f"step {step} was applied in {len(replies)} micro-batches and is resent in {micro_batches}: "
                "resend it as it was first sent"
            )
        if micro_batch == 0:
            self._count_resent(step, f"its {micro_batches} micro-batches")
        return replies[micro_batch]

    def _count_resent(self, step: int, answers: str) -> None:
        log.info("step %d sent again: %s answered from the first replies, no second update", step, answers)
        self.resent += 1

    def _cached_step(self) -> int | None:
        """The step the retry cache answers again (the last applied one), if any."""
        session = self._session
        if session.last is not None:
            return session.last.step
        if session.last_micro is not None:
            return session.last_micro[0].step
        if session.last_ushape is not None:
            return session.last_ushape.step
        return None

    def evaluate(
        self, session_id: str, iv: np.ndarray, labels: np.ndarray, reset: bool, step: int | None = None
    ) -> list[float]:
        """Accumulate loss and metrics for one batch; `step`, if given, is the client's (see `_check_partner`)."""
        self._check_session(session_id)
        self._check_batch(iv, labels)
        with self._lock:
            self._check_partner(step)
            return self.trainer.evaluate(iv, labels, reset)

    def predict(self, session_id: str, iv: np.ndarray, step: int | None = None) -> np.ndarray:
        self._check_session(session_id)
        self._check_iv(iv)
        with self._lock:
            self._check_partner(step)
            return self.trainer.predict(iv)

    # -- checks ------------------------------------------------------------------------------------------

    def _check_partner(self, step: int | None) -> None:
        """A client that trains in the session names its step: the parts must be at the same one to be one model."""
        next_step = self._session.next_step
        if step is None or step == next_step:
            return
        if step == self._cached_step():
            raise PreconditionFailed(
                f"the client is at step {step}, which this server applied but whose reply the client did not get: "
                "finish the step (fit resends it) before evaluating or predicting"
            )
        raise StepMismatch(
            f"the client is at step {step} but the server's part is at step {next_step}, so together they are no "
            "trained model (a side restarted from an older checkpoint?): handshake again to agree on a step"
        )

    def _check_open(self) -> None:
        if self._closed:
            raise ShuttingDown("the server is shutting down; retry when it is back")

    def _check_session(self, session_id: str, joining: bool = False) -> None:
        """Every request names the session from the handshake; only a handshake may leave it empty (to join)."""
        if not session_id and not joining:
            raise InvalidRequest("session_id is required: send the one the handshake returned")
        if session_id and session_id != self._session.id:
            # The held session's id is not named: it is what lets a client into the session.
            raise SessionNotFound(f"unknown session {session_id!r}: handshake again to get this server's session")

    def _discard_micro(self) -> None:
        """Drop the partial gradients of a pipelined step that will not be finished."""
        if self._session.next_micro_batch and isinstance(self.trainer, ServerTrainer):
            self.trainer.discard_micro()
        self._session.next_micro_batch = 0
        self._session.micro_replies = []

    def _middle(self) -> MiddleTrainer:
        if not isinstance(self.trainer, MiddleTrainer):
            raise PreconditionFailed(
                "this server holds the top of a standard cut: send iv with labels, not a U-shaped step"
            )
        return self.trainer

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
        label_spec = self.trainer.contract.label
        if label_spec is None:
            raise PreconditionFailed(NOT_STANDARD)
        label_batch = label_spec.check_batch(labels, "labels")
        if label_batch != batch:
            raise InvalidRequest(f"labels: {label_batch} labels for an iv batch of {batch} samples")
        classes = self.trainer.num_classes
        if classes is not None and labels.size and (labels.min() < 0 or labels.max() >= classes):
            raise InvalidRequest(
                f"labels: values must lie in [0, {classes}), got min {labels.min()} and max {labels.max()}"
            )
        if labels.dtype.kind == "f" and not np.isfinite(labels).all():
            raise InvalidRequest("labels: contain NaN or Inf")
