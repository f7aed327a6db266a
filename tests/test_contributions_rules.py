"""The server's side of a SplitFed rule (server_part/contributions.py): the second parts are combined by the
server's own rule, a membership stating another (the aggregator's) is refused naming both, and norm-bounded
measures each contribution's update from its round's start, kept across a restart. Numpy only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from server_part.contributions import Contributions
from splitlearning.aggregation import FEDAVG, Aggregation, Rule
from splitlearning.errors import PreconditionFailed
from splitlearning.groups import Contribution, Membership, Scheme
from splitlearning.part_state import PartState
from splitlearning.robust import median, norm_bounded

BOUNDED = Aggregation(Rule.NORM_BOUNDED, bound=0.5)


def part(seed: int) -> PartState:
    rng = np.random.default_rng(seed)
    return PartState([rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=3).astype(np.float32)])


def member(round_: int, k: int, start: tuple[Contribution, ...], rule: Aggregation) -> Membership:
    return Membership("g", round_, k, Scheme.SPLITFED, start, rule)


def assert_bits(actual: PartState | None, expected: PartState) -> None:
    assert actual is not None
    for a, e in zip(actual.weights, expected.weights, strict=True):
        assert a.dtype == e.dtype and a.tobytes() == e.tobytes()


def test_second_parts_are_combined_by_the_servers_rule() -> None:
    kept = Contributions(aggregation=Aggregation(Rule.MEDIAN))
    for k in (1, 2, 3):
        kept.put(member(0, k, (), Aggregation(Rule.MEDIAN)), 10, part(k))
    start = tuple(Contribution(0, k, 10) for k in (1, 2, 3))
    combined = kept.start_state(member(1, 1, start, Aggregation(Rule.MEDIAN)), part(0))
    assert_bits(combined, median([part(1), part(2), part(3)]))


@pytest.mark.parametrize(
    ("server", "aggregator"),
    [(FEDAVG, Aggregation(Rule.MEDIAN)), (Aggregation(Rule.TRIMMED_MEAN, 0.25), Aggregation(Rule.TRIMMED_MEAN, 0.2))],
)
def test_a_membership_stating_another_rule_is_refused_naming_both(server: Aggregation, aggregator: Aggregation) -> None:
    kept = Contributions(aggregation=server)
    with pytest.raises(PreconditionFailed, match="aggregation mismatch") as refused:
        kept.start_state(member(0, 1, (), aggregator), part(0))
    assert server.flags() in str(refused.value) and aggregator.flags() in str(refused.value)
    robin = Membership("g", 0, 1, Scheme.ROUND_ROBIN, (), aggregator)  # round-robin combines nothing
    assert kept.start_state(robin, part(0)) is None


def test_norm_bounded_clips_updates_from_each_rounds_start_also_after_a_restart(tmp_path: Path) -> None:
    initial = part(0)
    kept = Contributions(tmp_path, BOUNDED)
    for k in (1, 2):
        kept.put(member(0, k, (), BOUNDED), 10, part(k))
    round_1 = tuple(Contribution(0, k, 10) for k in (1, 2))
    start_1 = kept.start_state(member(1, 1, round_1, BOUNDED), initial)
    assert_bits(start_1, norm_bounded([part(1), part(2)], [10, 10], initial, 0.5))
    kept.opened(member(1, 1, round_1, BOUNDED), start_1)  # round 1's first session: its start is kept
    assert (tmp_path / "g" / "start-1.npz").is_file()
    for k in (1, 2):
        kept.put(member(1, k, round_1, BOUNDED), 10, part(10 + k))

    restarted = Contributions(tmp_path, BOUNDED)
    round_2 = tuple(Contribution(1, k, 10) for k in (1, 2))
    assert start_1 is not None
    start_2 = restarted.start_state(member(2, 1, round_2, BOUNDED), initial)
    assert_bits(start_2, norm_bounded([part(11), part(12)], [10, 10], start_1, 0.5))
    restarted.opened(member(2, 1, round_2, BOUNDED), start_2)
    assert (tmp_path / "g" / "start-1.npz").is_file() and (tmp_path / "g" / "start-2.npz").is_file()


def test_norm_bounded_without_the_rounds_start_is_refused() -> None:
    kept = Contributions(aggregation=BOUNDED)
    for k in (1, 2):
        kept.put(member(3, k, (), BOUNDED), 10, part(k))
    with pytest.raises(PreconditionFailed, match="no start of round 3"):
        kept.start_state(member(4, 1, tuple(Contribution(3, k, 10) for k in (1, 2)), BOUNDED), part(0))
