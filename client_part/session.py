"""This client's session with the server: joining it, rejoining after a failure, keeping both parts one model.

`Session` holds the session's facts once: its id, the agreed wire encoding and the epoch (in the transport's
`Joined` record, which every request reads), the agreement of the last handshake, and this client's id. It joins
(`connect`), rejoins before the next attempt after a retryable failure (`rejoin_if_stale`), restores this
client's checkpoint of the step the server resumed at (`after_rollbacks`, `restore`), and ends the session.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol, TypeVar

from client_part import retry
from client_part.checkpoints import ClientCheckpoints
from client_part.position import Position
from client_part.retry import RetryPolicy
from client_part.transport import RemoteError, Transport
from splitlearning import codec, encodings
from splitlearning.approximations import NONE, Approximations
from splitlearning.contract import Agreement, CutContract, CutMode, Spec
from splitlearning.groups import Membership
from splitlearning.optimizers import OptimizerSettings

log = logging.getLogger("client_part.client")  # the client's log lines, under one logger name as before

T = TypeVar("T")


class Rollback(RuntimeError):
    """The server resumed at an earlier step than this client's (it restarted from an older checkpoint)."""

    def __init__(self, step: int, current: int) -> None:
        self.step = step
        super().__init__(f"the server resumed at step {step}, behind this client's step {current}")


class Head(Protocol):
    """The U-shape's head as the handshake checks it against the server's middle (a `LossTrainer` is one)."""

    @property
    def contract(self) -> CutContract: ...

    @property
    def label_spec(self) -> Spec: ...

    @property
    def metric_names(self) -> list[str]: ...


@dataclass(frozen=True)
class Offer:
    """What this client brings to every handshake: its cut, its label (None: the U-shape's server sees none), its
    largest batch, the cut mode, the wire encoding it asks for, and the U-shape's head (None: a standard cut)."""

    iv: Spec
    label: Spec | None
    max_batch_size: int
    mode: CutMode
    wire_encoding: codec.EncodingCode
    head: Head | None = None
    optimizer: OptimizerSettings | None = None  # its first part's: the server checks that it trains with the same
    approximations: Approximations = NONE  # beyond the exact split: the server must allow each one


