"""The server side of multi-client training (docs/multi_client.md): sessions opened for a group's round
(`HandshakeRequest.group`), contributions kept by `CloseSession(contribute_samples=n)`, and the parts that
later rounds start from, against a real `SplitServer` over raw stubs.

Weights are compared bit for bit with what the test computes from the closed sessions' own weights: the
server's average is a fixed function of its inputs (float64, in the order of `start`, cast back).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from server_part import SplitServer
from server_part.server import CONTRIBUTIONS_FOLDER
from splitlearning.groups import Membership, Scheme
from splitlearning.part_state import PartState
from splitlearning.v1 import split_learning_pb2 as pb
from splitlearning.v1 import split_learning_pb2_grpc as pb_grpc
from tests import raw_support as raw
from tests.conftest import assert_same_snapshot, build_top, make_loss, server_snapshot
from tests.exactness_support import assert_same
from tests.group_support import fedavg
from tests.raw_support import refused, training

TIMEOUT = 20.0
GROUP = "hospitals"
SPLITFED, ROUND_ROBIN = pb.SCHEME_SPLITFED, pb.SCHEME_ROUND_ROBIN


@pytest.fixture
def serve() -> Iterator[Callable[..., tuple[SplitServer, pb_grpc.SplitLearningServiceStub]]]:
    started: list[tuple[SplitServer, grpc.Channel]] = []

    def start(**kwargs: Any) -> tuple[SplitServer, pb_grpc.SplitLearningServiceStub]:
        kwargs.setdefault("max_batch_size", 16)
        server = SplitServer(build_top("plain", 3), make_loss(), "adam", ["accuracy"], **kwargs)
        channel = grpc.insecure_channel(f"127.0.0.1:{server.start('127.0.0.1:0')}")
        started.append((server, channel))
        return server, pb_grpc.SplitLearningServiceStub(channel)

    yield start
    for server, channel in started:
        channel.close()
        server.stop(grace=1.0)


def contribution(round_: int, member: int, samples: int) -> pb.Contribution:
    return pb.Contribution(round=round_, member=member, samples=samples)


def group_round(
    round_: int = 0,
    member: int = 1,
    scheme: Any = SPLITFED,
    start: Sequence[pb.Contribution] = (),
    group: str = GROUP,
) -> pb.GroupRound:
    return pb.GroupRound(group=group, round=round_, member=member, scheme=scheme, start=list(start))


# A member's handshake (client "member", whose CloseSession requests name it too; no batch size) and steps.
handshake = partial(raw.handshake, client_id="member", max_batch_size=0, timeout=TIMEOUT)
train_steps = partial(raw.train_steps, timeout=TIMEOUT)


def close(stub: pb_grpc.SplitLearningServiceStub, session: str, samples: int = 0) -> pb.CloseSessionResponse:
    request = pb.CloseSessionRequest(session_id=session, client_id="member", contribute_samples=samples)
    reply: pb.CloseSessionResponse = stub.CloseSession(request, timeout=TIMEOUT)
    return reply


def weights_of(server: SplitServer, session: str) -> list[np.ndarray]:
    trainer = server.session(session).trainer
    trainer.settle()
    return [np.array(w) for w in trainer.model.get_weights()]


def optimizer_of(server: SplitServer, session: str) -> list[np.ndarray]:
    trainer = server.session(session).trainer
    trainer.settle()
    return [np.array(v.numpy()) for v in trainer.optimizer.variables]


def contribute(
    server: SplitServer,
    stub: pb_grpc.SplitLearningServiceStub,
    group: pb.GroupRound,
    steps: int,
    samples: int,
    seed: int,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """One member's round: open its session, train `steps` steps, close it contributing `samples`; the part's
    (weights, optimizer variables) as they were at the close."""
    reply = handshake(stub, group=group)
    train_steps(stub, reply.session_id, reply.next_step, steps, seed)
    weights, optimizer = weights_of(server, reply.session_id), optimizer_of(server, reply.session_id)
    close(stub, reply.session_id, samples)
    return weights, optimizer


def held(server: SplitServer) -> list[tuple[str, int, int]]:
    """The (group, round, member) of every contribution the server holds in memory."""
    return sorted(server.sessions.contributions._held)


# -- SplitFed ------------------------------------------------------------------------------------------------


def test_splitfed_rounds_start_from_the_sample_weighted_average_with_a_fresh_optimizer(serve: Any) -> None:
    server, stub = serve()
    initial = [np.array(w) for w in build_top("plain", 3).get_weights()]
    first = handshake(stub, group=group_round(0, 1))
    assert first.next_step == 0 and first.session_id
    session = server.session(first.session_id)
    assert session.membership is not None and session.membership.member == 1
    assert_same(
        weights_of(server, first.session_id), initial, "round 0 starts from the initial weights", same_dtype=True
    )
    train_steps(stub, first.session_id, 0, 3, seed=1)
    one = weights_of(server, first.session_id)
    assert close(stub, first.session_id, 12).steps == 3
    two, _ = contribute(server, stub, group_round(0, 2), steps=2, samples=8, seed=2)
    assert held(server) == [(GROUP, 0, 1), (GROUP, 0, 2)]
    assert not server.sessions.sessions(), "contributing closes the session"

    start = [contribution(0, 1, 12), contribution(0, 2, 8)]
    reply = handshake(stub, group=group_round(1, 1, start=start))
    assert reply.next_step == 0
    expected = fedavg([one, two], [12, 8])
    assert_same(weights_of(server, reply.session_id), expected, "round 1's start", same_dtype=True)
    textbook = [(12 * a.astype(np.float64) + 8 * b.astype(np.float64)) / 20 for a, b in zip(one, two, strict=True)]
    for actual, exact in zip(weights_of(server, reply.session_id), textbook, strict=True):
        np.testing.assert_allclose(actual, exact, rtol=1e-6, atol=1e-7)  # sum(n_k w_k) / sum(n_k), to float32
    trainer = server.session(reply.session_id).trainer
    assert trainer.iterations == 0
    for variable in trainer.optimizer.variables[2:]:  # Adam's moments (after its step count and learning rate)
        assert not np.any(variable.numpy()), f"{variable.path} is not fresh"
    # The other member starts round 1 from the same point; the order of `start` is the order of the sum.
    other = handshake(stub, group=group_round(1, 2, start=start))
    assert_same(weights_of(server, other.session_id), expected, "member 2's round 1 start", same_dtype=True)
    swapped = handshake(stub, group=group_round(1, 2, start=start[::-1]))
    assert_same(
        weights_of(server, swapped.session_id), fedavg([two, one], [8, 12]), "start in the other order", same_dtype=True
    )


def test_a_later_contribution_of_the_same_member_to_the_same_round_replaces_the_earlier(serve: Any) -> None:
    server, stub = serve()
    contribute(server, stub, group_round(0, 1), steps=1, samples=4, seed=1)
    again, _ = contribute(server, stub, group_round(0, 1), steps=2, samples=8, seed=2)
    code, details = refused(lambda: handshake(stub, group=group_round(1, 1, start=[contribution(0, 1, 4)])))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "8 samples" in details
    reply = handshake(stub, group=group_round(1, 1, start=[contribution(0, 1, 8)]))
    assert_same(
        weights_of(server, reply.session_id), fedavg([again], [8]), "the replacing contribution", same_dtype=True
    )


# -- round-robin ---------------------------------------------------------------------------------------------


def test_round_robin_takes_over_weights_optimizer_state_and_step_count(serve: Any) -> None:
    server, stub = serve()
    weights, optimizer = contribute(server, stub, group_round(0, 1, ROUND_ROBIN), steps=3, samples=12, seed=1)
    assert int(optimizer[0]) == 3 and any(np.any(o) for o in optimizer[2:]), "Adam's state was not captured"
    reply = handshake(stub, group=group_round(1, 2, ROUND_ROBIN, start=[contribution(0, 1, 12)]))
    assert reply.next_step == 3, "the turn goes on counting the contributed steps"
    assert server.session(reply.session_id).next_step == 3
    assert_same(weights_of(server, reply.session_id), weights, "weights", same_dtype=True)
    assert_same(optimizer_of(server, reply.session_id), optimizer, "optimizer variables", same_dtype=True)
    train_steps(stub, reply.session_id, 3, 1, seed=2)  # step 3 is the next one
    close(stub, reply.session_id, 4)

    two = [contribution(0, 1, 12), contribution(1, 2, 4)]
    before = server_snapshot(server)
    code, details = refused(lambda: handshake(stub, group=group_round(2, 1, ROUND_ROBIN, start=two)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "round-robin starts from one contribution" in details
    assert_same_snapshot(before, server_snapshot(server))


def test_a_members_new_session_supersedes_the_one_it_left_behind(serve: Any) -> None:
    """A killed member trains its round again in a new session: the old one is dropped at once (it would hold a
    slot of --max-sessions until it expired), also when the server is full; other members' sessions stay."""
    server, stub = serve(max_sessions=2)
    left = handshake(stub, group=group_round(0, 1)).session_id
    train_steps(stub, left, 0, 1, seed=1)
    other = handshake(stub, group=group_round(0, 2)).session_id
    # The server is full: the left-behind session makes room.
    again = handshake(stub, group=group_round(0, 1)).session_id
    assert sorted(s.id for s in server.sessions.sessions()) == sorted([other, again])
    code, details = refused(lambda: train_steps(stub, left, 1, 1, seed=1))
    assert code == grpc.StatusCode.NOT_FOUND, details
    with training(stub, other), training(stub, again):  # in use: a full server evicts neither
        code, _ = refused(lambda: handshake(stub, group=group_round(0, 3)))  # a third member: none of its own to drop
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert sorted(s.id for s in server.sessions.sessions()) == sorted([other, again])


