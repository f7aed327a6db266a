"""`Rounds` (aggregator/rounds.py): who trains when, what each round starts from, when a round closes; with a
fake clock, small numpy states and, for persistence, a `GroupStore` on a temporary folder. No gRPC, no
TensorFlow: the SplitFed average is recomputed here in float64 from the submissions."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from aggregator.rounds import Action, Closed, Next, Rounds
from aggregator.store import GroupRecord, GroupStore
from splitlearning.aggregation import FEDAVG, Aggregation, Rule
from splitlearning.errors import InvalidRequest, PreconditionFailed, SessionNotFound
from splitlearning.groups import Contribution, Scheme, Settings
from splitlearning.part_state import PartState
from splitlearning.robust import norm_bounded

SPLITFED = Settings(Scheme.SPLITFED, 2, 1)
ROBIN = Settings(Scheme.ROUND_ROBIN, 2, 1)
LOGGER = "aggregator.rounds"


class Clock:
    """A clock the test moves: `clock.now += seconds`."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def state(seed: int, optimizer: bool = False) -> PartState:
    """A small first part: a float32 kernel and bias and a float64 tensor; with `optimizer`, a step count and
    one slot per weight (as Adam's would be)."""
    rng = np.random.default_rng(seed)
    weights: list[np.ndarray] = [
        rng.normal(size=(3, 2)).astype(np.float32),
        rng.normal(size=(2,)).astype(np.float32),
        rng.normal(size=(4,)),
    ]
    slots: list[np.ndarray] = [np.asarray(seed, np.int64)]
    slots += [rng.normal(size=w.shape).astype(w.dtype) for w in weights]
    return PartState(weights, slots if optimizer else [])


def weighted_average(states: Sequence[PartState], samples: Sequence[int]) -> list[np.ndarray]:
    """FedAvg computed apart from the code under test: sum_k n_k w_k / sum_k n_k in float64, cast back."""
    total = float(sum(samples))
    out = []
    for index, first in enumerate(states[0].weights):
        summed = np.zeros(first.shape, np.float64)
        for s, n in zip(states, samples, strict=True):
            summed += n * s.weights[index].astype(np.float64)
        out.append((summed / total).astype(first.dtype))
    return out


def assert_arrays_equal(actual: Sequence[np.ndarray], expected: Sequence[np.ndarray], what: str) -> None:
    """Bit for bit, dtypes included."""
    assert len(actual) == len(expected), what
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert a.dtype == e.dtype and a.shape == e.shape, f"{what}[{i}]: {a.dtype}{a.shape} vs {e.dtype}{e.shape}"
        np.testing.assert_array_equal(a, e, err_msg=f"{what}[{i}]")


def assert_same_state(actual: PartState | None, expected: PartState, what: str) -> None:
    assert actual is not None, what
    assert_arrays_equal(actual.weights, expected.weights, f"{what}.weights")
    assert_arrays_equal(actual.optimizer, expected.optimizer, f"{what}.optimizer")


def assert_close_to(actual: PartState | None, expected: list[np.ndarray], what: str) -> None:
    """The average as the test computed it: same dtypes, equal to float32 rounding (the sum's order differs)."""
    assert actual is not None, what
    assert actual.optimizer == [], f"{what}: SplitFed starts each round with a fresh optimizer"
    assert len(actual.weights) == len(expected), what
    for i, (a, e) in enumerate(zip(actual.weights, expected, strict=True)):
        assert a.dtype == e.dtype and a.shape == e.shape, f"{what}[{i}]"
        np.testing.assert_allclose(a, e, rtol=1e-6, atol=1e-7, err_msg=f"{what}[{i}]")


def assert_same_answer(actual: Next, expected: Next, what: str) -> None:
    assert (actual.action, actual.round, actual.start, actual.note) == (
        expected.action,
        expected.round,
        expected.start,
        expected.note,
    ), what
    if expected.state is None:
        assert actual.state is None, what
    else:
        assert_same_state(actual.state, expected.state, what)


