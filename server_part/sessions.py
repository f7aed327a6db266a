"""The registry of a server's sessions: opens, finds, unloads and closes them. No gRPC here.

A handshake that names no session opens a new one, with a second part of its own (server_part/parts.py); one
that names a session joins it, loading it from its checkpoints when it is not in memory (after a restart, an
idle expiry or a close). Requests name their session and are routed to it; each session serialises its own
requests, so sessions train at the same time. Limits: `max_sessions` in memory at once (a session opened or
loaded beyond it evicts an idle one, see `eviction_order`; only when every one is in use is it
RESOURCE_EXHAUSTED), `idle_timeout` seconds without a request (and no training stream open), after which a
session is checkpointed, when checkpoints are on, and dropped from memory, and `unused_timeout`, the same for a
session that a handshake opened new and that has applied no training step (it holds nothing a new session
lacks: a handshake that never trains does not hold a slot for an hour). A session opened for a group's round
keeps no checkpoints: the round is the unit of recovery (docs/multi_client.md), so after a restart its member
trains the round again in a new session, and what outlives the session is its contribution.

What each operation guarantees:
- `open("")` MUST return a new session at step 0 whose part has the initial weights. With `max_sessions` in
  memory it MUST first make room: drop the sessions its group member left behind, else evict the first session
  of `eviction_order` (unloaded as by idle expiry: checkpointed first when checkpoints are on). Only when no
  session is idle (each has a training stream open, or is being opened) MUST it raise TooManySessions, saying so.
- `open(id)` MUST return the session in memory, else the one its checkpoints hold (at its latest step), making
  room as `open("")` does, else raise SessionNotFound; a malformed id MUST raise InvalidRequest before it
  reaches a path.
- `get(id)` MUST return the session in memory; a session that is not in memory but has checkpoints MUST raise
  SessionUnloaded (ABORTED: handshake again to resume it), any other SessionNotFound.
- `close(id)` and idle expiry MUST settle the session's last update and save its step (with checkpoints)
  before it leaves memory; requests still holding it get SessionUnloaded or SessionNotFound.
- Idle expiry, unused expiry and eviction MUST never unload a session with a training stream open, nor one whose
  stream opens meanwhile (the check and the unloading are one step under the session's lock).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from server_part.checkpoints import SessionStore
from server_part.contributions import Contributions
from server_part.parts import PartFactory, Trainer
from server_part.session import Limits, Session
from splitlearning import encodings, part_state
from splitlearning.approximations import Approximations, check_allowed
from splitlearning.contract import CutMode, Spec
from splitlearning.errors import (
    CutMismatch,
    InvalidRequest,
    PreconditionFailed,
    SessionNotFound,
    SessionUnloaded,
    ShuttingDown,
    SplitError,
    TooManySessions,
)
from splitlearning.groups import Membership
from splitlearning.optimizers import OptimizerSettings
from splitlearning.part_state import PartState
from splitlearning.protocol import ID_PATTERN, MAX_ID_LENGTH, PROTOCOL_VERSION
from splitlearning.text import clip

log = logging.getLogger(__name__)

# Contributing closes remembered for a resend (ids are at most 128 characters).
_CONTRIBUTED_KEPT = 1024


@dataclass(frozen=True)
class Closed:
    """What CloseSession answers: the session's final step, and whether a checkpoint of it is kept."""

    steps: int
    checkpointed: bool


