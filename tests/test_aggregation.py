"""The SplitFed rules of splitlearning/aggregation.py on crafted states: known medians, trimmed means, clipped
updates; FedAvg as `part_state.average`; and one hostile member of four (scaled or sign-flipped) against the
honest members' average."""

from __future__ import annotations

import numpy as np
import pytest

from splitlearning import aggregation, robust
from splitlearning.aggregation import FEDAVG, Aggregation, Rule
from splitlearning.errors import InvalidRequest
from splitlearning.part_state import PartState, average
from splitlearning.v1 import split_learning_pb2 as pb


def state(*values: float, counter: int = 0) -> PartState:
    """A part of one float32 vector and one int64 counter."""
    return PartState([np.array(values, np.float32), np.array(counter, np.int64)])


def test_median_is_the_middle_value_per_coordinate_and_the_mean_of_the_two_middle_ones_for_even_counts() -> None:
    states = [state(1, 40, -3, counter=7), state(2, 10, 5, counter=8), state(100, 20, 0, counter=9)]
    combined = robust.median(states)
    np.testing.assert_array_equal(combined.weights[0], np.array([2, 20, 0], np.float32))
    assert combined.weights[1] == 7 and combined.weights[1].dtype == np.int64  # a counter: the first state's
    assert combined.weights[0].dtype == np.float32 and not combined.optimizer
    even = robust.median([*states, state(3, 30, 1)])
    np.testing.assert_array_equal(even.weights[0], np.array([2.5, 25, 0.5], np.float32))


def test_trimmed_mean_drops_floor_beta_k_from_each_end_per_coordinate() -> None:
    states = [state(1, -50), state(2, 4), state(3, 6), state(1000, 8)]
    combined = robust.trimmed_mean(states, 0.25)  # floor(0.25 x 4) = 1 from each end
    np.testing.assert_array_equal(combined.weights[0], np.array([2.5, 5], np.float32))
    five = [*states, state(4, 10)]  # floor(0.25 x 5) = 1: the mean of the middle three
    np.testing.assert_allclose(robust.trimmed_mean(five, 0.25).weights[0], [3, 6])
    three = states[:3]  # floor(0.25 x 3) = 0: the plain unweighted mean
    np.testing.assert_allclose(robust.trimmed_mean(three, 0.25).weights[0], [2, -40 / 3], rtol=1e-6)
    assert [aggregation.trim_count(k, 0.25) for k in range(1, 9)] == [0, 0, 0, 1, 1, 1, 1, 2]
    assert aggregation.trim_count(10, 0.3) == 3 and aggregation.trim_count(3, 0.49) == 1


def test_norm_bounded_clips_each_update_to_the_bound_then_takes_the_sample_weighted_mean() -> None:
    start = state(1, 1)
    states = [state(4, 5), state(1, 2), state(-29, -39)]  # updates (3, 4), (0, 1), (-30, -40): norms 5, 1, 50
    assert robust.update_norms(states, start) == [5.0, 1.0, 50.0]
    combined = robust.norm_bounded(states, [1, 1, 2], start, bound=2.0)
    # clipped: (1.2, 1.6), (0, 1), (-1.2, -1.6); weighted 1/4, 1/4, 2/4
    expected = np.array([1 + 0.25 * 1.2 - 0.5 * 1.2, 1 + 0.25 * 1.6 + 0.25 * 1 - 0.5 * 1.6], np.float32)
    np.testing.assert_allclose(combined.weights[0], expected, rtol=1e-6)
    median_bound = robust.norm_bounded(states, [1, 1, 2], start, bound=0.0)  # B = median(5, 1, 50) = 5
    expected = np.array([1 + 0.25 * 3 - 0.5 * 3, 1 + 0.25 * 4 + 0.25 * 1 - 0.5 * 4], np.float32)
    np.testing.assert_allclose(median_bound.weights[0], expected, rtol=1e-6)
    assert robust.clip_factors([5.0, 1.0, 50.0], 0.0) == (5.0, [1.0, 1.0, 0.1])


