"""What the members of a group, the aggregator and the server share about multi-client training: the schemes,
a group's settings, the contributions a round starts from, and their checks. No gRPC here beyond the messages.

docs/multi_client.md describes the schemes and the protocol.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from splitlearning.aggregation import FEDAVG, Aggregation
from splitlearning.errors import InvalidRequest
from splitlearning.protocol import ID_PATTERN, MAX_ID_LENGTH
from splitlearning.text import clip
from splitlearning.v1 import split_learning_pb2 as pb


class Scheme(enum.Enum):
    ROUND_ROBIN = "round-robin"
    SPLITFED = "splitfed"

    @property
    def carries_optimizer(self) -> bool:
        """Round-robin hands each turn the optimizer state the last one ended with; SplitFed starts each round
        with a fresh optimizer (optimizer states are not averaged)."""
        return self is Scheme.ROUND_ROBIN

    def to_proto(self) -> pb.Scheme.ValueType:
        return pb.SCHEME_ROUND_ROBIN if self is Scheme.ROUND_ROBIN else pb.SCHEME_SPLITFED

    @staticmethod
    def from_proto(code: int, field: str = "scheme") -> Scheme:
        if code == pb.SCHEME_ROUND_ROBIN:
            return Scheme.ROUND_ROBIN
        if code == pb.SCHEME_SPLITFED:
            return Scheme.SPLITFED
        raise InvalidRequest(f"{field}: expected SCHEME_ROUND_ROBIN or SCHEME_SPLITFED, got {code}")


SCHEMES = tuple(scheme.value for scheme in Scheme)


class Action(enum.Enum):
    """What a member does next, as a join answers it (JoinRoundResponse.action)."""

    WAIT = "wait"
    TRAIN = "train"
    DONE = "done"

    def to_proto(self) -> pb.JoinRoundResponse.Action.ValueType:
        return _ACTION_CODES[self]

    @staticmethod
    def from_proto(code: int) -> Action:
        """The action a join's answer carries; ValueError for a code this version does not know."""
        for action, known in _ACTION_CODES.items():
            if code == known:
                return action
        raise ValueError(f"unknown join action {code}")


_ACTION_CODES = {
    Action.WAIT: pb.JoinRoundResponse.ACTION_WAIT,
    Action.TRAIN: pb.JoinRoundResponse.ACTION_TRAIN,
    Action.DONE: pb.JoinRoundResponse.ACTION_DONE,
}


@dataclass(frozen=True)
class Settings:
    """What every member of a group states alike."""

    scheme: Scheme
    rounds: int
    local_epochs: int

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.local_epochs < 1:
            raise InvalidRequest(
                f"settings: rounds and local_epochs must be at least 1, got {self.rounds} and {self.local_epochs}"
            )

    def __str__(self) -> str:
        epochs = f"{self.local_epochs} local epoch{'s' * (self.local_epochs != 1)}"
        return f"{self.scheme.value} for {self.rounds} round{'s' * (self.rounds != 1)} of {epochs}"

    def to_proto(self) -> pb.GroupSettings:
        return pb.GroupSettings(scheme=self.scheme.to_proto(), rounds=self.rounds, local_epochs=self.local_epochs)

    @staticmethod
    def from_proto(message: pb.GroupSettings) -> Settings:
        return Settings(Scheme.from_proto(message.scheme, "settings.scheme"), message.rounds, message.local_epochs)


@dataclass(frozen=True, order=True)
class Contribution:
    """One member's part at the end of one round (round-robin: one turn), weighed by its samples."""

    round: int
    member: int
    samples: int

    def __str__(self) -> str:
        return f"member {self.member} in round {self.round} ({self.samples} samples)"

    def to_proto(self) -> pb.Contribution:
        return pb.Contribution(round=self.round, member=self.member, samples=self.samples)

    @staticmethod
    def from_proto(message: pb.Contribution) -> Contribution:
        return Contribution(message.round, message.member, message.samples)


@dataclass(frozen=True)
class Membership:
    """The group round a session trains (HandshakeRequest.group), checked; `aggregation` is the rule the
    aggregator combined the first parts with (SplitFed), which the server's own must equal."""

    group: str
    round: int
    member: int
    scheme: Scheme
    start: tuple[Contribution, ...]
    aggregation: Aggregation = field(default=FEDAVG)

    def __str__(self) -> str:
        return f"group {self.group}, {self.scheme.value} round {self.round}, member {self.member}"

    def to_proto(self) -> pb.GroupRound:
        return pb.GroupRound(
            group=self.group,
            round=self.round,
            member=self.member,
            scheme=self.scheme.to_proto(),
            start=[c.to_proto() for c in self.start],
            aggregation=self.aggregation.to_proto(),
        )

    @staticmethod
    def from_proto(message: pb.GroupRound) -> Membership:
        if len(message.group) > MAX_ID_LENGTH:
            raise InvalidRequest(f"group.group: at most {MAX_ID_LENGTH} characters, got {len(message.group)}")
        check_name(message.group)
        if message.member < 1:
            raise InvalidRequest(f"group.member: members count from 1, got {message.member}")
        scheme = Scheme.from_proto(message.scheme, "group.scheme")
        start = contributions(message.start)
        check_start(start, scheme)
        aggregation = Aggregation.from_proto(message.aggregation, "group.aggregation")
        return Membership(message.group, message.round, message.member, scheme, start, aggregation)


def contributions(messages: Iterable[pb.Contribution]) -> tuple[Contribution, ...]:
    return tuple(Contribution.from_proto(m) for m in messages)


def check_name(group: str) -> None:
    if not ID_PATTERN.fullmatch(group):
        raise InvalidRequest(
            f"group: expected 1 to {MAX_ID_LENGTH} letters, digits, '-' or '_', got '{clip(group, 40)}'"
        )


def check_start(start: Sequence[Contribution], scheme: Scheme) -> None:
    """A round's start as a session may name it: members from 1, positive samples, no member twice, one
    contribution at most in round-robin."""
    for contribution in start:
        if contribution.member < 1 or contribution.samples < 1:
            raise InvalidRequest(f"group.start: members count from 1 and samples from 1, got {contribution}")
    if len({(c.round, c.member) for c in start}) != len(start):
        raise InvalidRequest("group.start: names a member's contribution to a round twice")
    if scheme is Scheme.ROUND_ROBIN and len(start) > 1:
        raise InvalidRequest(f"group.start: round-robin starts from one contribution (the last turn), got {len(start)}")