class SessionRegistry:
    """The sessions of one server, by id."""

    def __init__(
        self,
        parts: PartFactory,
        template: Trainer,
        limits: Limits,
        store: SessionStore | None = None,
        max_sessions: int = 16,
        idle_timeout: float = 3600.0,
        on_close: Callable[[Session], None] | None = None,
        contributions: Contributions | None = None,
        unused_timeout: float = 60.0,
    ) -> None:
        if max_sessions < 1:
            raise ValueError(f"max_sessions must be at least 1, got {max_sessions}")
        if idle_timeout < 0:
            raise ValueError(f"idle_timeout must be >= 0 seconds (0: never), got {idle_timeout:g}")
        if unused_timeout < 0:
            raise ValueError(f"unused_timeout must be >= 0 seconds (0: never), got {unused_timeout:g}")
        self._parts = parts
        self.template = template  # the first part built: what every session's part looks like
        self.optimizer = OptimizerSettings.of(template.optimizer)  # every session's part trains with its copy
        self.limits = limits
        self.store = store
        self.max_sessions = max_sessions
        self.idle_timeout = idle_timeout
        self.unused_timeout = unused_timeout
        self._on_close = on_close
        self.contributions = contributions if contributions is not None else Contributions()
        self._sessions: dict[str, Session] = {}
        # Group sessions closed with a contribution: id -> (samples, the reply), so a resent close is answered again.
        self._contributed: OrderedDict[str, tuple[int, Closed]] = OrderedDict()
        self._opening = 0  # sessions being built or loaded now, counted against the limit
        self._lock = threading.Lock()  # guards the dict and the count, never held while a part is built
        self._load_lock = threading.Lock()  # one load from checkpoints at a time (so one session, one copy)
        self._stopping = False
        self._compute_of_closed = 0.0
        self._reaper: threading.Thread | None = None
        self._reaper_stop = threading.Event()
        self.first: Session | None = None  # the session that took the server's own model object

    @property
    def mode(self) -> CutMode:
        return self.template.mode

    @property
    def compute_seconds(self) -> float:
        """Time spent inside the trainers answering steps, all sessions together (read by the telemetry)."""
        with self._lock:
            live = list(self._sessions.values())
            closed = self._compute_of_closed
        return closed + sum(session.compute_seconds for session in live)

    def sessions(self) -> list[Session]:
        with self._lock:
            return list(self._sessions.values())

    def find(self, session_id: str) -> Session | None:
        """The session in memory by that id, or None (no check, no load: for the server's own readers)."""
        with self._lock:
            return self._sessions.get(session_id)

    # -- the handshake ---------------------------------------------------------------------------------------

    def check_offer(
        self,
        protocol_version: int,
        iv: Spec,
        label: Spec | None,
        max_batch_size: int,
        mode: CutMode,
        optimizer: OptimizerSettings | None = None,
    ) -> None:
        """Refuse a handshake whose client cannot train with this server's part (before any session is touched):
        another protocol, cut, label, a batch over the limit, or another optimizer (when the client states it)."""
        expected = self.template.contract
        check_version(protocol_version)
        if mode is not self.mode:
            raise PreconditionFailed(
                f"cut mode mismatch: this server holds {self.mode.describe()}, but the client is built for "
                f"{mode.describe()}; start both parts with the same --cut"
            )
        if iv != expected.iv:
            raise CutMismatch(f"cut mismatch: the server part expects iv {expected.iv}, the client sends {iv}")
        if label is not None and label != expected.label:
            raise PreconditionFailed(
                f"label mismatch: the server part expects label {expected.label}, the client sends {label}"
            )
        if max_batch_size > self.limits.max_batch_size:
            raise PreconditionFailed(
                f"batch size {max_batch_size} is over this server's limit of {self.limits.max_batch_size} samples"
            )
        differences = optimizer.differences(self.optimizer) if optimizer is not None else []
        if differences:
            raise PreconditionFailed(
                f"optimizer mismatch: {'; '.join(differences)}; start both processes with the same --optimizer and "
                "--learning-rate (the split trains the uncut model only when both parts' optimizers agree)"
            )

    def check_approximations(self, asked: Approximations) -> None:
        """Refuse approximations this server does not allow (FAILED_PRECONDITION, naming them)."""
        check_allowed(asked, self.limits.approximations, self.mode is CutMode.STANDARD)

    def negotiate(self, preferred: Sequence[int]) -> encodings.EncodingCode:
        """The wire encoding of the IV and its gradient: the U-shape's exchanges stay raw."""
        allowed = self.limits.wire_encodings if self.mode is CutMode.STANDARD else (encodings.RAW,)
        return encodings.negotiate(preferred, allowed)

    # -- finding and opening ---------------------------------------------------------------------------------

    def open(self, session_id: str, membership: Membership | None = None) -> Session:
        """The session a handshake names: a new one for "" (for `membership`'s group round, starting where it
        says), else that one (loaded from checkpoints if need be; `membership` is not read)."""
        if not session_id:
            start = None
            if membership is not None:
                start = self.contributions.start_state(membership, PartState(self._parts.initial))
            opened = self._admit(uuid.uuid4().hex, load=False, membership=membership, start=start)
            if membership is not None:  # only now: a refused handshake changes nothing
                self.contributions.opened(membership, start)
                self._drop_superseded(membership, opened)
            return opened
        _check_id(session_id)
        with self._lock:
            self._check_running()
            session = self._sessions.get(session_id)
        if session is not None and not session.unloaded:
            return session
        if self.store is None or not self.store.holds(session_id):
            raise SessionNotFound(_unknown(session_id, self.store is not None))
        with self._load_lock:
            with self._lock:  # loaded meanwhile by a handshake that got here first?
                session = self._sessions.get(session_id)
            if session is not None and not session.unloaded:
                return session
            return self._admit(session_id, load=True)

    def _drop_superseded(self, membership: Membership, kept: Session | None = None) -> bool:
        """Drop the sessions a member of a group left behind (a member trains one round at a time, so a new
        session of the same member supersedes them: a killed member's, say); whether there were any."""
        left = [
            session
            for session in self.sessions()
            if session is not kept
            and session.membership is not None
            and (session.membership.group, session.membership.member) == (membership.group, membership.member)
        ]
        for session in left:
            self._drop(session, f"superseded by a new session of member {membership.member} of {membership.group}")
        return bool(left)

    def get(self, session_id: str) -> Session:
        """The session a request (other than a handshake) names."""
        if not session_id:
            raise InvalidRequest("session_id is required: send the one the handshake returned")
        _check_id(session_id)
        with self._lock:
            self._check_running()
            session = self._sessions.get(session_id)
        if session is not None:
            return session
        if self.store is not None and self.store.holds(session_id):
            raise SessionUnloaded(
                f"session {session_id} is not loaded (it was closed, expired idle or unused, evicted from a full "
                "server, or the server restarted): handshake again naming it to resume it from its checkpoints"
            )
        raise SessionNotFound(_unknown(session_id, self.store is not None))

    def _admit(
        self, session_id: str, load: bool, membership: Membership | None = None, start: PartState | None = None
    ) -> Session:
        self._reserve(membership)
        try:
            session = self._build(session_id, load, membership, start)
        finally:
            with self._lock:
                self._opening -= 1
        with self._lock:
            self._sessions[session_id] = session
            if self.first is None and session.trainer is self.template:
                self.first = session
        log.info(
            "%s session %s at step %d%s (%d in memory)",
            "resumed" if load else "opened",
            session_id,
            session.next_step,
            f" for {membership}" if membership is not None else "",
            len(self._sessions),
        )
        return session

    def _reserve(self, membership: Membership | None) -> None:
        """Count a session being opened against `max_sessions`, making room when the server is full: first by
        dropping the sessions `membership`'s member left behind, else by evicting an idle session."""
        for _ in range(self.max_sessions + 1):  # each pass frees a slot, unless another handshake takes it first
            with self._lock:
                self._check_running()
                if len(self._sessions) + self._opening < self.max_sessions:
                    self._opening += 1
                    return
                opening = self._opening
            if membership is not None and self._drop_superseded(membership):
                continue
            if not self._evict_one():
                break
        in_use = sum(1 for session in self.sessions() if session.in_use)
        raise TooManySessions(
            f"this server holds its limit of {self.max_sessions} sessions and none is idle to evict for a new one "
            f"({in_use} with a training stream open, {opening} being opened): retry when a run ends, or raise "
            "--max-sessions"
        )

    def eviction_order(self, now: float) -> list[Session]:
        """The idle sessions (no training stream open), in the order a full server evicts them: first those that
        trained nothing (`Session.unused`), then those its checkpoints keep, last those whose training would be
        lost (no checkpoints: a group round's session, or any on a server without --checkpoint-dir); the least
        recently used first within each."""
        idle = [session for session in self.sessions() if session.idle_seconds(now) is not None]
        return sorted(idle, key=lambda session: (_eviction_cost(session), session.last_used))

    def _evict_one(self) -> bool:
        """Unload the first session of `eviction_order` that is still idle; whether one was."""
        why = f"evicted for a new session: the server held its limit of {self.max_sessions}, and this one was idle"
        return any(self._evict(session, why) for session in self.eviction_order(time.monotonic()))

    def _evict(self, session: Session, why: str) -> bool:
        """Unload `session` unless a training stream is open in it (checked and claimed at once); whether it was."""
        if not session.claim_idle(_ended(session, why)):
            return False
        self._drop(session, why)
        return True

    def _build(self, session_id: str, load: bool, membership: Membership | None, start: PartState | None) -> Session:
        trainer = self._parts.take()
        if start is not None and membership is not None:
            optimizer = trainer.optimizer if membership.scheme.carries_optimizer else None
            try:
                part_state.apply(start, trainer.model, optimizer)
            except ValueError as error:  # kept by a server with another optimizer (restarted with other flags)
                self._parts.give_back(trainer)
                raise PreconditionFailed(f"{membership}: cannot start from {membership.start[0]}: {error}") from None
        kept = self.store is not None and membership is None  # a group's round is trained again, never resumed
        checkpoints = self.store.open(session_id, trainer) if kept and self.store is not None else None
        if checkpoints is not None:
            latest = checkpoints.latest()
            if load and latest is not None:
                checkpoints.restore(latest)
            elif not load:
                checkpoints.save(trainer.iterations)  # the starting point is a step to resume from too
        return Session(session_id, trainer, self.limits, checkpoints, membership, resumed=load)

    # -- leaving memory --------------------------------------------------------------------------------------

    def close(self, session_id: str, client_id: str, contribute_samples: int = 0) -> Closed:
        """The client is done: settle and save the session, then drop it from memory. A session not in memory
        but with checkpoints is closed already (closing is idempotent). With `contribute_samples`, the session's
        part becomes its member's contribution to its group round (server_part/contributions.py); that close,
        sent again after the session ended (its reply was lost), is answered again."""
        try:
            session = self.get(session_id)
        except SessionUnloaded:
            if contribute_samples:
                raise PreconditionFailed(
                    f"contribute_samples: session {session_id} trains no group round (it is not in memory and has "
                    "checkpoints, which a group round's session never keeps)"
                ) from None
            assert self.store is not None  # only a store's sessions are unloaded rather than gone
            return Closed(self.store.latest(session_id) or 0, True)
        except SessionNotFound:
            with self._lock:
                done = self._contributed.get(session_id)
            if contribute_samples and done is not None and done[0] == contribute_samples:
                return done[1]
            raise
        if session.holder not in (None, client_id) and session.idle_seconds(time.monotonic()) is None:
            raise PreconditionFailed(
                "the session is in use by another client (its training stream is open): only the client "
                "training in it may close it now"
            )
        membership = session.membership
        if contribute_samples and membership is None:
            raise PreconditionFailed(
                f"contribute_samples: session {session_id} trains no group round (its handshake named no group)"
            )

        def contribute(closed: Session) -> None:
            assert membership is not None
            trainer = closed.trainer
            trainer.settle()
            optimizer = trainer.optimizer if membership.scheme.carries_optimizer else None
            self.contributions.put(membership, contribute_samples, part_state.capture(trainer.model, optimizer))
            with self._lock:
                self._contributed[closed.id] = (contribute_samples, Closed(closed.next_step, False))
                while len(self._contributed) > _CONTRIBUTED_KEPT:
                    self._contributed.popitem(last=False)

        saved = self._drop(session, "closed by its client", contribute if contribute_samples else None)
        return Closed(session.next_step, saved)

    def expire_idle(self, now: float | None = None) -> list[str]:
        """Unload the sessions idle for longer than `idle_timeout`, and the unused ones (`Session.unused`) idle
        for longer than `unused_timeout` (0: never, for each); their ids. `now` is on `time.monotonic`'s clock."""
        if not self.idle_timeout and not self.unused_timeout:
            return []
        now = time.monotonic() if now is None else now
        expired = []
        for session in self.sessions():
            idle = session.idle_seconds(now)
            if idle is None:
                continue
            if self.idle_timeout and idle > self.idle_timeout:
                why = f"idle for {idle:.0f} s"
            elif self.unused_timeout and session.unused and idle > self.unused_timeout:
                why = f"unused: no training step applied and no request for {idle:.0f} s"
            else:
                continue
            if self._evict(session, why):
                expired.append(session.id)
        return expired

    def _drop(self, session: Session, why: str, last: Callable[[Session], None] | None = None) -> bool:
        """Unload `session` and forget it; `last` reads it (its part) before its trainer goes back to the
        factory for a later session to reuse. Whether a checkpoint of its last step was saved."""
        # An unused session's step is saved already (a new session saves its starting point): nothing to add.
        saved = session.unload(_ended(session, why), save=not session.unused)
        with self._lock:
            removed = self._sessions.get(session.id) is session
            if removed:
                del self._sessions[session.id]
                self._compute_of_closed += session.compute_seconds
        if not removed:  # dropped at the same time by another call (a close, an expiry), which does the rest
            if last is not None:
                raise SessionNotFound(f"session {session.id} ended meanwhile ({why} raced another end of it)")
            return saved
        log.info(
            "session %s %s at step %d%s; %d in memory",
            session.id,
            why,
            session.next_step,
            ", checkpointed" if saved else "",
            len(self._sessions),
        )
        try:
            if self._on_close is not None:
                self._on_close(session)
            if last is not None:
                last(session)
        finally:
            self._parts.give_back(session.trainer)
        return saved

    # -- the server's life -----------------------------------------------------------------------------------

    def start(self) -> None:
        """Accept requests (again) and expire idle sessions in the background."""
        with self._lock:
            self._stopping = False
            sessions = list(self._sessions.values())
        for session in sessions:
            session.reload()
        if (self.idle_timeout or self.unused_timeout) and self._reaper is None:
            self._reaper_stop.clear()
            self._reaper = threading.Thread(target=self._reap, name="split-session-reaper", daemon=True)
            self._reaper.start()

    def stop(self) -> None:
        """Refuse further requests (UNAVAILABLE: clients retry), after those in flight; save every session."""
        self._reaper_stop.set()
        if self._reaper is not None:
            self._reaper.join()
            self._reaper = None
        with self._lock:
            self._stopping = True
            sessions = list(self._sessions.values())
        for session in sessions:
            session.unload(ShuttingDown("the server is shutting down; retry when it is back"))

    def _reap(self) -> None:
        shortest = min(timeout for timeout in (self.idle_timeout, self.unused_timeout) if timeout)
        interval = min(1.0, max(0.05, shortest / 4))
        while not self._reaper_stop.wait(interval):
            try:
                self.expire_idle()
            except Exception:  # a failed save must not end expiry for every other session
                log.exception("expiring idle sessions failed")

    def check_running(self) -> None:
        """ShuttingDown (UNAVAILABLE) once the server is stopping."""
        self._check_running()

    def _check_running(self) -> None:
        if self._stopping:
            raise ShuttingDown("the server is shutting down; retry when it is back")