def test_fedavg_is_part_state_average_bit_for_bit() -> None:
    rng = np.random.default_rng(0)
    states = [PartState([rng.normal(size=(3, 4)).astype(np.float32), np.array(k, np.int64)]) for k in range(3)]
    samples = [7, 11, 13]
    ours, theirs = FEDAVG.combine(states, samples), average(states, samples)
    for mine, reference in zip(ours.weights, theirs.weights, strict=True):
        assert mine.dtype == reference.dtype and mine.tobytes() == reference.tobytes()


def test_every_rule_is_a_fixed_function_of_its_inputs() -> None:
    rng = np.random.default_rng(1)
    start = PartState([rng.normal(size=(5, 3)).astype(np.float32)])
    states = [PartState([rng.normal(size=(5, 3)).astype(np.float32)]) for _ in range(4)]
    for rule in (Aggregation(Rule.MEDIAN), Aggregation(Rule.TRIMMED_MEAN, 0.25), Aggregation(Rule.NORM_BOUNDED)):
        first = rule.combine(states, [3, 1, 2, 5], start).weights[0]
        again = rule.combine([PartState([w.copy() for w in s.weights]) for s in states], [3, 1, 2, 5], start)
        assert first.tobytes() == again.weights[0].tobytes(), rule


@pytest.mark.parametrize("attack", ["scaled", "sign-flipped"])
def test_one_hostile_member_of_four_drags_fedavg_far_and_the_robust_rules_stay_near_the_honest_average(
    attack: str,
) -> None:
    rng = np.random.default_rng(2)
    start = PartState([rng.normal(size=(64, 10)).astype(np.float32), rng.normal(size=10).astype(np.float32)])
    honest = [
        PartState([w + rng.normal(scale=0.05, size=w.shape).astype(np.float32) for w in start.weights])
        for _ in range(3)
    ]
    trained = honest[0]
    if attack == "scaled":  # a member's weights x100
        hostile = PartState([w * 100 for w in trained.weights])
    else:  # its update sign-flipped and amplified x10: start - 10 (w - start)
        hostile = PartState([s - 10 * (w - s) for w, s in zip(trained.weights, start.weights, strict=True)])
    states, samples = [*honest, hostile], [100, 100, 100, 100]
    reference = average(honest, samples[:3])

    def distance(combined: PartState) -> float:
        pairs = zip(combined.weights, reference.weights, strict=True)
        return float(np.sqrt(sum(np.sum((a - b).astype(np.float64) ** 2) for a, b in pairs)))

    fedavg = distance(FEDAVG.combine(states, samples, start))
    for rule in (Aggregation(Rule.MEDIAN), Aggregation(Rule.TRIMMED_MEAN, 0.25), Aggregation(Rule.NORM_BOUNDED)):
        robust = distance(rule.combine(states, samples, start))
        assert robust < fedavg / 5, f"{rule}: {robust:.3g} from the honest average, FedAvg {fedavg:.3g}"


def test_a_rule_carries_only_its_own_parameters_and_round_trips_through_the_proto() -> None:
    assert Aggregation(Rule.MEDIAN, 0.25, 3.0) == Aggregation(Rule.MEDIAN)
    for rule in (
        FEDAVG,
        Aggregation(Rule.MEDIAN),
        Aggregation(Rule.TRIMMED_MEAN, 0.2),
        Aggregation(Rule.NORM_BOUNDED, 4),
    ):
        assert Aggregation.from_proto(rule.to_proto()) == rule
    assert Aggregation.from_proto(pb.Aggregation()) == FEDAVG  # unset: a peer that predates the field
    with pytest.raises(InvalidRequest, match=r"\(0, 0\.5\)"):
        Aggregation.from_proto(pb.Aggregation(rule=pb.AGGREGATION_RULE_TRIMMED_MEAN, trim_fraction=0.5))
    with pytest.raises(InvalidRequest, match="rule"):
        Aggregation.from_proto(pb.Aggregation(rule=99))  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest, match="norm bound"):
        Aggregation(Rule.NORM_BOUNDED, bound=-1.0)