class Session:
    """The session this client trains in, over `transport`; `position` is where training stands.

    `session_id` names the session to join ("" for a new one); with `checkpoints`, the one recorded there when
    none is given, and this client's id is the one recorded there. `forget` drops the record of the step in
    flight (the U-shape's head keeps one) when step numbers go back.
    """

    def __init__(
        self,
        transport: Transport,
        offer: Offer,
        position: Position,
        policy: RetryPolicy,
        stop: threading.Event,
        connect_timeout: float,
        session_id: str = "",
        client_id: str = "",
        checkpoints: ClientCheckpoints | None = None,
        forget: Callable[[], None] = lambda: None,
    ) -> None:
        self.offer = offer
        self.checkpoints = checkpoints
        self._transport = transport
        self._joined = transport.joined  # the session's id, encoding and epoch: held there, once
        self._position = position
        self._policy = policy
        self._stop = stop
        self._connect_timeout = connect_timeout
        self._forget = forget
        self._client_id = client_id or uuid.uuid4().hex
        if checkpoints is not None:
            recorded_session, self._client_id = checkpoints.identity()
            session_id = session_id or recorded_session
        self._joined.session_id = session_id
        self._membership: Membership | None = None  # the group round the next new session trains
        self._agreement: Agreement | None = None
        self._in_step = False  # True once this connection has checked that both sides agree on the step
        self._stale = False  # a call failed: rejoin (handshake again) before the next attempt
        self._rolling_back = False  # a call that handles `Rollback` runs (fit's validation leaves it to fit)

    @property
    def session_id(self) -> str:
        """The session to join, or joined ("" before the server opened one)."""
        return self._joined.session_id

    @property
    def agreement(self) -> Agreement:
        """What the last handshake settled; a `RuntimeError` before `connect` (it does no I/O itself)."""
        if self._agreement is None:
            raise RuntimeError(
                "not connected to the server: call connect() first (fit, evaluate and predict connect on first use)"
            )
        return self._agreement

    def start_epoch(self, epoch: int) -> None:
        """`fit` begins `epoch` (from 0): its first step restarts the server's running metrics and names it, so
        the server numbers its epochs as this client does."""
        self._joined.epoch = epoch
        self._position.reset_metrics = True

    def connect(self) -> Agreement:
        """Wait for the server (bounded by `connect_timeout`) and agree on the cut; idempotent."""
        if self._agreement is not None:
            return self._agreement
        transport = self._transport
        if not transport.was_ready:
            log.info("waiting up to %g s for the server at %s", self._connect_timeout, transport.target)
        transport.wait_ready(self._connect_timeout, self._stop.is_set)
        agreement = retry.call(self._policy, "handshake", lambda _: self._handshake(), stop=self._stop.is_set)
        self._agreement = agreement
        wanted = self.offer.wire_encoding
        if agreement.encoding != wanted:
            log.warning(
                "asked for wire encoding %s, the server chose %s (start it with --wire-encodings %s to allow it)",
                encodings.name(wanted),
                encodings.name(agreement.encoding),
                encodings.name(wanted),
            )
        log.info(
            "joined session %s at step %d; cut: %s; wire encoding %s",
            agreement.session_id,
            agreement.next_step,
            agreement.contract,
            encodings.name(agreement.encoding),
        )
        step = self._position.step
        if agreement.next_step != step and self.can_restore(agreement.next_step):
            self.restore(agreement.next_step)
        self._in_step = agreement.next_step == self._position.step
        return agreement

    def agree_on_step(self) -> None:
        """Before training: both sides must be at the same step (checked once per connection)."""
        agreement, step = self.agreement, self._position.step
        if not self._in_step and agreement.next_step != step:
            raise RuntimeError(
                f"the server's session is at step {agreement.next_step} but this client is at step {step}: "
                "restore the client from the matching checkpoint, or train in a new session (name none)"
            )
        self._in_step = True

    def partner_step(self) -> int | None:
        """This client's step, for the server to check that both parts are at it, once the two have agreed on
        a step on this connection (a client that only brings weights for inference sends none). It stays sent
        after a failed rejoin, so the server keeps refusing a pair that is no longer one model."""
        return self._position.step if self._in_step else None

    def end(self, contribute_samples: int = 0) -> None:
        """Close the session on the server (see `SplitClient.end_session`); nothing when not connected."""
        if self._agreement is None:
            return
        step = self._position.step
        if self.checkpoints is not None:
            self.checkpoints.save(step, self._position.epoch0_step)
        close = self._transport.close_session
        _, checkpointed = retry.call(
            self._policy,
            "closing the session",
            lambda _: close(self._client_id, contribute_samples),
            stop=self._stop.is_set,
        )
        log.info(
            "ended session %s at step %d%s",
            self.session_id,
            step,
            " (the server kept a checkpoint of it)" if checkpointed else "",
        )
        self._agreement = None

    def leave(self, membership: Membership) -> None:
        """Leave the current session without closing it: the next `connect` opens a new one for `membership`'s
        group round."""
        self._transport.end_stream()  # the last round's session, finished or abandoned
        self._agreement = None
        self._joined.session_id = ""
        self._membership = membership
        self._in_step = self._stale = False

    def start_at(self, step: int) -> None:
        """Step numbers start over at `step` (a new group round): nothing in flight, epoch 0 begins here."""
        self._forget()
        position = self._position
        position.step = position.epoch0_step = step
        position.resume = False
        position.reset_metrics = True

    # -- faults: rejoin, roll back, restore ----------------------------------------------------------------

    def guarded(self, call: Callable[..., T], *args: Any) -> T:
        """Run one RPC; after a retryable failure the next attempt rejoins the session first."""
        try:
            return call(*args)
        except (RemoteError, ConnectionError) as error:
            if retry.is_retryable(error):
                self._stale = True
            raise

    def rejoin_if_stale(self, step: int) -> None:
        """After a failure the server may have restarted: handshake again and agree on the step."""
        if not self._stale:
            return
        agreement = self.guarded(self._handshake)
        self._stale = False
        self._agreement = agreement
        if agreement.next_step < step and self.can_restore(agreement.next_step):
            raise Rollback(agreement.next_step, step)
        if agreement.next_step != step:
            raise RuntimeError(
                f"after reconnecting, the server's session is at step {agreement.next_step} but this client is at "
                f"step {step}, and neither side holds a checkpoint of the other's step"
            )

    def rejoin_window(self, oldest: int, step: int) -> int:
        """A local loss's rejoin after a failure, with steps `oldest` to `step` - 1 sent and unanswered (this
        client is at `step`): handshake again offering each of them, and return the server's next step N, in
        [`oldest`, `step`]: the steps before N were applied there (their lost replies carried metrics only), the
        rest are to be sent again. A server behind `oldest` rolled back (`Rollback` where this client holds a
        checkpoint of its step, else a `RuntimeError`)."""
        agreement = self.guarded(self._handshake, range(oldest, step + 1))
        self._stale = False
        self._agreement = agreement
        next_step = agreement.next_step
        if next_step < oldest and self.can_restore(next_step):
            raise Rollback(next_step, step)
        if not oldest <= next_step <= step:
            raise RuntimeError(
                f"after reconnecting, the server's session is at step {next_step} but this client has sent steps "
                f"{oldest} to {step - 1} unanswered, and neither side holds a checkpoint of the other's step"
            )
        return next_step

    def after_rollbacks(self, run: Callable[[], T]) -> T:
        """`run()`, again from the top each time the server turns out to have resumed at an earlier step than
        this client's (`Rollback`: it restarted from an older checkpoint), after restoring this client's
        checkpoint of that step, so both parts are one model again. Steps after it are lost on both sides;
        `fit` trains them again. Nested calls (`fit`'s validation) leave it to the outermost."""
        if self._rolling_back:
            return run()
        self._rolling_back = True
        try:
            while True:
                try:
                    return run()
                except Rollback as rollback:
                    log.warning("%s: restoring this client's checkpoint of step %d", rollback, rollback.step)
                    self.restore(rollback.step)
        finally:
            self._rolling_back = False

    def restore_latest(self) -> None:
        """At start, with checkpoints: restore the latest (the next `fit` resumes from its data position), or save
        the untrained start as the first."""
        assert self.checkpoints is not None
        latest = self.checkpoints.latest()
        if latest is None:
            self.checkpoints.save(self._position.step, self._position.epoch0_step)
        else:
            self.restore(latest)
            self._position.resume = True

    def can_restore(self, step: int) -> bool:
        return self.checkpoints is not None and step in self.checkpoints.steps()

    def restore(self, step: int) -> None:
        assert self.checkpoints is not None
        position = self._position
        position.epoch0_step = self.checkpoints.restore(step)
        self._forget()
        position.step = step
        position.reset_metrics = True
        log.info("restored this client's checkpoint of step %d", step)

    # -- the handshake -------------------------------------------------------------------------------------

    def _handshake(self, in_flight: Sequence[int] = ()) -> Agreement:
        """`in_flight`: steps sent and unanswered (a local loss's window), offered with this client's step."""
        offer, asked = self.offer, self.session_id
        agreement = self._transport.handshake(
            offer.iv,
            offer.label,
            offer.max_batch_size,
            asked,
            offer.mode,
            () if offer.wire_encoding == encodings.RAW else (offer.wire_encoding,),
            restorable_steps=[
                self._position.step,
                *in_flight,
                *(self.checkpoints.steps() if self.checkpoints else []),
            ],
            client_id=self._client_id,
            group=self._membership if not asked else None,
            optimizer=offer.optimizer,
            approximations=offer.approximations,
        )
        if agreement.session_id != asked and self.checkpoints is not None:  # the transport now names the new one
            self.checkpoints.record(agreement.session_id, self._client_id)
        return agreement if offer.head is None else self._with_head(agreement, offer.head)

    def _with_head(self, agreement: Agreement, head: Head) -> Agreement:
        """The U-shape's agreement as this client uses it: the head's label contract and metric names."""
        if agreement.contract.output != head.contract.iv:
            self._transport.close()
            raise ValueError(
                f"U-shape mismatch: the server's middle outputs {agreement.contract.output}, "
                f"the client's head takes {head.contract.iv}"
            )
        contract = replace(agreement.contract, label=head.label_spec)
        return replace(agreement, contract=contract, metric_names=head.metric_names)
