"""Faults in multi-client training (docs/multi_client.md, "Faults"): kill -9 a member, the server or a separate
split-aggregator mid-round, restart it with the same flags, and the group ends with the same weights as an
uninterrupted run, bit for bit; and round-robin handing turns over through files equals handing them over
through the aggregator, bit for bit.

Why bit for bit, not merely close: the round is the unit of recovery. A round's steps are a fixed function of
its start (both parts: the aggregator's first part and the server's contributions, kept as exact .npz copies),
the member's shard (a permutation drawn from --seed) and each epoch's order (drawn from --seed and the epoch's
number, which a member numbers from its rounds); SplitFed gives each round a fresh optimizer on both sides, and
FedAvg is numpy over the members in member order. A killed attempt leaves nothing behind that a retry reads (a
group round's session keeps no checkpoints and is never resumed; a submission or contribution is written whole
or not at all), so the round trained again runs the same TensorFlow ops on the same inputs in the same order in
processes built from the same flags on the same machine, and TensorFlow's CPU kernels give the same bits for the
same ops, shapes and thread counts. The aggregator apart from the server averages with the same code as the one
inside it, so the run that kills it is held to the same reference.

The observables: each member's --save-weights (the group's final first part), the server's --save-weights (the
part of the session used last: a member's final-evaluation session, whose part is the average of the last
round's contributions) and the contributions the server keeps under --checkpoint-dir/contributions.d (the last
round's, weights and optimizer state).
"""

from __future__ import annotations

import signal
from pathlib import Path

import grpc
import numpy as np
import pytest

from client_part.aggregator_link import AggregatorLink
from client_part.retry import RetryPolicy
from client_part.transport import RemoteError
from splitlearning import part_state
from splitlearning.groups import Action, Scheme, Settings
from splitlearning.part_state import PartState
from tests.exactness_support import assert_same
from tests.faults_support import free_port, make_npz, spawn, stop, wait_for
from tests.group_support import RUN_TIMEOUT, Run, member_name

pytestmark = pytest.mark.processes  # every test here starts OS processes

MEMBERS, ROUNDS = 2, 3
DEADLINE = 300.0  # no round closes at its deadline here: every member trains every round
OPENED = r"opened session \w+ at step 0 for group g, splitfed round {round}, member {member} "


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("group-faults")


@pytest.fixture(scope="module")
def dataset(workdir: Path) -> Path:
    return make_npz(workdir / "data.npz", n_train=256, n_test=64)  # 128 samples a member: 2 steps a round


def new_run(workdir: Path, dataset: Path, name: str, separate_aggregator: bool = False) -> Run:
    return Run(
        workdir / name, dataset, members=MEMBERS, rounds=ROUNDS, deadline=DEADLINE,
        separate_aggregator=separate_aggregator,
    )  # fmt: skip


@pytest.fixture(scope="module")
def reference(workdir: Path, dataset: Path) -> Run:
    """The uninterrupted run (SplitFed, the aggregator inside the server)."""
    run = new_run(workdir, dataset, "reference")
    try:
        run.start(groups=(("g", ("--log-dir", str(run.base / "tb"))),))  # TensorBoard changes no weight
        run.finish()
    finally:
        run.close()
    for k in range(1, MEMBERS + 1):
        assert run.rounds_trained(member_name(k)) == list(range(ROUNDS))
    initial, _ = part_state.load(run.base / "server-ckpt" / "aggregator.d" / "g" / "initial.npz")
    final = run.member_weights("member-1")
    assert len(final) == len(initial.weights)
    assert not any(np.array_equal(a, b) for a, b in zip(final, initial.weights, strict=True)), "nothing trained"
    return run


