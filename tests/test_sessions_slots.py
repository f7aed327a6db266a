"""Session slots (issue 26): handshakes that never train cannot keep an honest client from training.

A full server evicts an idle session for a new one (checkpointed first, with checkpoints, so its client resumes
it), sessions that a handshake opened and that never trained leave memory after `--session-unused-timeout`,
and a new session is refused only while every session in memory has a training stream open.
Time is injected: `SessionRegistry.expire_idle(now)` takes the clock reading, so nothing here waits for a timeout.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from client_part import SplitClient
from server_part import SplitServer
from server_part.cli import parse_args
from splitlearning.v1 import split_learning_pb2 as pb
from tests.conftest import build_bottom, make_data
from tests.exactness_support import assert_same
from tests.raw_support import connect, refused, train_request, training
from tests.raw_support import train as send
from tests.test_sessions import BATCH, alone, handshake, serve, server_part, train

TIMEOUT = 20.0


@pytest.fixture
def servers() -> Iterator[list[SplitServer]]:
    started: list[SplitServer] = []
    yield started
    for server in started:
        server.stop(grace=1.0)


def in_memory(server: SplitServer) -> set[str]:
    return {session.id for session in server.sessions.sessions()}


# -- a full server evicts an idle session -------------------------------------------------------------------


def test_handshakes_that_never_train_do_not_keep_an_honest_client_from_training(servers: list[SplitServer]) -> None:
    """The hostile run of issue 26: max_sessions handshakes, no step. The unused timeout is off: eviction alone."""
    server, target = serve(servers, max_sessions=3, session_unused_timeout=0)
    channel, stub = connect(target)
    with channel:
        hostile = [handshake(stub).session_id for _ in range(3)]
        client, weights = train(target, seed=1)
        assert client.step == 8
        assert in_memory(server) == {*hostile[1:], client.session_id}, "not the least recently used one evicted"
        code, details = refused(lambda: send(stub, train_request(hostile[0], 0)))
        assert code == grpc.StatusCode.NOT_FOUND and "evicted" in details and "open a new session" in details
    # The honest run is the run of a fresh server: the evicted session's part was reset before it was reused.
    expected_client, expected_server = alone(servers, seed=1)
    assert_same(weights, expected_client, "client part")
    assert_same(server_part(server, client.session_id), expected_server, "server part")


def test_a_full_server_evicts_unused_sessions_first_then_checkpointed_ones_then_those_it_would_lose(
    servers: list[SplitServer], tmp_path: Path
) -> None:
    server, target = serve(servers, max_sessions=4, checkpoint_dir=tmp_path, checkpoint_every=0)
    channel, stub = connect(target)
    group = pb.GroupRound(group="g", round=0, member=1, scheme=pb.SCHEME_SPLITFED)
    with channel:
        grouped = handshake(stub, group=group).session_id  # keeps no checkpoints: its round's work would be lost
        send(stub, train_request(grouped, 0))
        kept = handshake(stub).session_id
        send(stub, train_request(kept, 0))
        unused = handshake(stub).session_id  # the most recently used, yet the first to go
        busy = handshake(stub).session_id
        with training(stub, busy):
            order = [session.id for session in server.sessions.eviction_order(time.monotonic())]
            assert order == [unused, kept, grouped], "busy has a stream open: never evicted"
            newcomer = handshake(stub).session_id
            assert in_memory(server) == {grouped, kept, busy, newcomer}
            code, details = refused(lambda: send(stub, train_request(unused, 0)))
            assert code == grpc.StatusCode.ABORTED and "evicted" in details and "handshake again" in details
            send(stub, train_request(newcomer, 0))  # now a checkpointed session used after `kept`
            last = handshake(stub).session_id
            assert in_memory(server) == {grouped, busy, newcomer, last}, "the group round's session went first"


def test_with_checkpoints_the_evicted_session_is_checkpointed_and_resumed_at_its_step(
    servers: list[SplitServer], tmp_path: Path
) -> None:
    server, target = serve(servers, max_sessions=2, checkpoint_dir=tmp_path, checkpoint_every=0)
    channel, stub = connect(target)
    with channel:
        first = handshake(stub).session_id
        send(stub, train_request(first, 0), train_request(first, 1, 1))
        weights = server_part(server, first)
        second = handshake(stub).session_id
        send(stub, train_request(second, 0))
        assert server.sessions.store is not None and server.sessions.store.latest(first) == 0
        third = handshake(stub).session_id  # evicts `first`, the least recently used
        assert in_memory(server) == {second, third}
        assert server.sessions.store.latest(first) == 2, "the evicted session was not checkpointed at its step"
        code, details = refused(lambda: send(stub, train_request(first, 2, 2)))
        assert code == grpc.StatusCode.ABORTED and "evicted" in details and "handshake again" in details
        resumed = handshake(stub, first)  # the server is full again: `third`, which trained nothing, makes room
        assert (resumed.session_id, resumed.next_step) == (first, 2)
        assert in_memory(server) == {first, second}
        assert_same(server_part(server, first), weights, "the resumed part")
        assert [reply.step for reply in send(stub, train_request(first, 2, 2))] == [2]


def test_a_split_client_whose_session_was_evicted_resumes_it_at_its_step(
    servers: list[SplitServer], tmp_path: Path
) -> None:
    """A client that stopped (its stream closed, its session not ended) comes back to a server whose slots were
    taken meanwhile: its session was evicted, checkpointed, and the client's rerun resumes it where it was."""
    server, target = serve(servers, max_sessions=2, checkpoint_dir=tmp_path / "server", checkpoint_every=0)
    x, y = make_data(40, seed=101)

    def client() -> SplitClient:
        return SplitClient(
            build_bottom("plain", 1),
            "adam",
            target=target,
            connect_timeout=10,
            max_batch_size=64,
            checkpoint_dir=tmp_path / "client",
        )

    with client() as first:
        first.fit(x, y, batch_size=BATCH, epochs=1, seed=1, verbose=0)
    session = first.session_id
    assert first.step == 4
    weights = server_part(server, session)
    channel, stub = connect(target)
    with channel:
        other = handshake(stub).session_id
        send(stub, train_request(other, 0))
        handshake(stub)  # evicts the client's session: idle, and used before `other`
        assert session not in in_memory(server)
        assert server.sessions.store is not None and server.sessions.store.latest(session) == 4
        with client() as again:  # finds its session in its checkpoint folder: a handshake naming it
            assert (again.session_id, again.step) == (session, 4)
            assert_same(server_part(server, session), weights, "the resumed part")
            assert other in in_memory(server), "the resume evicted a trained session, not the one that trained nothing"
            again.fit(x, y, batch_size=BATCH, epochs=2, seed=1, verbose=0)
            assert again.step == 8 and server.session(session).next_step == 8