def check_version(protocol_version: int) -> None:
    if protocol_version != PROTOCOL_VERSION:
        raise PreconditionFailed(f"protocol version {protocol_version} is not spoken here: expected {PROTOCOL_VERSION}")


def _check_id(session_id: str) -> None:
    if not ID_PATTERN.fullmatch(session_id):
        raise InvalidRequest(
            f"session_id: expected 1 to {MAX_ID_LENGTH} letters, digits, '-' or '_' (the id a handshake "
            f"returned), got '{clip(session_id, 40)}'"
        )


def _ended(session: Session, why: str) -> SplitError:
    """What the requests of a session that left memory get: ABORTED to resume it, with checkpoints; else NOT_FOUND."""
    if session.checkpoints is not None:
        return SessionUnloaded(
            f"session {session.id} was unloaded ({why}): handshake again naming it to resume it from its checkpoints"
        )
    return SessionNotFound(
        f"session {session.id} has ended ({why}) and this server keeps no checkpoints, so its state is gone: open a "
        "new session (a handshake naming none)"
    )


def _eviction_cost(session: Session) -> int:
    """0: it trained nothing; 1: its checkpoints keep it (saved as it leaves); 2: its training would be lost."""
    if session.unused:
        return 0
    return 1 if session.checkpoints is not None else 2


def _unknown(session_id: str, checkpoints: bool) -> str:
    where = "in memory or in its checkpoints" if checkpoints else "(it keeps no checkpoints)"
    return (
        f"unknown session {session_id!r}: this server holds no such session {where}; it may have been closed, "
        "expired (idle, or unused since its handshake), evicted from a full server, or lost in a restart: open a new "
        "session (a handshake naming none)"
    )