def test_a_group_session_keeps_no_checkpoints_on_a_server_that_keeps_them(serve: Any, tmp_path: Path) -> None:
    """The round is the unit of recovery: a lost round is trained again in a new session, never resumed."""
    server, stub = serve(checkpoint_dir=tmp_path, checkpoint_every=1)
    reply = handshake(stub, group=group_round(0, 1, ROUND_ROBIN))
    train_steps(stub, reply.session_id, 0, 2, seed=1)
    assert server.session(reply.session_id).checkpoints is None
    assert not close(stub, reply.session_id, 8).checkpointed
    assert not (tmp_path / reply.session_id).exists()
    code, details = refused(lambda: handshake(stub, session_id=reply.session_id))
    assert code == grpc.StatusCode.NOT_FOUND, details
    assert held(server) == [(GROUP, 0, 1)]  # its contribution is kept, on disk too
    assert (tmp_path / "contributions.d" / GROUP / "round-0-member-1.npz").is_file()


# -- refusals ------------------------------------------------------------------------------------------------


def test_a_start_naming_a_contribution_the_server_does_not_hold_is_failed_precondition(serve: Any) -> None:
    server, stub = serve()
    contribute(server, stub, group_round(0, 1), steps=1, samples=4, seed=1)
    before = server_snapshot(server)
    for start in ([contribution(0, 2, 4)], [contribution(0, 1, 4), contribution(0, 3, 4)]):
        code, details = refused(lambda: handshake(stub, group=group_round(1, 1, start=start)))  # noqa: B023
        assert code == grpc.StatusCode.FAILED_PRECONDITION, details
        assert "holds no part of member" in details and "the group cannot go on from it" in details
        assert "keeps no checkpoints" in details
    code, details = refused(lambda: handshake(stub, group=group_round(1, 1, start=[contribution(0, 1, 5)])))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "4 samples" in details, details
    assert_same_snapshot(before, server_snapshot(server))
    assert held(server) == [(GROUP, 0, 1)]


