"""How a SplitFed round combines its members' parts: FedAvg (the default), or a robust rule that one hostile
member cannot drag far: the coordinate-wise median, the trimmed mean, or FedAvg of norm-bounded updates.

Numpy and protobuf only (the aggregator runs without TensorFlow). Every rule is a fixed function of its inputs in
the order given (float64 arithmetic, each weight cast back to its dtype), so the aggregator's first part and the
server's second part are recomputable by anyone, bit for bit. A weight that is not floating (an integer counter)
is taken from the first state, as `part_state.average` does; optimizer state is never combined.

docs/multi_client.md ("Robust averaging") says what each rule defends against and what it costs.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from splitlearning.errors import InvalidRequest
from splitlearning.part_state import PartState, average
from splitlearning.v1 import split_learning_pb2 as pb

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
        norm-bounded only. FedAvg is `part_state.average`, unchanged."""
        _check(states, samples)
        if self.rule is Rule.FEDAVG:
            return average(states, samples)
        if self.rule is Rule.MEDIAN:
            return median(states)
        if self.rule is Rule.TRIMMED_MEAN:
            return trimmed_mean(states, self.trim)
        if start is None:
            raise ValueError("norm-bounded averaging needs the round's start")
        return norm_bounded(states, samples, start, self.bound)

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


def median(states: Sequence[PartState]) -> PartState:
    """Coordinate-wise median: each floating coordinate is the median of the K members' values, in float64 (the
    middle value for odd K, the mean of the two middle values for even K: `numpy.median`), cast back. Sample
    counts do not weigh in."""
    return _per_coordinate(states, lambda stacked: np.median(stacked, axis=0))


def trimmed_mean(states: Sequence[PartState], trim: float) -> PartState:
    """Coordinate-wise trimmed mean: with t = floor(trim x K), each floating coordinate's K values (float64) are
    sorted, the t lowest and t highest dropped, and the K - 2t left summed from the lowest up and divided by
    K - 2t; cast back. t = 0 (trim x K < 1) is the plain unweighted mean. Sample counts do not weigh in."""
    t = trim_count(len(states), trim)

    def trimmed(stacked: np.ndarray) -> np.ndarray:
        ordered = np.sort(stacked, axis=0)
        accumulator = np.zeros(stacked.shape[1:], np.float64)
        for row in ordered[t : len(ordered) - t]:
            accumulator += row
        return accumulator / float(len(ordered) - 2 * t)

    return _per_coordinate(states, trimmed)


def update_norms(states: Sequence[PartState], start: PartState) -> list[float]:
    """Each state's update norm: the L2 norm of float64(w) - float64(start) over all its floating weights."""
    for state in states:
        state.check_like(start, "a part to combine")
    norms = []
    for state in states:
        squares = 0.0
        for mine, base in zip(state.weights, start.weights, strict=True):
            if np.issubdtype(mine.dtype, np.floating):
                update = mine.astype(np.float64) - base.astype(np.float64)
                squares += float(np.dot(update.ravel(), update.ravel()))
        norms.append(math.sqrt(squares))
    return norms


def clip_factors(norms: Sequence[float], bound: float) -> tuple[float, list[float]]:
    """The bound used (`bound`, or the median of `norms` when it is 0) and each update's factor
    min(1, B / norm) (1 for a zero update)."""
    used = bound if bound > 0 else float(np.median(np.asarray(norms, np.float64)))
    return used, [1.0 if norm <= used else used / norm for norm in norms]


def norm_bounded(states: Sequence[PartState], samples: Sequence[int], start: PartState, bound: float) -> PartState:
    """FedAvg of clipped updates: u_k = w_k - s (s: the round's start), c_k = min(1, B / ||u_k||) with ||.|| the
    L2 norm over all floating weights and B = `bound` (0: the median of the ||u_k||), then each floating weight is
    s + sum_k (n_k / N) c_k u_k with N = sum_k n_k, computed in float64 in the order given (the division first,
    as in FedAvg) and cast back."""
    _check(states, samples)
    _, factors = clip_factors(update_norms(states, start), bound)
    total = float(sum(samples))
    combined: list[np.ndarray] = []
    for index, base in enumerate(start.weights):
        if not np.issubdtype(base.dtype, np.floating):
            combined.append(np.array(states[0].weights[index]))
            continue
        origin = base.astype(np.float64)
        accumulator = np.zeros(base.shape, np.float64)
        for state, n, factor in zip(states, samples, factors, strict=True):
            accumulator += (n / total) * factor * (state.weights[index].astype(np.float64) - origin)
        combined.append((origin + accumulator).astype(base.dtype))
    return PartState(combined, [])


def _per_coordinate(states: Sequence[PartState], reduce: Callable[[np.ndarray], np.ndarray]) -> PartState:
    for state in states[1:]:
        state.check_like(states[0], "a part to combine")
    combined: list[np.ndarray] = []
    for index, first in enumerate(states[0].weights):
        if not np.issubdtype(first.dtype, np.floating):
            combined.append(np.array(first))
            continue
        stacked = np.stack([state.weights[index].astype(np.float64) for state in states])
        combined.append(np.asarray(reduce(stacked)).astype(first.dtype))
    return PartState(combined, [])


def _check(states: Sequence[PartState], samples: Sequence[int]) -> None:
    if not states or len(states) != len(samples):
        raise ValueError(f"combining needs one sample count per state, got {len(states)} states, {len(samples)} counts")
    if any(n <= 0 for n in samples):
        raise ValueError(f"sample counts must be positive, got {list(samples)}")
