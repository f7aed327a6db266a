"""One training session: a second part of its own, its step sequence, its retry cache and its checks.

Every check runs before the trainer is touched, so a refused request changes no weight, no optimizer slot and no
metric. Steps are numbered inside the session from 0: the next step is applied once; the step just applied, sent
again by the client that sent it (its reply was lost), gets the same reply without a second update
(server_part/replies.py).

With checkpoints, a handshake that lists the steps the client can resume from moves the session to the latest
step both sides hold (restoring an older checkpoint of its own if need be). One client trains in a session at a
time: another client's handshake is refused while the holder has a training stream open.

Requests of one session are serialised by the session's own lock; sessions never share a lock, a tensor or a
reply. The registry of sessions (server_part/sessions.py) opens, finds, unloads and closes them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import cast

import numpy as np

from server_part.checkpoints import ServerCheckpoints
from server_part.middle_trainer import NOT_STANDARD, MiddleTrainer, PendingStep
from server_part.parts import Trainer
from server_part.replies import ReplyCache, StepKind
from splitlearning import encodings
from splitlearning.approximations import NONE, Approximations
from splitlearning.codec import EncodingCode
from splitlearning.contract import CutMode
from splitlearning.errors import (
    Conflict,
    InvalidRequest,
    PreconditionFailed,
    SessionBusy,
    SplitError,
    StepMismatch,
    TooLarge,
)
from splitlearning.groups import Membership
from splitlearning.text import clip
from splitlearning.top_k import ErrorFeedback
from splitlearning.training.loss_trainer import LossTrainer

log = logging.getLogger(__name__)

# Clients remembered as having joined a session (to word a refusal rightly); ids are at most 128 characters.
_JOINED_KEPT = 64


@dataclass(frozen=True)
class StepResult:
    step: int
    iv_gradient: np.ndarray | None  # None: none goes back (the client trains on a local loss)
    metrics: list[float]


@dataclass(frozen=True)
class HalfStep:
    """U-shape: a step between its forward and its backward; held by one training stream's handler only.

    A replay of the last applied step (its answers were lost) has no pending forward: `replay` holds the
    dLoss/dIV its backward answered, and `outputs` the forward's."""

    step: int
    outputs: np.ndarray
    pending: PendingStep | None = field(repr=False)
    replay: np.ndarray | None = field(default=None, repr=False)
    iv: np.ndarray | None = field(default=None, repr=False)  # the request's, which a resend must repeat


@dataclass(frozen=True)
class Limits:
    """What every session of a server allows: the batch size, the wire encodings a client may choose, and
    whether it trains at all (a server that only serves predictions does not)."""

    max_batch_size: int
    wire_encodings: tuple[EncodingCode, ...] = (encodings.RAW,)
    trains: bool = True
    approximations: frozenset[str] = frozenset()  # those a client may ask for (splitlearning/approximations.py)


@dataclass
class _MicroStep:
    """A pipelined step in progress: its plan, fixed by its first micro-batch, and what came so far."""

    next: int = 0  # the micro-batch due next; 0: no pipelined step in progress
    plan: tuple[int, int] = (0, 0)  # (micro-batches, samples)
    seen: int = 0  # samples received so far
    requests: list[tuple[np.ndarray, ...]] = field(default_factory=list, repr=False)
    replies: list[StepResult] = field(default_factory=list, repr=False)
    residual: np.ndarray | None = field(default=None, repr=False)  # top-k's, before the step's first micro-batch


