"""The arithmetic of the robust rules (splitlearning/aggregation.py names them): the coordinate-wise median, the
trimmed mean, and FedAvg of norm-bounded updates; numpy only, float64, each a fixed function of its inputs in the
order given, every weight cast back to its dtype; a weight that is not floating is the first state's."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from splitlearning.aggregation import trim_count
from splitlearning.part_state import PartState


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
    check(states, samples)
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


def check(states: Sequence[PartState], samples: Sequence[int]) -> None:
    if not states or len(states) != len(samples):
        raise ValueError(f"combining needs one sample count per state, got {len(states)} states, {len(samples)} counts")
    if any(n <= 0 for n in samples):
        raise ValueError(f"sample counts must be positive, got {list(samples)}")
