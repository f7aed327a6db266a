"""Members' parts at the end of their rounds, kept for the rounds that start from them. No gRPC here.

A session opened for a group's round (`HandshakeRequest.group`) starts from `start`: nothing (the initial
weights), the named contributions' weights combined by the server's rule (SplitFed, fresh optimizer: the
sample-weighted average by default, splitlearning/aggregation.py), or the one named contribution's weights and
optimizer state (round-robin). A SplitFed session whose membership states another rule (the aggregator's) is
refused. The norm-bounded rule clips each contribution's update, its weights less its round's start, so the
server keeps each round's start too (`start-<r>.npz` beside the contributions; round 0's is the initial part).
A session closed with `contribute_samples` leaves its part here as that member's contribution to that round. With
`root` (under `--checkpoint-dir`) each contribution is also written to `root/<group>/round-<r>-member-<k>.npz`,
so a restarted server still holds them. Once a session is open, the contributions of rounds before the earliest
one its start names are forgotten (a refused handshake forgets nothing).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from splitlearning import part_state
from splitlearning.aggregation import FEDAVG, Aggregation
from splitlearning.errors import PreconditionFailed
from splitlearning.groups import Contribution, Membership, Scheme
from splitlearning.part_state import PartState

log = logging.getLogger(__name__)


class Contributions:
    def __init__(self, root: Path | None = None, aggregation: Aggregation = FEDAVG) -> None:
        self.root = root
        self.aggregation = aggregation
        self._held: dict[tuple[str, int, int], tuple[PartState, int]] = {}
        self._starts: dict[tuple[str, int], PartState] = {}  # norm-bounded: each round's start, by (group, round)
        self._lock = threading.Lock()

    def put(self, membership: Membership, samples: int, state: PartState) -> None:
        key = (membership.group, membership.round, membership.member)
        if self.root is not None:
            folder = self.root / membership.group
            folder.mkdir(parents=True, exist_ok=True)
            part_state.save(self._path(*key), state, samples=samples)
        with self._lock:
            self._held[key] = (state, samples)
        log.info("kept the part of member %d for %s round %d (%d samples)", key[2], key[0], key[1], samples)

    def start_state(self, membership: Membership, like: PartState) -> PartState | None:
        """The part a session of `membership` starts from (None: the initial weights), checked against `like`.
        Changes nothing: once the session is open, `opened` forgets what its start has made stale."""
        if membership.scheme is Scheme.SPLITFED and membership.aggregation != self.aggregation:
            raise PreconditionFailed(
                f"aggregation mismatch: group {membership.group}'s aggregator combines first parts by "
                f"{membership.aggregation}, this server combines second parts by {self.aggregation}; start "
                f"split-server and split-aggregator with the same flags ({self.aggregation.flags()} here, "
                f"{membership.aggregation.flags()} there)"
            )
        if not membership.start:
            return None
        states = [self._get(membership.group, c) for c in membership.start]
        for state, contribution in zip(states, membership.start, strict=True):
            state.check_like(like, f"the contribution of {contribution}")
        if membership.scheme is Scheme.ROUND_ROBIN:
            if not states[0].optimizer:
                raise PreconditionFailed(
                    f"group {membership.group}: {membership.start[0]} holds no optimizer state (it was made in a "
                    "SplitFed round); a round-robin turn starts from a round-robin turn"
                )
            return states[0]
        samples = [c.samples for c in membership.start]
        if not self.aggregation.needs_start:
            return self.aggregation.combine(states, samples)
        rounds = {c.round for c in membership.start}
        if len(rounds) != 1:
            raise PreconditionFailed(
                f"group {membership.group}: {self.aggregation} clips updates from one round's start, but the start "
                f"names contributions to rounds {sorted(rounds)}"
            )
        return self.aggregation.combine(states, samples, self._round_start(membership.group, rounds.pop(), like))

    def opened(self, membership: Membership, start: PartState | None = None) -> None:
        """A session of `membership` is open (from `start`, None: the initial part): forget the contributions of
        rounds before the earliest one its start names (no later round starts from them); norm-bounded: keep
        `start` as its round's start."""
        if self.aggregation.needs_start and membership.scheme is Scheme.SPLITFED and start is not None:
            key = (membership.group, membership.round)
            with self._lock:
                known = key in self._starts
                self._starts[key] = start
            if self.root is not None and not known:
                (self.root / membership.group).mkdir(parents=True, exist_ok=True)
                part_state.save(self._start_path(*key), start)
        if membership.start:
            self._forget_before(membership.group, min(c.round for c in membership.start))

    def _round_start(self, group: str, round_: int, initial: PartState) -> PartState:
        """The part round `round_`'s sessions started from: the initial part for round 0, else the one kept when
        the round's first session opened."""
        if round_ == 0:
            return initial
        key = (group, round_)
        with self._lock:
            start = self._starts.get(key)
        if start is None and self.root is not None and self._start_path(*key).is_file():
            start, _ = part_state.load(self._start_path(*key))
            with self._lock:
                self._starts[key] = start
        if start is None:
            raise PreconditionFailed(
                f"group {group}: this server holds no start of round {round_}, from which {self.aggregation} "
                "measures the members' updates (lost in a restart without --checkpoint-dir)"
            )
        return start

    def _get(self, group: str, contribution: Contribution) -> PartState:
        key = (group, contribution.round, contribution.member)
        with self._lock:
            held = self._held.get(key)
        if held is None and self.root is not None and self._path(*key).is_file():
            state, extra = part_state.load(self._path(*key))
            held = (state, extra.get("samples", 0))
            with self._lock:
                self._held[key] = held
        if held is None:
            where = "" if self.root is not None else " (it keeps no checkpoints: a restart loses contributions)"
            raise PreconditionFailed(
                f"group {group}: this server holds no part of {contribution}{where}, which the aggregator counted "
                "in that round; the group cannot go on from it (start the group again, and keep contributions "
                "with split-server --checkpoint-dir)"
            )
        state, samples = held
        if samples != contribution.samples:
            raise PreconditionFailed(
                f"group {group}: {contribution} does not match the part this server kept for it, contributed with "
                f"{samples} samples"
            )
        return state

    def _forget_before(self, group: str, round_: int) -> None:
        with self._lock:
            stale = [key for key in self._held if key[0] == group and key[1] < round_]
            for key in stale:
                del self._held[key]
            for start in [key for key in self._starts if key[0] == group and key[1] < round_]:
                del self._starts[start]
        if self.root is not None:
            for path in (self.root / group).glob("round-*-member-*.npz"):
                if int(path.name.split("-")[1]) < round_:
                    path.unlink(missing_ok=True)
            for path in (self.root / group).glob("start-*.npz"):
                if int(path.name.split("-")[1].removesuffix(".npz")) < round_:
                    path.unlink(missing_ok=True)

    def _start_path(self, group: str, round_: int) -> Path:
        assert self.root is not None
        return self.root / group / f"start-{round_}.npz"

    def _path(self, group: str, round_: int, member: int) -> Path:
        assert self.root is not None
        return self.root / group / f"round-{round_}-member-{member}.npz"