def test_each_member_records_its_rounds_for_people_scripts_and_tensorboard(reference: Run) -> None:
    """The summary table, --history-json and TensorBoard's round/* scalars, per member and round; every member
    evaluates the same group model at the start of each round and at the end (SplitFed)."""
    from splitlearning.events import read_scalars

    histories = [reference.history(member_name(k)) for k in range(1, MEMBERS + 1)]
    for k, history in enumerate(histories, start=1):
        assert (history["group"], history["member"], history["scheme"]) == ("g", k, "splitfed")
        assert [r["round"] for r in history["rounds"]] == list(range(ROUNDS))
        for record in history["rounds"]:
            assert record["samples"] == 128 and record["seconds"] > 0
            assert set(record["start_test"]) == set(record["local_test"]) == {"loss", "accuracy"}
        text = reference.text(member_name(k))
        assert f"member {k} of group g: {ROUNDS} rounds trained (splitfed)" in text
        assert text.count("\n    2 |     128 |") == 1, text[-2000:]  # the table's row of round 2
        assert f"the group's final model: test accuracy {history['final_test']['accuracy']:.4f}" in text
        scalars = read_scalars(reference.base / "tb" / "client" / f"g-member-{k}")
        assert [step for step, _ in scalars["round/local_test_accuracy"]] == list(range(ROUNDS))
        assert [step for step, _ in scalars["round/start_test_accuracy"]] == list(range(ROUNDS + 1))
        assert scalars["round/start_test_accuracy"][-1][1] == pytest.approx(history["final_test"]["accuracy"])
    for round_ in range(ROUNDS):
        starts = {tuple(sorted(h["rounds"][round_]["start_test"].items())) for h in histories}
        assert len(starts) == 1, f"round {round_}: the members evaluated different group models: {starts}"
    assert len({tuple(sorted(h["final_test"].items())) for h in histories}) == 1


def assert_same_result(run: Run, reference: Run) -> None:
    for name in ("server", "aggregator"):  # wherever the aggregator ran: every round closed with every member
        assert "closed at its" not in run.text(name), run.text(name)
    for k in range(1, MEMBERS + 1):
        name = member_name(k)
        assert_same(run.member_weights(name), reference.member_weights(name), f"{name}'s final first part")
    expected = reference.contributions()
    assert sorted(expected) == [f"round-{ROUNDS - 1}-member-{k}" for k in range(1, MEMBERS + 1)]
    actual = run.contributions()
    assert sorted(actual) == sorted(expected)
    for name, weights in expected.items():
        assert_same(actual[name], weights, f"the server's contribution {name}")
    assert_same(run.server_weights(), reference.server_weights(), "the server's final second part")


def test_member_killed_mid_round_trains_the_round_again_from_the_same_start(
    workdir: Path, dataset: Path, reference: Run
) -> None:
    run = new_run(workdir, dataset, "member")
    try:
        run.start()
        run.wait_log("server", OPENED.format(round=1, member=1))  # member 1's round 1 is under way
        run.kill("member-1")
        run.restart("member-1")
        run.finish()
    finally:
        run.close()
    # The restarted member asked the aggregator and trained round 1 (not yet handed in) again, in a new session.
    assert run.rounds_trained("member-1") == [1, 2]
    assert run.rounds_trained("member-2") == [0, 1, 2]
    assert run.count("server", OPENED.format(round=1, member=1)) == 2
    assert run.count("server", r"kept the part of member 1 for g round 1 ") == 1
    assert_same_result(run, reference)


def test_server_killed_mid_round_members_retry_and_train_the_round_again(
    workdir: Path, dataset: Path, reference: Run
) -> None:
    run = new_run(workdir, dataset, "server")
    try:
        run.start()
        run.wait_log("server", OPENED.format(round=1, member=r"\d"))  # round 1 is under way
        run.kill("server")  # and the aggregator inside it
        restarted = len(run.text("server"))
        run.restart("server")
        run.finish()
    finally:
        run.close()
    after = run.text("server")[restarted:]
    # The aggregator went on from its state under --checkpoint-dir, in round 1; the members trained round 1 in
    # new sessions (the sessions they were in are not resumed: the round is trained again from its start).
    assert "group g: resumed at round 1 with " in after, after
    assert "resumed session" not in after, after
    assert "splitfed round 1, member" in after, after
    for k in range(1, MEMBERS + 1):
        assert run.rounds_trained(member_name(k)) == [0, 1, 2]
    assert_same_result(run, reference)


