"""How a SplitFed round combines its members' parts, as settings (the rules' arithmetic: splitlearning/robust.py):
FedAvg (the default), or a robust rule that one hostile member cannot drag far: the coordinate-wise median, the
trimmed mean, or FedAvg of norm-bounded updates.

Numpy and protobuf only (the aggregator runs without TensorFlow). Every rule is a fixed function of its inputs in
the order given (float64 arithmetic, each weight cast back to its dtype), so the aggregator's first part and the
server's second part are recomputable by anyone, bit for bit. A weight that is not floating (an integer counter)
is taken from the first state, as `part_state.average` does; optimizer state is never combined.

docs/multi_client.md ("Robust averaging") says what each rule defends against and what it costs.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from splitlearning.errors import InvalidRequest
from splitlearning.v1 import split_learning_pb2 as pb

if TYPE_CHECKING:
    from splitlearning.part_state import PartState

DEFAULT_TRIM = 0.25  # trims one member of four from each end (floor(0.25 x 4) = 1)


class Rule(enum.Enum):
    FEDAVG = "fedavg"
    MEDIAN = "median"
    TRIMMED_MEAN = "trimmed-mean"
    NORM_BOUNDED = "norm-bounded"


RULES = tuple(rule.value for rule in Rule)

_CODES = {
    Rule.FEDAVG: pb.AGGREGATION_RULE_FEDAVG,
    Rule.MEDIAN: pb.AGGREGATION_RULE_MEDIAN,
    Rule.TRIMMED_MEAN: pb.AGGREGATION_RULE_TRIMMED_MEAN,
    Rule.NORM_BOUNDED: pb.AGGREGATION_RULE_NORM_BOUNDED,
}


@dataclass(frozen=True)
class Aggregation:
    """A rule and its parameters: `trim` (trimmed-mean: the fraction beta trimmed from each end, in (0, 0.5)) and
    `bound` (norm-bounded: the L2 bound on each update, > 0; 0: the round's median update norm). A parameter of
    another rule is set to 0, so two equal rules compare equal whatever flags were left at their defaults."""

    rule: Rule = Rule.FEDAVG
    trim: float = 0.0
    bound: float = 0.0

    def __post_init__(self) -> None:
        if self.rule is not Rule.TRIMMED_MEAN:
            object.__setattr__(self, "trim", 0.0)
        elif not 0.0 < self.trim < 0.5:
            raise InvalidRequest(f"aggregation: the trimmed mean's fraction must lie in (0, 0.5), got {self.trim:g}")
        if self.rule is not Rule.NORM_BOUNDED:
            object.__setattr__(self, "bound", 0.0)
        elif not (math.isfinite(self.bound) and self.bound >= 0.0):
            raise InvalidRequest(f"aggregation: the norm bound must be >= 0 (0: the median norm), got {self.bound:g}")

    @property
    def needs_start(self) -> bool:
        """Whether `combine` needs the round's start (norm-bounded clips updates, the weights less the start)."""
        return self.rule is Rule.NORM_BOUNDED

    def __str__(self) -> str:
        if self.rule is Rule.TRIMMED_MEAN:
            return f"trimmed-mean (trim fraction {self.trim:g})"
        if self.rule is Rule.NORM_BOUNDED:
            return f"norm-bounded (norm bound {self.bound:g})" if self.bound else "norm-bounded (the median norm)"
        return self.rule.value

    def flags(self) -> str:
        """The flags that state this rule, for messages."""
        text = f"--aggregation {self.rule.value}"
        if self.rule is Rule.TRIMMED_MEAN:
            text += f" --trim-fraction {self.trim:g}"
        if self.rule is Rule.NORM_BOUNDED:
            text += f" --norm-bound {self.bound:g}"
        return text

    def trimmed(self, members: int) -> int:
        """Trimmed mean: the members trimmed from each end of each coordinate, floor(beta x members) (beta < 0.5,
        so at least one is left); 0 for the other rules."""
        return trim_count(members, self.trim) if self.rule is Rule.TRIMMED_MEAN else 0

    def combine(self, states: Sequence[PartState], samples: Sequence[int], start: PartState | None = None) -> PartState:
        """The round's combined part (weights only). `start`, the part the round started from, is needed by
        norm-bounded only. FedAvg is `part_state.average`, unchanged; the others' arithmetic is in
        splitlearning/robust.py."""
        from splitlearning import robust  # numpy: not at import (the CLIs parse their flags without it)
        from splitlearning.part_state import average

        robust.check(states, samples)
        if self.rule is Rule.FEDAVG:
            return average(states, samples)
        if self.rule is Rule.MEDIAN:
            return robust.median(states)
        if self.rule is Rule.TRIMMED_MEAN:
            return robust.trimmed_mean(states, self.trim)
        if start is None:
            raise ValueError("norm-bounded averaging needs the round's start")
        return robust.norm_bounded(states, samples, start, self.bound)

    def to_proto(self) -> pb.Aggregation:
        return pb.Aggregation(rule=_CODES[self.rule], trim_fraction=self.trim, norm_bound=self.bound)

    @staticmethod
    def from_proto(message: pb.Aggregation, field: str = "aggregation") -> Aggregation:
        """Unspecified is FedAvg (a peer that predates the field); an unknown rule or a parameter out of range is
        InvalidRequest."""
        if message.rule == pb.AGGREGATION_RULE_UNSPECIFIED:
            return Aggregation()
        for rule, code in _CODES.items():
            if message.rule == code:
                try:
                    return Aggregation(rule, message.trim_fraction, message.norm_bound)
                except InvalidRequest as error:
                    raise InvalidRequest(f"{field}: {error}") from None
        raise InvalidRequest(f"{field}.rule: expected an AGGREGATION_RULE_*, got {message.rule}")


FEDAVG = Aggregation()


def trim_count(members: int, trim: float) -> int:
    """floor(trim x members), the members trimmed from each end (1e-9 absorbs float error: 0.3 x 10 is 3)."""
    return min(math.floor(trim * members + 1e-9), (members - 1) // 2)