class Closes:
    """The `on_close` callback: every closed round, in order."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, Closed]] = []

    def __call__(self, group: str, closed: Closed) -> None:
        self.seen.append((group, closed))


def make(members: int, clock: Clock | None = None, **kwargs: object) -> tuple[Rounds, Closes]:
    closes = Closes()
    rounds = Rounds(members, clock=clock or Clock(), on_close=closes, **kwargs)  # type: ignore[arg-type]
    return rounds, closes


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


# -- SplitFed ------------------------------------------------------------------------------------------------------


def test_splitfed_round_closes_with_the_sample_weighted_average_and_names_its_contributions() -> None:
    rounds, closes = make(3)
    initial = state(0, optimizer=True)
    first = rounds.join("g", 2, SPLITFED, initial)
    assert first.action is Action.TRAIN and first.round == 0 and first.start == ()
    assert_same_state(first.state, PartState(initial.weights, []), "round 0 starts from the initial weights")
    for member in (1, 3):
        assert_same_answer(rounds.join("g", member, SPLITFED, None), first, f"member {member} in round 0")

    submitted = {1: state(11), 2: state(12), 3: state(13)}
    samples = {1: 30, 2: 10, 3: 60}
    assert rounds.submit("g", 3, 0, submitted[3], samples[3]) == (1, 3)
    assert rounds.submit("g", 1, 0, submitted[1], samples[1]) == (2, 3)
    waiting = rounds.join("g", 1, SPLITFED, None)
    assert (waiting.action, waiting.round, waiting.state) == (Action.WAIT, 0, None)
    assert waiting.note == "round 0 waits for members [2]"
    assert closes.seen == []
    assert rounds.submit("g", 2, 0, submitted[2], samples[2]) == (3, 3)

    assert [(g, c.round, c.members, c.missed, c.samples) for g, c in closes.seen] == [("g", 0, (1, 2, 3), (), 100)]
    expected = weighted_average([submitted[m] for m in (1, 2, 3)], [samples[m] for m in (1, 2, 3)])
    contributions = (Contribution(0, 1, 30), Contribution(0, 2, 10), Contribution(0, 3, 60))
    for member in (1, 2, 3):
        answer = rounds.join("g", member, SPLITFED, None)
        assert (answer.action, answer.round, answer.start) == (Action.TRAIN, 1, contributions), member
        assert_close_to(answer.state, expected, f"round 1's start for member {member}")

    last = {m: state(20 + m) for m in (1, 2, 3)}
    for member in (2, 3, 1):
        rounds.submit("g", member, 1, last[member], 5 * member)
    done = rounds.join("g", 2, SPLITFED, None)
    assert (done.action, done.round) == (Action.DONE, 2)
    assert done.start == (Contribution(1, 1, 5), Contribution(1, 2, 10), Contribution(1, 3, 15))
    assert_close_to(done.state, weighted_average([last[1], last[2], last[3]], [5, 10, 15]), "the final state")
    with pytest.raises(PreconditionFailed, match="not open: the group is at its end"):
        rounds.submit("g", 2, 2, last[2], 5)


def test_splitfed_averages_float_weights_only_and_drops_the_optimizer() -> None:
    rounds, _ = make(2)
    rounds.join("g", 1, SPLITFED, state(0))
    a, b = state(1, optimizer=True), state(2, optimizer=True)
    rounds.submit("g", 1, 0, a, 1)
    rounds.submit("g", 2, 0, b, 3)
    answer = rounds.join("g", 1, SPLITFED, None)
    assert_close_to(answer.state, weighted_average([a, b], [1, 3]), "the average")
    assert answer.state is not None and answer.state.weights[2].dtype == np.float64


def test_a_member_submitting_again_to_the_open_round_replaces_its_submission() -> None:
    rounds, _ = make(2)
    rounds.join("g", 1, SPLITFED, state(0))
    rounds.submit("g", 1, 0, state(1), 10)
    assert rounds.submit("g", 1, 0, state(2), 30) == (1, 2)
    rounds.submit("g", 2, 0, state(3), 10)
    answer = rounds.join("g", 1, SPLITFED, None)
    assert answer.start == (Contribution(0, 1, 30), Contribution(0, 2, 10))
    assert_close_to(answer.state, weighted_average([state(2), state(3)], [30, 10]), "the average")


# -- deadlines ----------------------------------------------------------------------------------------------------


def test_a_splitfed_round_closes_at_its_deadline_with_the_members_that_submitted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, LOGGER)
    clock = Clock()
    rounds, closes = make(3, clock, deadline=60.0)
    rounds.join("g", 1, SPLITFED, state(0))
    rounds.submit("g", 1, 0, state(1), 20)
    rounds.submit("g", 3, 0, state(3), 60)
    clock.now += 59.9
    rounds.tick()
    assert closes.seen == []
    assert rounds.join("g", 2, SPLITFED, None).round == 0  # still open for member 2
    clock.now += 0.2
    rounds.tick()

    assert [(c.round, c.members, c.missed, c.samples) for _, c in closes.seen] == [(0, (1, 3), (2,), 80)]
    assert warnings(caplog) == [
        "group g: round 0 closed at its 60 s deadline without member 2; averaged 2 members (80 samples, 60.1 s)"
    ]
    expected = weighted_average([state(1), state(3)], [20, 60])

    # The late member's submission is refused, and it is told to train the next round.
    with pytest.raises(PreconditionFailed, match="round 0 of group 'g' closed without member 2") as refused:
        rounds.submit("g", 2, 0, state(2), 40)
    assert refused.value.status == "FAILED_PRECONDITION"
    answer = rounds.join("g", 2, SPLITFED, None)
    assert (answer.action, answer.round, answer.start) == (
        Action.TRAIN,
        1,
        (Contribution(0, 1, 20), Contribution(0, 3, 60)),
    )
    assert_close_to(answer.state, expected, "round 1's start")

    # A resend from a member the round counted (its reply was lost) is accepted, and changes nothing.
    assert rounds.submit("g", 3, 0, state(99), 7) == (2, 3)
    assert len(closes.seen) == 1
    assert_same_answer(rounds.join("g", 2, SPLITFED, None), answer, "after the resend")
    assert rounds.submit("g", 1, 1, state(4), 5) == (1, 3)  # round 1 went on counting from zero


def test_the_deadline_is_also_enforced_by_a_join() -> None:
    clock = Clock()
    rounds, closes = make(2, clock, deadline=5.0)
    rounds.join("g", 1, SPLITFED, state(0))
    rounds.submit("g", 1, 0, state(1), 3)
    clock.now += 5.0
    answer = rounds.join("g", 2, SPLITFED, None)
    assert (answer.action, answer.round, answer.start) == (Action.TRAIN, 1, (Contribution(0, 1, 3),))
    assert [c.missed for _, c in closes.seen] == [(2,)]


def test_with_fewer_than_min_members_a_round_stays_open_past_its_deadline_and_says_so_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, LOGGER)
    clock = Clock()
    rounds, closes = make(3, clock, deadline=10.0, min_members=2)
    rounds.join("g", 1, SPLITFED, state(0))
    rounds.submit("g", 1, 0, state(1), 4)
    for _ in range(3):
        clock.now += 11.0
        rounds.tick()
        assert rounds.join("g", 2, SPLITFED, None).round == 0
    assert closes.seen == []
    assert warnings(caplog) == [
        "group g: round 0 passed its 10 s deadline with 1 of the 2 submissions it needs; waiting"
    ]
    rounds.submit("g", 2, 0, state(2), 6)
    rounds.tick()
    assert [(c.round, c.members, c.missed) for _, c in closes.seen] == [(0, (1, 2), (3,))]
    assert rounds.join("g", 3, SPLITFED, None).round == 1


# -- round-robin ---------------------------------------------------------------------------------------------------


def test_round_robin_takes_turns_in_member_order_handing_over_the_exact_state() -> None:
    rounds, closes = make(3)
    initial = state(0, optimizer=True)
    previous: PartState = initial
    refs: tuple[Contribution, ...] = ()
    for turn in range(6):
        due = turn % 3 + 1
        for member in (1, 2, 3):
            answer = rounds.join("r", member, ROBIN, initial if turn == 0 else None)
            if member == due:
                assert (answer.action, answer.round, answer.start) == (Action.TRAIN, turn, refs), (turn, member)
                assert_same_state(answer.state, previous, f"turn {turn}'s start")
            else:
                assert (answer.action, answer.round, answer.state) == (Action.WAIT, turn, None), (turn, member)
                assert answer.note == f"turn {turn} (round {turn // 3}, member {due}) is member {due}'s"
        other = due % 3 + 1
        with pytest.raises(PreconditionFailed, match=f"is member {due}'s turn"):
            rounds.submit("r", other, turn, state(50), 1)
        submitted = state(100 + turn, optimizer=True)
        assert rounds.submit("r", due, turn, submitted, 10 + turn) == (1, 3)
        previous, refs = submitted, (Contribution(turn, due, 10 + turn),)
    assert [(c.round, c.members, c.missed) for _, c in closes.seen] == [(t, (t % 3 + 1,), ()) for t in range(6)]
    done = rounds.join("r", 2, ROBIN, None)
    assert (done.action, done.round, done.start) == (Action.DONE, 6, refs)
    assert_same_state(done.state, previous, "the final state")


def test_a_round_robin_turn_skipped_at_its_deadline_keeps_the_previous_state(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, LOGGER)
    clock = Clock()
    rounds, closes = make(3, clock, deadline=30.0)
    rounds.join("r", 1, ROBIN, state(0, optimizer=True))
    handed = state(1, optimizer=True)
    rounds.submit("r", 1, 0, handed, 8)
    clock.now += 31.0
    rounds.tick()
    assert [(c.round, c.members, c.missed) for _, c in closes.seen][1:] == [(1, (), (2,))]
    assert warnings(caplog) == [
        "group r: turn 1 (round 0, member 2) closed at its 30 s deadline without member 2; the turn is skipped"
    ]
    answer = rounds.join("r", 3, ROBIN, None)
    assert (answer.action, answer.round, answer.start) == (Action.TRAIN, 2, (Contribution(0, 1, 8),))
    assert_same_state(answer.state, handed, "the turn after the skipped one")
    with pytest.raises(PreconditionFailed, match="closed without member 2"):
        rounds.submit("r", 2, 1, state(2, optimizer=True), 8)


def test_round_robin_turns_may_hand_over_no_weights() -> None:
    """--handover-dir: the members hand turns over through files, and submit empty states."""
    rounds, _ = make(2)
    rounds.join("r", 1, ROBIN, state(0, optimizer=True))
    assert rounds.submit("r", 1, 0, PartState(), 5) == (1, 2)
    answer = rounds.join("r", 2, ROBIN, None)
    assert (answer.action, answer.round, answer.start) == (Action.TRAIN, 1, (Contribution(0, 1, 5),))
    assert answer.state is not None and answer.state.empty


# -- a restarted member redoes its round ---------------------------------------------------------------------------


@pytest.mark.parametrize("settings", [SPLITFED, ROBIN], ids=["splitfed", "round-robin"])
def test_joining_again_before_submitting_answers_the_same_round_and_state(settings: Settings) -> None:
    rounds, _ = make(2)
    first = rounds.join("g", 1, settings, state(0, optimizer=True))
    assert_same_answer(rounds.join("g", 1, settings, state(5, optimizer=True)), first, "a second join, round 0")
    rounds.submit("g", 1, 0, state(1, optimizer=True), 4)
    if settings.scheme is Scheme.SPLITFED:
        rounds.submit("g", 2, 0, state(2), 4)
    member = 1 if settings.scheme is Scheme.SPLITFED else 2
    again = rounds.join("g", member, settings, None)
    assert again.round == 1
    assert_same_answer(rounds.join("g", member, settings, None), again, "a second join, round 1")


# -- refusals ------------------------------------------------------------------------------------------------------


def test_a_member_stating_other_settings_is_refused_naming_both() -> None:
    rounds, _ = make(2)
    before = rounds.join("g", 1, SPLITFED, state(0))
    for other in (Settings(Scheme.SPLITFED, 3, 1), Settings(Scheme.SPLITFED, 2, 2), ROBIN):
        with pytest.raises(PreconditionFailed) as refused:
            rounds.join("g", 2, other, state(0))
        assert refused.value.status == "FAILED_PRECONDITION"
        assert f"group 'g' trains {SPLITFED}; this member asks for {other}" in str(refused.value)
    assert_same_answer(rounds.join("g", 2, SPLITFED, None), before, "after the refusals")


@pytest.mark.parametrize("name", ["", "a b", "../g", "g/h", "é", "x" * 129, "g\n"])
def test_bad_group_names_are_invalid(name: str) -> None:
    rounds, _ = make(2)
    with pytest.raises(InvalidRequest, match="group: expected 1 to 128 letters"):
        rounds.join(name, 1, SPLITFED, state(0))
    with pytest.raises(InvalidRequest, match="group: expected 1 to 128 letters"):
        rounds.submit(name, 1, 0, state(0), 1)
    assert rounds.groups() == []


@pytest.mark.parametrize("member", [0, 3, 2**32 - 1])
def test_members_outside_one_to_n_are_invalid(member: int) -> None:
    rounds, _ = make(2)
    with pytest.raises(InvalidRequest, match=f"member: expected 1 to 2 .* got {member}"):
        rounds.join("g", member, SPLITFED, state(0))
    assert rounds.groups() == []
    rounds.join("g", 1, SPLITFED, state(0))
    with pytest.raises(InvalidRequest, match=f"member: expected 1 to 2 .* got {member}"):
        rounds.submit("g", member, 0, state(1), 1)


def test_bad_submissions_are_invalid_and_change_nothing() -> None:
    rounds, closes = make(2)
    before = rounds.join("g", 2, SPLITFED, state(0))
    reshaped = state(1)
    reshaped.weights[0] = reshaped.weights[0].reshape(2, 3)
    retyped = state(1)
    retyped.weights[1] = retyped.weights[1].astype(np.float64)
    cases = [
        (state(1), 0, "samples: the samples trained on in the round, at least 1, got 0"),
        (PartState(), 5, "state: SplitFed averages the members' first parts: send the weights"),
        (PartState([], [np.zeros(2)]), 5, "state: 0 weight tensors, expected 3"),
        (PartState(state(1).weights[:2]), 5, "state: 2 weight tensors, expected 3"),
        (reshaped, 5, r"state: weight 0 is float32\[2, 3\], expected float32\[3, 2\]"),
        (retyped, 5, r"state: weight 1 is float64\[2\], expected float32\[2\]"),
    ]
    for bad, samples, message in cases:
        with pytest.raises(InvalidRequest, match=message):
            rounds.submit("g", 1, 0, bad, samples)
    assert_same_answer(rounds.join("g", 1, SPLITFED, None), before, "member 1 after the refusals")
    assert rounds.submit("g", 1, 0, state(1), 5) == (1, 2)  # nothing was counted
    assert closes.seen == []


def test_a_round_robin_state_of_another_shape_is_invalid() -> None:
    rounds, _ = make(2)
    rounds.join("r", 1, ROBIN, state(0, optimizer=True))
    with pytest.raises(InvalidRequest, match="state: 1 weight tensors, expected 3"):
        rounds.submit("r", 1, 0, PartState([np.zeros(3, np.float32)]), 5)


def test_a_first_join_without_the_initial_state_is_refused_and_creates_no_group() -> None:
    rounds, _ = make(2)
    for initial in (None, PartState(), PartState([], [np.zeros(1)])):
        with pytest.raises(
            PreconditionFailed, match=r"group 'g' is not on this aggregator and this join carries no first part"
        ):
            rounds.join("g", 1, SPLITFED, initial)
    assert rounds.groups() == []
    with pytest.raises(SessionNotFound, match="no group 'g' on this aggregator: join it first") as missing:
        rounds.submit("g", 1, 0, state(1), 1)
    assert missing.value.status == "NOT_FOUND"


def test_a_submission_to_a_round_not_open_is_refused() -> None:
    rounds, _ = make(2)
    rounds.join("g", 1, SPLITFED, state(0))
    with pytest.raises(PreconditionFailed, match="round 1 of group 'g' is not open: the group is at round 0"):
        rounds.submit("g", 1, 1, state(1), 1)


# -- persistence ---------------------------------------------------------------------------------------------------


def files(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


@pytest.mark.parametrize("settings", [SPLITFED, ROBIN], ids=["splitfed", "round-robin"])
def test_a_restarted_aggregator_resumes_at_the_same_round_bit_for_bit(tmp_path: Path, settings: Settings) -> None:
    splitfed = settings.scheme is Scheme.SPLITFED
    first, _ = make(3, store=GroupStore(tmp_path))
    reference, _ = make(3)  # the same calls, uninterrupted, kept in memory only
    for rounds in (first, reference):
        rounds.join("g", 1, settings, state(0, optimizer=True))
        for member in (1, 2, 3) if splitfed else (1, 2):  # one round (SplitFed), two turns (round-robin)
            rounds.submit("g", member, 0 if splitfed else member - 1, state(member, optimizer=True), 10 * member)
        if splitfed:
            rounds.submit("g", 2, 1, state(22), 7)  # one submission to the open round
    before = first.join("g", 3, settings, None)
    assert before.action is Action.TRAIN and before.round == (1 if splitfed else 2)
    del first

    second, closes = make(3, store=GroupStore(tmp_path))
    assert_same_answer(second.join("g", 3, settings, None), before, "the resumed round")
    assert closes.seen == []
    if splitfed:
        waiting = second.join("g", 2, settings, None)
        assert (waiting.action, waiting.note) == (Action.WAIT, "round 1 waits for members [1, 3]")
        for rounds in (second, reference):
            rounds.submit("g", 1, 1, state(21), 3)
            rounds.submit("g", 3, 1, state(23), 5)
    else:
        for rounds in (second, reference):
            rounds.submit("g", 3, 2, state(23, optimizer=True), 5)
    after = second.join("g", 1, settings, None)
    assert_same_answer(after, reference.join("g", 1, settings, None), "the next round, resumed and uninterrupted")
    if splitfed:
        assert after.start == (Contribution(1, 1, 3), Contribution(1, 2, 7), Contribution(1, 3, 5))
        assert_close_to(after.state, weighted_average([state(21), state(22), state(23)], [3, 7, 5]), "the average")
    else:
        assert after.start == (Contribution(2, 3, 5),)
        assert_same_state(after.state, state(23, optimizer=True), "the handed-over state")
    # A resend to a round closed before the restart is still recognised.
    assert second.submit("g", 1, 0, state(1), 10) == ((3, 3) if splitfed else (1, 3))


def test_a_group_killed_between_its_last_submission_and_the_close_is_closed_on_load(tmp_path: Path) -> None:
    store = GroupStore(tmp_path)
    first, _ = make(2, store=store)
    first.join("g", 1, SPLITFED, state(0))
    first.submit("g", 1, 0, state(1), 30)
    # What a process killed inside `submit` leaves: member 2's submission and the record naming it, no close.
    store.save_submission("g", 0, 2, state(2))
    store.save_record("g", GroupRecord(SPLITFED, 2, 0, (), {1: 30, 2: 10}, []))
    assert files(tmp_path / "g") == ["group.json", "initial.npz", "round-0-member-1.npz", "round-0-member-2.npz"]

    second, closes = make(2, store=GroupStore(tmp_path))
    answer = second.join("g", 1, SPLITFED, None)
    assert (answer.action, answer.round, answer.start) == (
        Action.TRAIN,
        1,
        (Contribution(0, 1, 30), Contribution(0, 2, 10)),
    )
    assert_close_to(answer.state, weighted_average([state(1), state(2)], [30, 10]), "the average on load")
    assert [(c.round, c.members) for _, c in closes.seen] == [(0, (1, 2))]
    assert files(tmp_path / "g") == ["group.json", "initial.npz", "start-1.npz"]  # the round's files are gone


def test_a_round_robin_turn_killed_before_its_close_is_closed_on_load(tmp_path: Path) -> None:
    store = GroupStore(tmp_path)
    first, _ = make(2, store=store)
    first.join("r", 1, ROBIN, state(0, optimizer=True))
    store.save_submission("r", 0, 1, state(1, optimizer=True))
    store.save_record("r", GroupRecord(ROBIN, 2, 0, (), {1: 4}, []))
    second, _ = make(2, store=GroupStore(tmp_path))
    answer = second.join("r", 2, ROBIN, None)
    assert (answer.action, answer.round, answer.start) == (Action.TRAIN, 1, (Contribution(0, 1, 4),))
    assert_same_state(answer.state, state(1, optimizer=True), "the handed-over state")


def test_a_store_of_another_member_count_is_refused(tmp_path: Path) -> None:
    first, _ = make(2, store=GroupStore(tmp_path))
    first.join("g", 1, SPLITFED, state(0))
    # The kept groups are loaded at start, so the mistake shows there, as a set-up error (exit 2 in the CLI).
    with pytest.raises(ValueError, match="group 'g' was started with 2 members, this aggregator has 3"):
        make(3, store=GroupStore(tmp_path))


def test_a_store_keeps_the_rule_and_refuses_another(tmp_path: Path) -> None:
    median = Aggregation(Rule.MEDIAN)
    first, _ = make(3, store=GroupStore(tmp_path), aggregation=median)
    first.join("g", 1, SPLITFED, state(0))
    with pytest.raises(ValueError, match="group 'g' was combined by median, this aggregator by fedavg: restart it "
                       "with --aggregation median"):  # fmt: skip
        make(3, store=GroupStore(tmp_path))
    again, _ = make(3, store=GroupStore(tmp_path), aggregation=median)  # the same rule: resumed
    assert again.join("g", 2, SPLITFED, None).round == 0


def test_a_store_missing_the_open_rounds_start_is_named(tmp_path: Path) -> None:
    rounds, _ = make(2, store=GroupStore(tmp_path))
    rounds.join("g", 1, SPLITFED, state(0))
    rounds.submit("g", 1, 0, state(1), 1)
    rounds.submit("g", 2, 0, state(2), 1)
    (tmp_path / "g" / "start-1.npz").unlink()
    with pytest.raises(FileNotFoundError, match=r"start-1\.npz: the aggregator's state is incomplete"):
        make(2, store=GroupStore(tmp_path))[0].join("g", 1, SPLITFED, None)


def test_stale_files_are_removed_as_rounds_close(tmp_path: Path) -> None:
    rounds, _ = make(2, store=GroupStore(tmp_path))
    rounds.join("g", 1, SPLITFED, state(0))
    folder = tmp_path / "g"
    (folder / ".start-5.npz.tmp.npz").write_bytes(b"left by a killed write")
    (folder / "round-7-member-1.npz").write_bytes(b"from a round long closed")
    rounds.submit("g", 1, 0, state(1), 1)
    assert files(folder) == ["group.json", "initial.npz", "round-0-member-1.npz"]
    rounds.submit("g", 2, 0, state(2), 1)
    rounds.submit("g", 2, 1, state(3), 1)
    assert files(folder) == ["group.json", "initial.npz", "round-1-member-2.npz", "start-1.npz"]
    rounds.submit("g", 1, 1, state(4), 1)
    assert files(folder) == ["group.json", "initial.npz", "start-2.npz"]
    assert rounds.join("g", 1, SPLITFED, None).action is Action.DONE


# -- long-poll -----------------------------------------------------------------------------------------------------


def test_a_waiting_join_returns_as_soon_as_the_round_closes() -> None:
    rounds = Rounds(2)  # the real clock
    rounds.join("g", 1, SPLITFED, state(0))
    rounds.submit("g", 1, 0, state(1), 1)
    answers: list[tuple[Next, float]] = []

    def wait() -> None:
        began = time.monotonic()
        answer = rounds.join("g", 1, SPLITFED, None, wait=20.0)
        answers.append((answer, time.monotonic() - began))

    waiter = threading.Thread(target=wait)
    waiter.start()
    time.sleep(0.3)
    assert answers == []  # it waits
    rounds.submit("g", 2, 0, state(2), 1)
    waiter.join(timeout=10)
    assert not waiter.is_alive()
    ((answer, seconds),) = answers
    assert (answer.action, answer.round) == (Action.TRAIN, 1)
    assert 0.25 < seconds < 5.0, seconds


def test_a_waiting_join_answers_wait_when_its_time_is_up() -> None:
    rounds = Rounds(2)
    rounds.join("g", 1, SPLITFED, state(0))
    rounds.submit("g", 1, 0, state(1), 1)
    began = time.monotonic()
    answer = rounds.join("g", 1, SPLITFED, None, wait=0.3)
    assert answer.action is Action.WAIT
    assert 0.25 < time.monotonic() - began < 5.0


def test_a_join_waiting_past_the_deadline_for_more_members_sleeps_until_a_submission() -> None:
    """A round kept open past its deadline (fewer than --min-members submitted) changes only when a member
    submits, which wakes the waiting joins: they do not poll in between."""
    reads = 0

    def clock() -> float:
        nonlocal reads
        reads += 1
        return time.monotonic()

    rounds = Rounds(3, deadline=0.05, min_members=2, clock=clock)
    rounds.join("g", 1, SPLITFED, state(0))
    rounds.submit("g", 1, 0, state(1), 1)
    time.sleep(0.1)
    rounds.tick()
    reads = 0
    answer = rounds.join("g", 1, SPLITFED, None, wait=0.5)
    assert answer.action is Action.WAIT
    assert reads < 20, f"the waiting join read the clock {reads} times in 0.5 s"


def test_a_first_part_holding_nan_or_inf_is_refused_and_changes_nothing() -> None:
    """One diverged member must not spoil the average of every other."""
    rounds, closes = make(2)
    rounds.join("g", 1, SPLITFED, state(0))
    for bad in (np.nan, np.inf):
        broken = state(1)
        broken.weights[1][0] = bad
        with pytest.raises(InvalidRequest, match=r"state\.weights\[1\]: holds NaN or Inf"):
            rounds.submit("g", 1, 0, broken, 4)
    with pytest.raises(InvalidRequest, match=r"initial\.weights\[0\]: holds NaN or Inf"):
        poisoned = state(2)
        poisoned.weights[0][0, 0] = np.nan
        rounds.join("h", 1, SPLITFED, poisoned)
    assert [g.name for g in rounds.groups()] == ["g"]
    assert rounds.submit("g", 1, 0, state(1), 4) == (1, 2)  # the member's good part is still welcome
    assert closes.seen == []


def test_kept_groups_are_loaded_at_start_so_their_deadlines_run_without_a_request(tmp_path: Path) -> None:
    clock = Clock()
    first, _ = make(2, clock=clock, store=GroupStore(tmp_path), deadline=60.0)
    first.join("g", 1, SPLITFED, state(0))
    first.submit("g", 1, 0, state(1), 4)
    opened: list[tuple[str, int]] = []
    again, closes = make(2, clock=clock, store=GroupStore(tmp_path), deadline=60.0, on_open=lambda *a: opened.append(a))
    assert [g.name for g in again.groups()] == ["g"] and opened == [("g", 0)]
    clock.now += 61.0
    again.tick()  # no join, no submit since the restart: the round still closes at its deadline
    assert [(c.round, c.members, c.missed) for _, c in closes.seen] == [(0, (1,), (2,))]
    assert opened == [("g", 0), ("g", 1)]


@pytest.mark.parametrize("attack", ["scaled", "sign-flipped"])
def test_a_robust_rule_closes_the_round_near_the_honest_members_where_fedavg_follows_the_hostile_one(
    attack: str,
) -> None:
    initial = state(0)
    honest = {m: PartState([w + 0.01 * (m + 1) for w in initial.weights]) for m in (1, 2, 3)}
    trained = honest[1].weights
    hostile = (
        [100 * w for w in trained]
        if attack == "scaled"
        else [s - 10 * (w - s) for w, s in zip(trained, initial.weights, strict=True)]
    )
    reference = weighted_average(list(honest.values()), [10, 10, 10])
    distances = {}
    for rule in (
        FEDAVG,
        Aggregation(Rule.MEDIAN),
        Aggregation(Rule.TRIMMED_MEAN, 0.25),
        Aggregation(Rule.NORM_BOUNDED),
    ):
        rounds = Rounds(4, aggregation=rule)
        assert rounds.join("g", 1, SPLITFED, initial).action is Action.TRAIN
        for member, submitted in (*honest.items(), (4, PartState(hostile))):
            rounds.submit("g", member, 0, submitted, 10)
        start = rounds.join("g", 1, SPLITFED, None).state
        assert start is not None and start.optimizer == []
        distances[rule.rule] = max(
            float(np.max(np.abs(a.astype(np.float64) - b))) for a, b in zip(start.weights, reference, strict=True)
        )
    for robust in (Rule.MEDIAN, Rule.TRIMMED_MEAN, Rule.NORM_BOUNDED):
        assert distances[robust] < distances[Rule.FEDAVG] / 2, distances  # clipping bounds it; the others drop it


def test_norm_bounded_measures_updates_from_the_rounds_start_also_after_a_restart(tmp_path: Path) -> None:
    rule = Aggregation(Rule.NORM_BOUNDED, bound=0.5)
    initial = state(0)
    rounds = Rounds(2, store=GroupStore(tmp_path), aggregation=rule)
    rounds.join("g", 1, SPLITFED, initial)
    for member in (1, 2):
        rounds.submit("g", member, 0, state(member), 10)
    start_1 = rounds.join("g", 1, SPLITFED, None).state
    assert start_1 is not None
    expected = norm_bounded([state(1), state(2)], [10, 10], PartState(initial.weights), 0.5)
    assert_arrays_equal(start_1.weights, expected.weights, "round 1's start")
    again = Rounds(2, store=GroupStore(tmp_path), aggregation=rule)  # restarted: round 1 from the stored start
    for member in (1, 2):
        again.submit("g", member, 1, state(10 + member), 10)
    final = again.join("g", 1, SPLITFED, None)
    assert final.action is Action.DONE and final.state is not None
    expected = norm_bounded([state(11), state(12)], [10, 10], start_1, 0.5)
    assert_arrays_equal(final.state.weights, expected.weights, "the final state")


def test_a_trimmed_mean_that_trims_nothing_for_the_member_count_is_named_at_start(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        Rounds(4, aggregation=Aggregation(Rule.TRIMMED_MEAN, 0.25))
        assert not caplog.records
        Rounds(3, aggregation=Aggregation(Rule.TRIMMED_MEAN, 0.25))
    assert "trims nothing (floor(0.25 x 3) = 0)" in caplog.text and "at least 0.333" in caplog.text