def test_aggregator_killed_mid_round_members_retry_until_it_is_back(
    workdir: Path, dataset: Path, reference: Run
) -> None:
    run = new_run(workdir, dataset, "aggregator", separate_aggregator=True)
    failed = r"(join|submit round \d) failed \(\w+ (group g at|round \d to) the aggregator .*UNAVAILABLE"
    names = [member_name(k) for k in range(1, MEMBERS + 1)]
    try:
        run.start()
        run.wait_log("server", OPENED.format(round=1, member=1))
        run.wait_log("server", OPENED.format(round=1, member=2))  # both members train round 1
        run.kill("aggregator")
        # A member asks the aggregator, or hands its round in, while it is down, and retries.
        wait_for(lambda: any(run.count(name, failed) for name in names), RUN_TIMEOUT, "a member to retry")
        run.restart("aggregator")
        run.finish()
    finally:
        run.close()
    log = run.text("aggregator")
    assert log.count("group g: resumed at round 1 with ") == 1, log  # from --state-dir, in the round it was killed in
    assert "group g: round 1 closed with 2 members" in log, log
    for k in range(1, MEMBERS + 1):
        assert run.rounds_trained(member_name(k)) == [0, 1, 2]
    assert_same_result(run, reference)


def test_round_robin_hand_over_through_files_equals_through_the_aggregator(tmp_path: Path, dataset: Path) -> None:
    """Two groups on one server, the same flags but --handover-dir for one: each hands 4 turns over (2 members,
    2 rounds); both end with the same first part (each member's --save-weights) and the same last contribution
    (the second part with its optimizer state), bit for bit."""
    handover = tmp_path / "handover"
    handover.mkdir()
    run = Run(tmp_path / "run", dataset, members=2, rounds=2, deadline=DEADLINE, scheme="round-robin")
    try:
        run.start([("files", ["--handover-dir", str(handover)]), ("agg", [])])
        run.finish()
    finally:
        run.close()
    turns = 2 * 2
    assert sorted(path.name for path in handover.iterdir()) == [f"files-turn-{t}.npz" for t in range(turns)]
    for group in ("files", "agg"):
        assert run.rounds_trained(member_name(1, group)) == [0, 2]
        assert run.rounds_trained(member_name(2, group)) == [1, 3]
    for k in (1, 2):
        assert_same(
            run.member_weights(member_name(k, "files")), run.member_weights(member_name(k, "agg")), f"member {k}"
        )
    files, agg = run.contributions("files"), run.contributions("agg")
    assert sorted(files) == sorted(agg) == [f"round-{turns - 1}-member-2"]
    assert_same(files[f"round-{turns - 1}-member-2"], agg[f"round-{turns - 1}-member-2"], "the last contribution")


def test_aggregator_restarted_without_state_dir_says_the_rounds_were_lost(tmp_path: Path) -> None:
    """Without --state-dir a restart loses the groups' rounds; a member, whose joins after its first carry no
    first part, is told so with FAILED_PRECONDITION naming the flag (split-client exits 1 on it), and the group
    is not started again from scratch."""
    port = free_port()
    args = ["--address", f"127.0.0.1:{port}", "--members", "2", "--round-deadline", "0", "--log-level", "INFO"]
    settings = Settings(Scheme.SPLITFED, 2, 1)
    link = AggregatorLink(f"127.0.0.1:{port}", "g", 1, settings, rpc_timeout=10.0, policy=RetryPolicy(timeout=60.0))
    aggregator = spawn("aggregator", args, tmp_path / "aggregator.log")
    try:
        first = link.join(PartState([np.ones((2, 2), np.float32)]))  # a member's first join starts the group
        assert (first.action, first.round) == (Action.TRAIN, 0)
        assert stop(aggregator, signal.SIGKILL) == -signal.SIGKILL
        aggregator = spawn("aggregator", args, tmp_path / "aggregator.log")
        with pytest.raises(RemoteError) as refused:
            link.join(None)  # retried until the aggregator is back
        assert refused.value.code is grpc.StatusCode.FAILED_PRECONDITION, refused.value
        assert "--state-dir" in refused.value.details, refused.value
    finally:
        link.close()
        stop(aggregator)
    assert (tmp_path / "aggregator.log").read_text().count("group g: 2 members train ") == 1  # not started again
