"""A session's retry cache: the replies of its last applied steps, answered again to a resend of one of them.

It holds the last step, or the last two when the session trains with stale gradients (two steps in flight: a
client whose stream broke may have lost both replies).

A client whose reply was lost sends the step again; the cache answers it with the first replies and no second
update. It answers only the client that sent the step, and only a resend that repeats it: the same kind of
step (whole, in micro-batches, U-shaped), and each tensor with the same dtype, shape and values as the first
time (compared only when a resend comes, so the hot path pays nothing but keeping a reference to the request).
Anything else is refused, so a client can never receive a reply computed from another request.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Generic, TypeVar

import numpy as np

from splitlearning.errors import PreconditionFailed

R = TypeVar("R")


class StepKind(Enum):
    WHOLE = "whole"
    MICRO = "in micro-batches"
    USHAPE = "U-shaped"


@dataclass(frozen=True)
class Answered(Generic[R]):
    """The last applied step: its replies (one per micro-batch, else one) and the requests they answer."""

    step: int
    kind: StepKind
    client_id: str
    requests: tuple[tuple[np.ndarray, ...], ...] = field(repr=False)
    replies: tuple[R, ...] = field(repr=False)


class ReplyCache(Generic[R]):
    """Holds the last `depth` applied steps of one session (nothing before its first step, or after a restore)."""

    def __init__(self, depth: int = 1) -> None:
        self.depth = depth
        self._answered: list[Answered[R]] = []  # oldest first

    @property
    def step(self) -> int | None:
        """The latest step a resend would be answered for, if any."""
        return self._answered[-1].step if self._answered else None

    @property
    def steps(self) -> set[int]:
        """Every step a resend would be answered for."""
        return {answered.step for answered in self._answered}

    def remember(
        self,
        step: int,
        kind: StepKind,
        client_id: str,
        requests: list[tuple[np.ndarray, ...]],
        replies: list[R],
    ) -> None:
        self._answered.append(Answered(step, kind, client_id, tuple(requests), tuple(replies)))
        del self._answered[: -self.depth]

    def forget(self) -> None:
        self._answered.clear()

    def answer(
        self, step: int, kind: StepKind, client_id: str, tensors: tuple[np.ndarray, ...], part: int = 0, parts: int = 1
    ) -> R | None:
        """The stored reply to part `part` of `step` when `step` is the cached one, else None (not a resend).
        A resend that does not repeat the cached step exactly is refused (FAILED_PRECONDITION)."""
        answered = next((a for a in self._answered if a.step == step), None)
        if answered is None:
            return None
        if client_id != answered.client_id:
            raise PreconditionFailed(
                f"step {step} was applied for another client: a step is answered again only to the client that "
                "sent it; handshake to get this session's next step"
            )
        if kind is not answered.kind or parts != len(answered.replies):
            sent = f"{len(answered.replies)} micro-batches" if answered.kind is StepKind.MICRO else answered.kind.value
            now = f"{parts} micro-batches" if kind is StepKind.MICRO else kind.value
            raise PreconditionFailed(
                f"step {step} was applied {_as(sent)} and is resent {_as(now)}: resend it as it was first sent"
            )
        for name, new, old in zip(("iv", "labels"), tensors, answered.requests[part], strict=False):
            if new.dtype != old.dtype or new.shape != old.shape or not np.array_equal(new, old):
                what = (
                    "values"
                    if new.dtype == old.dtype and new.shape == old.shape
                    else f"{list(new.shape)} {new.dtype.name} against {list(old.shape)} {old.dtype.name}"
                )
                raise PreconditionFailed(
                    f"step {step} is resent with another {name} than the one it was applied with ({what} differ): "
                    "a resend must repeat the step exactly; the reply it answers belongs to the first request"
                )
        return answered.replies[part]


def _as(description: str) -> str:
    return f"in {description}" if description[0].isdigit() else description
