"""Members' parts at the end of their rounds, kept for the rounds that start from them. No gRPC here.

A session opened for a group's round (`HandshakeRequest.group`) starts from `start`: nothing (the initial
weights), the sample-weighted average of the named contributions' weights (SplitFed, fresh optimizer), or the one
named contribution's weights and optimizer state (round-robin). A session closed with `contribute_samples`
leaves its part here as that member's contribution to that round. With `root` (under `--checkpoint-dir`) each
contribution is also written to `root/<group>/round-<r>-member-<k>.npz`, so a restarted server still holds
them. Once a session is open, the contributions of rounds before the earliest one its start names are forgotten
(a refused handshake forgets nothing).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from splitlearning import part_state
from splitlearning.errors import PreconditionFailed
from splitlearning.groups import Contribution, Membership, Scheme
from splitlearning.part_state import PartState

log = logging.getLogger(__name__)


class Contributions:
    def __init__(self, root: Path | None = None) -> None:
        self.root = root
        self._held: dict[tuple[str, int, int], tuple[PartState, int]] = {}
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
        return part_state.average(states, [c.samples for c in membership.start])

    def opened(self, membership: Membership) -> None:
        """A session of `membership` is open: forget the contributions of rounds before the earliest one its
        start names (no later round starts from them)."""
        if membership.start:
            self._forget_before(membership.group, min(c.round for c in membership.start))

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
        if self.root is not None:
            for path in (self.root / group).glob("round-*-member-*.npz"):
                if int(path.name.split("-")[1]) < round_:
                    path.unlink(missing_ok=True)

    def _path(self, group: str, round_: int, member: int) -> Path:
        assert self.root is not None
        return self.root / group / f"round-{round_}-member-{member}.npz"