# -- every session in use -------------------------------------------------------------------------------------


def test_a_new_session_is_refused_only_while_every_session_has_a_training_stream_open(
    servers: list[SplitServer],
) -> None:
    server, target = serve(servers, max_sessions=2)
    channel, stub = connect(target)
    with channel:
        first, second = handshake(stub).session_id, handshake(stub).session_id
        with training(stub, first):
            with training(stub, second):
                before = {s.id: s.next_step for s in server.sessions.sessions()}
                code, details = refused(lambda: handshake(stub))
                assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "limit of 2 sessions" in details and "2 with a training stream open" in details
                assert "--max-sessions" in details
                assert {s.id: s.next_step for s in server.sessions.sessions()} == before
            opened = handshake(stub).session_id  # `second`'s stream ended: it is idle, and makes room
        assert in_memory(server) == {first, opened}


# -- sessions that never train leave after --session-unused-timeout -------------------------------------------


def test_unused_sessions_leave_memory_after_the_unused_timeout_and_an_honest_client_trains(
    servers: list[SplitServer],
) -> None:
    server, target = serve(servers, max_sessions=2, session_unused_timeout=60)
    channel, stub = connect(target)
    with channel:
        hostile = [handshake(stub).session_id for _ in range(2)]
        now = time.monotonic()
        assert server.sessions.expire_idle(now + 59) == []
        assert sorted(server.sessions.expire_idle(now + 61)) == sorted(hostile)
        assert not server.sessions.sessions(), "reclaimed, not left for eviction"
        code, details = refused(lambda: send(stub, train_request(hostile[0], 0)))
        assert code == grpc.StatusCode.NOT_FOUND and "unused" in details
    client, _ = train(target, seed=1)
    assert client.step == 8 and in_memory(server) == {client.session_id}


def test_only_sessions_opened_new_that_applied_no_step_are_unused(servers: list[SplitServer], tmp_path: Path) -> None:
    """A trained session, or one resumed from its checkpoints, waits for the idle timeout; 0 turns reclaim off."""
    server, target = serve(servers, checkpoint_dir=tmp_path, session_unused_timeout=60)
    channel, stub = connect(target)
    with channel:
        trained = handshake(stub).session_id
        send(stub, train_request(trained, 0))
        resumed = handshake(stub).session_id
        send(stub, train_request(resumed, 0))
        stub.CloseSession(pb.CloseSessionRequest(session_id=resumed, client_id="c"), timeout=TIMEOUT)
        assert handshake(stub, resumed).next_step == 1
        unused = handshake(stub).session_id
        assert [s.unused for s in server.sessions.sessions()] == [False, False, True]
        assert server.sessions.expire_idle(time.monotonic() + 61) == [unused]
        assert in_memory(server) == {trained, resumed}
        code, details = refused(lambda: send(stub, train_request(unused, 0)))
        assert code == grpc.StatusCode.ABORTED and "unused" in details  # its step 0 is checkpointed: it resumes
        assert server.sessions.expire_idle(time.monotonic() + 3601) != []  # the idle timeout still applies

    off, target = serve(servers, session_unused_timeout=0)
    channel, stub = connect(target)
    with channel:
        kept = handshake(stub).session_id
        assert off.sessions.expire_idle(time.monotonic() + 3599) == []
        assert in_memory(off) == {kept}


def test_the_unused_timeout_is_a_flag_with_an_environment_default(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_args([]).session_unused_timeout == 60.0
    assert parse_args(["--session-unused-timeout", "0"]).session_unused_timeout == 0.0
    monkeypatch.setenv("SPLIT_SESSION_UNUSED_TIMEOUT", "15")
    assert parse_args([]).session_unused_timeout == 15.0
    with pytest.raises(SystemExit):
        parse_args(["--session-unused-timeout", "-1"])
