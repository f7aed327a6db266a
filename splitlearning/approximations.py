"""The approximations beyond the exact split: what a client asks for, what a server allows, and the agreement.

Each one trades the split's equality with the uncut model for speed on a slow link (docs/performance.md,
"Beyond exact"); each is off unless the client asks for it and the server's operator allows it
(`split-server --allow-approximations`). The handshake carries them both ways (`Approximations` in the proto).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from splitlearning.errors import InvalidRequest, PreconditionFailed
from splitlearning.v1 import split_learning_pb2 as pb

STALE_GRADIENTS = "stale-gradients"
LOCAL_LOSS = "local-loss"
TOP_K = "top-k"
NAMES = (STALE_GRADIENTS, LOCAL_LOSS, TOP_K)


@dataclass(frozen=True)
class Approximations:
    """`stale_gradients`: two steps in flight, the client's update one step late; `local_loss`: the client trains
    on an auxiliary head of its own and gets no dLoss/dIV; `top_k`: the fraction of each cut tensor's entries sent,
    with error feedback (0: off)."""

    stale_gradients: bool = False
    local_loss: bool = False
    top_k: float = 0.0

    def __post_init__(self) -> None:
        problem = self.problem()
        if problem:
            raise ValueError(problem)

    def problem(self) -> str:
        """Why these cannot be used together ("" when they can)."""
        if not (self.top_k == 0 or 0 < self.top_k < 1) or not math.isfinite(self.top_k):
            return f"top-k must be a fraction in (0, 1) of each tensor's entries (or 0: off), got {self.top_k}"
        if self.stale_gradients and self.local_loss:
            return (
                "stale gradients and a local loss do not go together: with a local loss the client never waits for "
                "a gradient, so there is none to apply late; choose one"
            )
        return ""

    @property
    def names(self) -> tuple[str, ...]:
        """The flag names of those that are on, in `NAMES` order."""
        on = {STALE_GRADIENTS: self.stale_gradients, LOCAL_LOSS: self.local_loss, TOP_K: bool(self.top_k)}
        return tuple(name for name in NAMES if on[name])

    @property
    def exact(self) -> bool:
        return not self.names

    @property
    def in_flight(self) -> int:
        """The training steps a client may have sent and not had answered: 2 with stale gradients, else 1 (a
        local loss's client keeps a window of its own; the server does not depend on it)."""
        return 2 if self.stale_gradients else 1

    def describe(self) -> str:
        if self.exact:
            return "none (exact)"
        parts = [f"top-k {self.top_k:g}" if name == TOP_K else name for name in self.names]
        return ", ".join(parts)

    def to_proto(self) -> pb.Approximations:
        return pb.Approximations(
            stale_gradients=self.stale_gradients, local_loss=self.local_loss, top_k=float(self.top_k)
        )

    @classmethod
    def from_proto(cls, message: pb.Approximations) -> Approximations:
        """The request's approximations; a malformed combination is INVALID_ARGUMENT. `top_k` travels as float32:
        it is read back to the 7 digits float32 holds, so both ends size k from the value the client was given."""
        top_k = float(f"{float(message.top_k):.7g}")
        try:
            return cls(bool(message.stale_gradients), bool(message.local_loss), top_k)
        except ValueError as error:
            raise InvalidRequest(f"approximations: {error}") from None


NONE = Approximations()


def parse_allowed(names: str | Iterable[str]) -> frozenset[str]:
    """'stale-gradients,top-k' (or a list) -> the names; an unknown name raises ValueError naming the known ones."""
    items = names.split(",") if isinstance(names, str) else list(names)
    allowed: set[str] = set()
    for item in items:
        name = item.strip().lower().replace("_", "-")
        if not name:
            continue
        if name == "all":
            allowed.update(NAMES)
            continue
        if name not in NAMES:
            raise ValueError(f"unknown approximation {item!r}; expected some of {', '.join(NAMES)} (or all)")
        allowed.add(name)
    return frozenset(allowed)


def check_allowed(asked: Approximations, allowed: frozenset[str], standard_cut: bool) -> None:
    """Refuse (FAILED_PRECONDITION, naming it) an approximation this server does not allow, or any in the U-shape."""
    if asked.exact:
        return
    if not standard_cut:
        raise PreconditionFailed(
            f"approximations ({asked.describe()}) are for the standard cut; this server holds the U-shape's middle: "
            "train it exactly"
        )
    refused = [name for name in asked.names if name not in allowed]
    if refused:
        granted = ", ".join(sorted(allowed)) if allowed else "none"
        raise PreconditionFailed(
            f"the client asks for {', '.join(refused)}, which this server does not allow (it allows {granted}): start "
            f"it with --allow-approximations {','.join(sorted({*allowed, *refused}))}, or train exactly"
        )
