"""Deadlines and dropouts (docs/multi_client.md, "Deadlines and dropouts"), with real processes: a member killed
mid-round is gone at the round's deadline, the round closes without it (SplitFed: averaged over the members that
handed in; round-robin: the turn is skipped and the next starts where the skipped one would have), training goes
on, and the member, restarted, comes back in the round open when it returns.

Timing. A member's process takes seconds to start (TensorFlow's import), more on a busy machine, and the deadline
must hold each round of the members that take part. So that a short deadline is safe whatever the load, every
member reaches the server (and the aggregator inside it) through a forwarding proxy of its own: the proxies open
together once every member process has started, so round 0 starts for all at once; the killed member is restarted
at once with the same flags but its proxy stays closed until the round it missed has closed, so it comes back
then, already started, and in time for the round after.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults_support import make_npz
from tests.group_support import Run, member_name

pytestmark = pytest.mark.processes  # every test here starts OS processes

DEADLINE = 10.0  # seconds: a live member's round (turn) here takes one to three on a busy machine


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_npz(tmp_path_factory.mktemp("group-dropouts") / "data.npz", n_train=192, n_test=64)


def test_splitfed_round_closes_at_its_deadline_without_a_killed_member_which_rejoins_the_next(
    tmp_path: Path, dataset: Path
) -> None:
    run = Run(tmp_path / "run", dataset, members=3, rounds=3, deadline=DEADLINE, proxied=(1, 2, 3))
    try:
        run.start()
        run.open_proxies_when_ready()
        run.wait_log("server", r"opened session \w+ at step 0 for group g, splitfed round 1, member 3 ")
        run.kill("member-3")  # mid-round 1: its session is open, its part not handed in
        run.close_proxy(3)
        run.restart("member-3")
        run.wait_log("server", r"group g: round 1 closed at its ")
        run.open_proxy(3)
        run.finish()
    finally:
        run.close()
    log = run.text("server")  # the aggregator is inside the server
    assert f"group g: round 1 closed at its {DEADLINE:g} s deadline without member 3; averaged 2 members" in log, log
    for round_ in (0, 2):
        assert f"group g: round {round_} closed with 3 members " in log, log
    assert run.count("server", r"kept the part of member 3 for g round 1 ") == 0
    assert run.count("server", r"kept the part of member [12] for g round 1 ") == 2
    # Members 1 and 2 trained on; member 3's restarted process trained from the round after the one it missed.
    assert run.rounds_trained("member-1") == run.rounds_trained("member-2") == [0, 1, 2]
    assert run.rounds_trained("member-3") == [2]
    finals = {k: run.history(member_name(k))["final_test"] for k in (1, 2, 3)}
    assert finals[1] == finals[2] == finals[3], finals  # one group model at the end


def test_round_robin_turn_not_taken_is_skipped_and_the_next_starts_from_the_state_before(
    tmp_path: Path, dataset: Path
) -> None:
    """Three members take turns 0-5 (2 rounds); member 2 is killed in its turn 1, which is skipped at the
    deadline: member 3's turn 2 starts from the state turn 0 ended with (both parts, optimizer state too), so it
    evaluates that start exactly as member 1 evaluated its model at the end of turn 0. Member 2, back, takes its
    turn 4."""
    run = Run(
        tmp_path / "run", dataset, members=3, rounds=2, deadline=DEADLINE, scheme="round-robin", proxied=(1, 2, 3)
    )
    try:
        run.start()
        run.open_proxies_when_ready()
        run.wait_log("server", r"opened session \w+ at step \d+ for group g, round-robin round 1, member 2 ")
        run.kill("member-2")
        run.close_proxy(2)
        run.restart("member-2")
        run.wait_log("server", r"group g: turn 1 \(round 0, member 2\) closed at its ")
        run.open_proxy(2)
        run.finish()
    finally:
        run.close()
    log = run.text("server")
    assert (
        f"group g: turn 1 (round 0, member 2) closed at its {DEADLINE:g} s deadline without member 2; the turn is "
        "skipped" in log
    ), log
    assert run.count("server", r"kept the part of member 2 for g round 1 ") == 0
    assert run.rounds_trained("member-1") == [0, 3]
    assert run.rounds_trained("member-2") == [4]
    assert run.rounds_trained("member-3") == [2, 5]
    turn_0 = run.history("member-1")["rounds"][0]
    turn_2 = run.history("member-3")["rounds"][0]
    assert turn_2["start_test"] == turn_0["local_test"], (turn_2, turn_0)