def test_a_round_robin_turn_cannot_start_from_a_splitfed_contribution(serve: Any) -> None:
    """A SplitFed contribution holds no optimizer state: a turn started from it would silently reset Adam."""
    server, stub = serve()
    contribute(server, stub, group_round(0, 1), steps=1, samples=4, seed=1)
    before = server_snapshot(server)
    turn = group_round(1, 2, scheme=pb.SCHEME_ROUND_ROBIN, start=[contribution(0, 1, 4)])
    code, details = refused(lambda: handshake(stub, group=turn))
    assert code == grpc.StatusCode.FAILED_PRECONDITION, details
    assert "holds no optimizer state" in details and "SplitFed" in details
    assert_same_snapshot(before, server_snapshot(server))


def test_contribute_samples_in_a_session_without_a_group_is_failed_precondition(serve: Any) -> None:
    server, stub = serve()
    session = handshake(stub).session_id
    code, details = refused(lambda: close(stub, session, 4))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "trains no group round" in details
    assert server.session(session) is not None, "the refused close closed the session"
    assert close(stub, session).steps == 0
    assert not held(server)


def test_a_contributing_close_sent_again_after_a_lost_reply_is_answered_again(serve: Any, tmp_path: Path) -> None:
    """The close's reply was lost, the member sends it again: the same answer, the contribution unchanged; a
    close of the ended session naming other samples is NOT_FOUND, as any unknown session."""
    server, stub = serve(checkpoint_dir=tmp_path)
    session = handshake(stub, group=group_round(0, 1)).session_id
    train_steps(stub, session, 0, 3, seed=1)
    first = close(stub, session, 12)
    kept = [np.array(w) for w in server.sessions.contributions._held[(GROUP, 0, 1)][0].weights]
    again = close(stub, session, 12)
    assert (again.steps, again.checkpointed) == (first.steps, first.checkpointed) == (3, False)
    assert_same(
        server.sessions.contributions._held[(GROUP, 0, 1)][0].weights, kept, "the kept contribution", same_dtype=True
    )
    code, details = refused(lambda: close(stub, session, 13))
    assert code == grpc.StatusCode.NOT_FOUND, details
    code, details = refused(lambda: close(stub, session))  # not a contributing close: an ended session
    assert code == grpc.StatusCode.NOT_FOUND, details