class Session:
    """Serialises one session's requests onto its own trainer and enforces its step order."""

    def __init__(
        self,
        session_id: str,
        trainer: Trainer,
        limits: Limits,
        checkpoints: ServerCheckpoints | None = None,
        membership: Membership | None = None,
        resumed: bool = False,
    ) -> None:
        self.id = session_id
        self.membership = membership  # the group round it trains, for a session opened for one
        self.resumed = resumed  # loaded from its checkpoints, rather than opened new by a handshake naming none
        self.steps_applied = 0  # training steps applied since it came into memory
        self.trainer = trainer
        self.limits = limits
        self.checkpoints = checkpoints
        self.next_step = trainer.iterations
        self.encoding: EncodingCode = encodings.RAW  # chosen by the last accepted handshake
        self.approximations = NONE  # asked for by the last accepted handshake
        self._feedback: ErrorFeedback | None = None  # top-k's error feedback of the gradients sent
        # Top-k's residual restored from a checkpoint, until the next handshake says whether top-k goes on.
        self._carried = checkpoints.residual if checkpoints is not None else None
        self.resent = 0  # steps answered again from the first reply (their reply was lost)
        self.restarted = 0  # pipelined steps started over after the client rejoined mid-step
        self.compute_seconds = 0.0  # running total of time inside the trainer (read by the telemetry)
        self.last_used = time.monotonic()  # the last request's arrival, for idle expiry
        self._holder: str | None = None  # client id of the client training in the session
        self._joined: dict[str, None] = {}  # clients whose handshakes joined, most recent last (bounded)
        self._streams = 0  # training streams open now
        self._gone: SplitError | None = None  # set once the session is unloaded: what every later request gets
        self._cache: ReplyCache[StepResult | HalfStep] = ReplyCache()
        self._micro = _MicroStep()
        self._in_flight: int | None = None  # U-shape: the step whose forward ran and whose backward is awaited
        self._lock = threading.Lock()

    @property
    def mode(self) -> CutMode:
        return self.trainer.mode

    @property
    def holder(self) -> str | None:
        return self._holder

    def idle_seconds(self, now: float) -> float | None:
        """Seconds since the last request; None while a training stream is open (the session is in use)."""
        return None if self._streams else now - self.last_used

    @property
    def in_use(self) -> bool:
        """A training stream is open in it."""
        return self._streams > 0

    @property
    def unused(self) -> bool:
        """Opened new by a handshake at the initial part (no checkpoint, no group round's start) and no training
        step applied since: it holds nothing a new session lacks."""
        started = self.membership is not None and bool(self.membership.start)
        return not self.resumed and not self.steps_applied and not started

    # -- joining ---------------------------------------------------------------------------------------------

    def join(
        self,
        client_id: str,
        encoding: EncodingCode,
        restorable_steps: Sequence[int] = (),
        approximations: Approximations = NONE,
    ) -> int:
        """Let `client_id` train in the session with `encoding` on the wire and `approximations`; return the next
        step to send."""
        with self._lock:
            self._check_live()
            if self._holder is not None and client_id != self._holder and self._streams > 0:
                raise SessionBusy(
                    "the session is in use by another client (one client per session): wait until it "
                    "disconnects, or open a session of your own (a handshake naming no session)"
                )
            next_step = self._agree(restorable_steps) if restorable_steps else self.next_step
            self.last_used = time.monotonic()
            # Only an accepted handshake changes the session: a refused one must not re-encode the holder's steps.
            self._holder = client_id
            self._joined.pop(client_id, None)  # most recent last; the oldest beyond the bound are forgotten
            self._joined[client_id] = None
            while len(self._joined) > _JOINED_KEPT:
                del self._joined[next(iter(self._joined))]
            # A client rejoins after a failure: a pipelined step it left unfinished starts over from its first
            # micro-batch, so what the unfinished one added (gradients, running metrics) is dropped.
            if self._micro.next:
                log.info("step %d was left unfinished: it starts over", self.next_step)
                self.restarted += 1
                self._discard_micro()
            self.encoding = encoding
            if approximations != self.approximations:
                self.approximations = approximations
                self._cache.depth = approximations.in_flight
            # Top-k goes on with what its gradients left out so far; without top-k nothing is left out.
            residual = self._residual if approximations.top_k else None
            self._feedback = ErrorFeedback(approximations.top_k, residual) if approximations.top_k else None
            self._carried = None
            return next_step

    def _agree(self, offered: Sequence[int]) -> int:
        """The latest step that the client offers and this session holds: in memory, as the step its retry cache
        answers (the client lost that reply), or as a checkpoint (restored here). The step to send next."""
        held = set(self.checkpoints.steps()) if self.checkpoints is not None else set()
        held.add(self.next_step)
        cached = self._cache.steps
        held.update(cached)
        common = set(offered) & held
        if not common:
            # No common step: answer where the session stands; the client decides (and says) what that means.
            log.warning("client offers steps %s, the session holds %s", sorted(offered)[-8:], sorted(held))
            return self.next_step
        step = max(common)
        if step in cached:
            return step  # its resend (and the next one's, with stale gradients) is answered from the first reply
        if step != self.next_step:
            assert self.checkpoints is not None
            log.info("resuming at step %d (was at step %d): restoring its checkpoint", step, self.next_step)
            self._discard_micro()
            self.checkpoints.restore(step)
            self._restore_residual(self.checkpoints.residual)
            self.next_step, self._in_flight = step, None
            self._cache.forget()
        return step

    @contextmanager
    def stream(self, client_id: str | None = None) -> Iterator[str]:
        """Count a training stream as open while the block runs (the session is in use meanwhile); yields the
        client the stream trains for. A stream that names a client other than the one whose handshake holds
        the session is refused (SessionBusy); one that names none (`None`) is taken as the holder's."""
        if not self.limits.trains:
            raise PreconditionFailed(
                "this server serves predictions only (split-server --serve-only): it trains no step; "
                "Evaluate and Predict are answered"
            )
        with self._lock:
            self._check_live()
            if self._holder is None:
                raise PreconditionFailed("no client has joined this session: handshake before training")
            if client_id is not None and client_id != self._holder:
                if client_id in self._joined:
                    raise SessionBusy(
                        "the session is held by another client, which joined after this one (one client per "
                        "session): handshake again to take it back once that client disconnects"
                    )
                raise SessionBusy(
                    f"client '{clip(client_id, 40)}' has not joined this session, which another client holds (one "
                    "client per session): handshake naming the session to join it (refused while its holder has "
                    "a training stream open), or open a session of your own (a handshake naming none)"
                )
            self._streams += 1
            holder = self._holder
        try:
            yield holder
        finally:
            with self._lock:
                self._streams -= 1
                self.last_used = time.monotonic()

    # -- the standard cut's step ---------------------------------------------------------------------------

    def train(self, client_id: str, step: int, iv: np.ndarray, labels: np.ndarray, reset: bool) -> StepResult:
        self._check_batch(iv, labels)  # a resend is checked like any request
        with self._lock:
            self._touch()
            cached = self._cache.answer(step, StepKind.WHOLE, client_id, (iv, labels))
            if isinstance(cached, StepResult):
                self._count_resent(step, "its reply")
                return cached
            if self._micro.next:
                self._discard_micro()
                raise PreconditionFailed(
                    f"step {step} came whole while micro-batches of step {self.next_step} were due"
                )
            self._check_order(step)
            started = time.perf_counter()
            if self.approximations.local_loss:  # the client trains on its own loss: no dLoss/dIV goes back
                result = StepResult(step, None, self._standard().train_top(iv, labels, reset))
            else:
                grad, metrics = self._standard().train(iv, labels, reset)
                result = StepResult(step, self._sent_gradient(grad), metrics)
            self.compute_seconds += time.perf_counter() - started
            self._cache.remember(step, StepKind.WHOLE, client_id, [(iv, labels)], [result])
            self.next_step = step + 1
            self._after_step()
            return result

    def train_micro(
        self,
        client_id: str,
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
        trainer = self._standard()
        # The request's own consistency first: a malformed micro-batch changes nothing, not even the step's
        # partial gradients.
        if not 0 <= micro_batch < micro_batches:
            raise InvalidRequest(f"micro_batch {micro_batch} does not lie in [0, {micro_batches})")
        self._check_batch(iv, labels)
        batch = len(iv)
        limit = self.limits.max_batch_size
        if step_samples > limit:
            raise TooLarge(f"step_samples {step_samples} is over this server's limit of {limit}")
        if not 0 < batch <= step_samples:
            raise InvalidRequest(f"step_samples {step_samples} must lie in [{batch}, {limit}]")
        if self.approximations.in_flight > 1 or self.approximations.local_loss:
            raise PreconditionFailed(
                f"micro-batches in a session that trains with {self.approximations.describe()}: its steps are "
                "sent whole (micro_batches 0 or 1)"
            )
        with self._lock:
            self._touch()
            micro = self._micro
            if not micro.next:
                cached = self._cache.answer(step, StepKind.MICRO, client_id, (iv, labels), micro_batch, micro_batches)
                if isinstance(cached, StepResult):
                    if micro_batch == 0:
                        self._count_resent(step, f"its {micro_batches} micro-batches")
                    return cached
            expected = (self.next_step, micro.next)
            if (step, micro_batch) != expected:
                self._discard_micro()
                raise PreconditionFailed(
                    f"micro-batch {micro_batch} of step {step} is out of order: the server expects micro-batch "
                    f"{expected[1]} of step {expected[0]}"
                )
            if micro_batch == 0:
                self._micro = micro = _MicroStep(plan=(micro_batches, step_samples), residual=self._residual)
            seen = micro.seen + batch
            last = micro_batch + 1 == micro_batches
            if micro.plan != (micro_batches, step_samples) or seen > step_samples or (last and seen != step_samples):
                planned = micro.plan
                self._discard_micro()
                raise PreconditionFailed(
                    f"micro-batch {micro_batch} of step {step} breaks the step's plan: {planned[0]} micro-batches "
                    f"of {planned[1]} samples in all, {seen} with this one (the step's partial gradients are dropped)"
                )
            micro.seen = seen
            started = time.perf_counter()
            first = micro_batch == 0
            grad, metrics = trainer.train_micro(iv, labels, batch / step_samples, last, reset and first, first=first)
            self.compute_seconds += time.perf_counter() - started
            result = StepResult(step, self._sent_gradient(grad), metrics)
            micro.requests.append((iv, labels))
            micro.replies.append(result)
            if first:
                self._cache.forget()  # the step before this one can no longer be resent
            if last:
                self._cache.remember(step, StepKind.MICRO, client_id, micro.requests, list(micro.replies))
                self._micro = _MicroStep()
                self.next_step = step + 1
                self._after_step()
            else:
                micro.next = micro_batch + 1
            return result

    def settle(self) -> None:
        """Apply the update the last step left pending (the servicer calls this once its reply is sent). Not
        counted in `compute_seconds`, the time spent answering steps: it overlaps the client's backward."""
        with self._lock:
            self.trainer.settle()

    # -- the U-shape's step: a forward and a backward, two exchanges on one training stream ----------------

    def begin_step(self, client_id: str, step: int, iv: np.ndarray) -> HalfStep:
        """Run the middle's forward for `step`; the returned half-step is finished by `finish_step`."""
        middle = self._middle()
        self._check_iv(iv)
        with self._lock:
            self._touch()
            cached = self._cache.answer(step, StepKind.USHAPE, client_id, (iv,))
            if isinstance(cached, HalfStep):
                self._count_resent(step, "its forward and its backward")
                return cached
            self._check_order(step)
            if self._in_flight is not None:
                # Usually the client's own previous stream, cut and not yet wound up here: retry shortly.
                raise Conflict(f"step {step} is already in flight on another training stream; retry shortly")
            started = time.perf_counter()
            outputs, pending = middle.forward(iv)
            self.compute_seconds += time.perf_counter() - started
            self._in_flight = step
            return HalfStep(step, outputs, pending, iv=iv)

    def finish_step(self, client_id: str, half: HalfStep | None, step: int, output_gradient: np.ndarray) -> np.ndarray:
        """Back-propagate `output_gradient` through `half`'s forward, update, advance; return dLoss/dIV."""
        middle = self._middle()
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
            self._touch()
            if half.pending is None:  # a replay: answered again, no second update
                if self._cache.step != step:
                    raise PreconditionFailed(
                        f"step {step} can no longer be answered again: the session was moved to step "
                        f"{self.next_step} (resumed from a checkpoint); send that step's forward"
                    )
                assert half.replay is not None
                return half.replay
            if self._in_flight != step or self.next_step != step:  # a resume moved the session meanwhile
                raise PreconditionFailed(
                    f"step {step} is no longer in flight: the session was moved to step {self.next_step} "
                    "(resumed from a checkpoint); send that step's forward again"
                )
            started = time.perf_counter()
            iv_gradient = middle.backward(half.pending, output_gradient)
            self.compute_seconds += time.perf_counter() - started
            assert half.iv is not None
            replay = HalfStep(step, half.outputs, None, iv_gradient, half.iv)
            self._cache.remember(step, StepKind.USHAPE, client_id, [(half.iv,)], [replay])
            self._in_flight = None
            self.next_step = step + 1
            self._after_step()
            return iv_gradient

    def abandon(self, half: HalfStep) -> None:
        """The stream ended between a forward and its backward: no update happened; the step may start again."""
        with self._lock:
            if half.pending is not None and self._in_flight == half.step:
                self._middle().undo_forward(half.pending)
                self._in_flight = None
                log.warning("step %d abandoned between its forward and its backward: undone, no update", half.step)

    # -- evaluation and prediction -------------------------------------------------------------------------

    def evaluate(self, iv: np.ndarray, labels: np.ndarray, reset: bool, step: int | None = None) -> list[float]:
        """Accumulate loss and metrics for one batch; `step`, if given, is the client's (see `_check_partner`)."""
        self._check_batch(iv, labels)
        with self._lock:
            self._touch()
            self._check_partner(step)
            return self.trainer.evaluate(iv, labels, reset)

    def predict(self, iv: np.ndarray, step: int | None = None) -> np.ndarray:
        self._check_iv(iv)
        with self._lock:
            self._touch()
            self._check_partner(step)
            return self.trainer.predict(iv)

    # -- unloading -----------------------------------------------------------------------------------------

    def unload(self, reason: SplitError, save: bool = True) -> bool:
        """Refuse every later request with `reason`, after the request in flight; apply the pending update and,
        with checkpoints and `save`, save the current step. True if a checkpoint of it exists now."""
        with self._lock:
            self._gone = reason
            self.trainer.settle()
            if self.checkpoints is None:
                return False
            # A U-shaped forward in flight changed the middle's statistics: the state is no step's to save.
            if save and self._in_flight is None:
                self.checkpoints.save(self.next_step, self._residual)
            return self.next_step in self.checkpoints.steps()

    def claim_idle(self, reason: SplitError) -> bool:
        """Refuse every later request with `reason` if no training stream is open, atomically with `stream`
        (a stream cannot open in between); whether it was claimed. `unload` must follow a claim."""
        with self._lock:
            if self._streams or self._gone is not None:
                return False
            self._gone = reason
            return True

    def reload(self) -> None:
        """Accept requests again (a server stopped and started anew in the same process)."""
        with self._lock:
            self._gone = None

    @property
    def unloaded(self) -> bool:
        return self._gone is not None

    # -- checks ------------------------------------------------------------------------------------------

    def _touch(self) -> None:
        self._check_live()
        self.last_used = time.monotonic()

    def _check_live(self) -> None:
        if self._gone is not None:
            raise self._gone

    def _check_order(self, step: int) -> None:
        if step != self.next_step:
            raise PreconditionFailed(
                f"step {step} is out of order: the server expects step {self.next_step}"
                + (" (a gap: steps were skipped)" if step > self.next_step else " (already applied)")
            )

    def _check_partner(self, step: int | None) -> None:
        """A client that trains in the session names its step: the parts must be at the same one to be one model."""
        if step is None or step == self.next_step:
            return
        if step == self._cache.step:
            raise PreconditionFailed(
                f"the client is at step {step}, which this server applied but whose reply the client did not get: "
                "finish the step (fit resends it) before evaluating or predicting"
            )
        raise StepMismatch(
            f"the client is at step {step} but the server's part is at step {self.next_step}, so together they are "
            "no trained model (a side restarted from an older checkpoint?): handshake again to agree on a step"
        )

    def _sent_gradient(self, grad: np.ndarray) -> np.ndarray:
        """The gradient as the reply carries it: sparsified with top-k."""
        return self._feedback(grad) if self._feedback is not None else grad

    @property
    def _residual(self) -> np.ndarray | None:
        """Top-k's residual: what the gradients of the steps applied so far left out (checkpointed with each
        step; a pipelined step in progress has not happened yet)."""
        if self._micro.next:
            return self._micro.residual
        return self._feedback.residual if self._feedback is not None else self._carried

    def _restore_residual(self, residual: np.ndarray | None) -> None:
        if self._feedback is not None:
            self._feedback = ErrorFeedback(self._feedback.fraction, residual)
        else:
            self._carried = residual

    def _after_step(self) -> None:
        self.steps_applied += 1
        if self.checkpoints is not None:
            self.checkpoints.after_step(self.next_step, self._residual)

    def _count_resent(self, step: int, answers: str) -> None:
        log.info("step %d sent again: %s answered from the first replies, no second update", step, answers)
        self.resent += 1

    def _discard_micro(self) -> None:
        """Drop the partial gradients of a pipelined step that will not be finished, and what its micro-batches'
        gradients left out of top-k's residual (it goes back to the one from before the step)."""
        if self._micro.next and self.mode is CutMode.STANDARD:
            self._standard().discard_micro()
            self._restore_residual(self._micro.residual)
        self._micro = _MicroStep()

    def _standard(self) -> LossTrainer:
        if self.mode is not CutMode.STANDARD:
            raise PreconditionFailed(NOT_STANDARD)
        return cast(LossTrainer, self.trainer)

    def _middle(self) -> MiddleTrainer:
        if self.mode is not CutMode.USHAPE:
            raise PreconditionFailed(
                "this server holds the top of a standard cut: send iv with labels, not a U-shaped step"
            )
        return cast(MiddleTrainer, self.trainer)

    def _check_iv(self, iv: np.ndarray) -> int:
        batch = self.trainer.contract.iv.check_batch(iv, "iv")
        limit = self.limits.max_batch_size
        if batch == 0:
            raise InvalidRequest("iv: the batch is empty; send at least one sample")
        if batch > limit:
            raise TooLarge(f"iv: batch of {batch} samples is over this server's limit of {limit}")
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