def test_contributing_a_session_no_longer_in_memory_is_refused(serve: Any, tmp_path: Path) -> None:
    server, stub = serve(checkpoint_dir=tmp_path)
    session = handshake(stub, group=group_round(0, 1)).session_id
    train_steps(stub, session, 0, 1, seed=1)
    assert not close(stub, session).checkpointed  # closed without contributing; group sessions keep no checkpoints
    code, details = refused(lambda: close(stub, session, 4))
    assert code == grpc.StatusCode.NOT_FOUND, details
    assert not held(server)
    # A session with checkpoints, not in memory, is no group round's session: FAILED_PRECONDITION, saying so.
    plain = handshake(stub).session_id
    assert close(stub, plain).checkpointed
    code, details = refused(lambda: close(stub, plain, 4))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "trains no group round" in details, details
    assert not held(server)


MALFORMED: dict[str, tuple[pb.GroupRound, str]] = {
    "empty name": (group_round(group=""), "letters, digits"),
    "name with a slash": (group_round(group="../etc"), "letters, digits"),
    "name too long": (group_round(group="g" * 129), "at most 128 characters"),
    "member 0": (group_round(member=0), "members count from 1"),
    "scheme unspecified": (group_round(scheme=pb.SCHEME_UNSPECIFIED), "group.scheme"),
    "member twice in start": (group_round(1, start=[contribution(0, 1, 4)] * 2), "twice"),
    "samples 0": (group_round(1, start=[contribution(0, 1, 0)]), "samples from 1"),
    "start member 0": (group_round(1, start=[contribution(0, 0, 4)]), "members count from 1"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_group_is_invalid_argument_and_changes_nothing(case: str, serve: Any) -> None:
    server, stub = serve()
    contribute(server, stub, group_round(0, 1), steps=1, samples=4, seed=1)
    handshake(stub)  # a session in memory, which the refusal must leave alone
    before = server_snapshot(server)
    group, words = MALFORMED[case]
    code, details = refused(lambda: handshake(stub, group=group))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and words in details, details
    assert_same_snapshot(before, server_snapshot(server))
    assert held(server) == [(GROUP, 0, 1)]


def test_a_group_handshake_refused_for_the_session_limit_forgets_no_contribution(serve: Any, tmp_path: Path) -> None:
    """Contributions of rounds before a start's are forgotten only once its session is open."""
    server, stub = serve(checkpoint_dir=tmp_path, max_sessions=1)
    contribute(server, stub, group_round(0, 1), steps=1, samples=4, seed=1)
    contribute(server, stub, group_round(1, 1, start=[contribution(0, 1, 4)]), steps=1, samples=4, seed=2)
    folder = tmp_path / CONTRIBUTIONS_FOLDER / GROUP
    files = sorted(p.name for p in folder.iterdir())
    assert files == ["round-0-member-1.npz", "round-1-member-1.npz"]
    blocker = handshake(stub).session_id
    with training(stub, blocker):  # in use: a full server cannot evict it
        before = server_snapshot(server)
        code, _ = refused(lambda: handshake(stub, group=group_round(2, 1, start=[contribution(1, 1, 4)])))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert_same_snapshot(before, server_snapshot(server))
    assert held(server) == [(GROUP, 0, 1), (GROUP, 1, 1)]
    assert sorted(p.name for p in folder.iterdir()) == files
    close(stub, blocker)
    handshake(stub, group=group_round(1, 1, start=[contribution(0, 1, 4)]))  # round 1 can still be trained again


# -- checkpoints: contributions on disk, a restart, forgetting -------------------------------------------------


def test_contributions_survive_a_restart_and_older_rounds_are_forgotten(serve: Any, tmp_path: Path) -> None:
    server, stub = serve(checkpoint_dir=tmp_path)
    one, _ = contribute(server, stub, group_round(0, 1), steps=2, samples=8, seed=1)
    two, _ = contribute(server, stub, group_round(0, 2), steps=1, samples=4, seed=2)
    folder = tmp_path / CONTRIBUTIONS_FOLDER / GROUP
    assert sorted(p.name for p in folder.iterdir()) == ["round-0-member-1.npz", "round-0-member-2.npz"]
    server.stop(grace=1.0)

    restarted, stub = serve(checkpoint_dir=tmp_path)
    assert not held(restarted)
    start = [contribution(0, 1, 8), contribution(0, 2, 4)]
    reply = handshake(stub, group=group_round(1, 1, start=start))
    averaged = fedavg([one, two], [8, 4])
    assert_same(weights_of(restarted, reply.session_id), averaged, "round 1 after a restart", same_dtype=True)
    close(stub, reply.session_id, 8)
    other = handshake(stub, group=group_round(1, 2, start=start)).session_id
    close(stub, other, 4)
    assert held(restarted) == [(GROUP, 0, 1), (GROUP, 0, 2), (GROUP, 1, 1), (GROUP, 1, 2)]

    # Round 2's start names round 1: round 0's contributions go, in memory and on disk.
    handshake(stub, group=group_round(2, 1, start=[contribution(1, 1, 8), contribution(1, 2, 4)]))
    assert held(restarted) == [(GROUP, 1, 1), (GROUP, 1, 2)]
    assert sorted(p.name for p in folder.iterdir()) == ["round-1-member-1.npz", "round-1-member-2.npz"]
    code, details = refused(lambda: handshake(stub, group=group_round(1, 1, start=start)))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "the group cannot go on from it" in details
    assert "keeps no checkpoints" not in details
    # Another group's contributions are its own.
    contribute(restarted, stub, group_round(0, 1, group="banks"), steps=1, samples=4, seed=3)
    assert (tmp_path / CONTRIBUTIONS_FOLDER / "banks" / "round-0-member-1.npz").is_file()
    assert held(restarted) == [("banks", 0, 1), (GROUP, 1, 1), (GROUP, 1, 2)]


# -- rejoining -----------------------------------------------------------------------------------------------


def test_the_group_is_not_read_when_the_handshake_names_a_session(serve: Any) -> None:
    server, stub = serve()
    plain = handshake(stub).session_id
    train_steps(stub, plain, 0, 1, seed=1)
    weights = weights_of(server, plain)
    bad = group_round(5, 0, pb.SCHEME_UNSPECIFIED, start=[contribution(4, 9, 0)], group="no such/group")
    reply = handshake(stub, group=bad, session_id=plain)
    assert (reply.session_id, reply.next_step) == (plain, 1)
    assert server.session(plain).membership is None
    assert_same(weights_of(server, plain), weights, "a rejoin loads no start", same_dtype=True)
    code, _ = refused(lambda: close(stub, plain, 4))
    assert code == grpc.StatusCode.FAILED_PRECONDITION  # still no group session

    member = handshake(stub, group=group_round(0, 2)).session_id
    other = group_round(3, 1, ROUND_ROBIN, start=[contribution(2, 1, 4)], group="elsewhere")
    assert handshake(stub, group=other, session_id=member).session_id == member
    membership = server.session(member).membership
    assert membership is not None and (membership.group, membership.round, membership.member) == (GROUP, 0, 2)
    close(stub, member, 4)
    assert held(server) == [(GROUP, 0, 2)]


def test_a_turn_kept_with_another_optimizer_is_failed_precondition_and_changes_nothing(serve: Any) -> None:
    """A contribution whose optimizer state does not fit this server's optimizer (kept by a server started with
    another --optimizer) is refused with the reason, not an internal error."""
    server, stub = serve()
    weights = [np.array(w) for w in build_top("plain", 3).get_weights()]
    membership = Membership(GROUP, 0, 1, Scheme.ROUND_ROBIN, ())
    server.sessions.contributions.put(membership, 4, PartState(weights, [np.zeros((), np.int64)]))
    before = server_snapshot(server)
    turn = group_round(1, 2, scheme=pb.SCHEME_ROUND_ROBIN, start=[contribution(0, 1, 4)])
    code, details = refused(lambda: handshake(stub, group=turn))
    assert code == grpc.StatusCode.FAILED_PRECONDITION, details
    assert "cannot start from member 1 in round 0" in details and "--optimizer" in details, details
    assert_same_snapshot(before, server_snapshot(server))
