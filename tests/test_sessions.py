"""One server, many sessions (issue 15): each run its own second part, step counter and retry cache.

Weights are compared bit for bit: a session's part is built from the same source with the same initial weights
as a fresh server's, and runs the same operations on the same inputs in the same order, in this process, so
nothing may differ (concurrent sessions run their steps on other threads, which changes no operation's order).
"""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from client_part import SplitClient
from server_part import SplitServer
from splitlearning.v1 import split_learning_pb2 as pb
from tests import raw_support as raw
from tests.conftest import build_bottom, build_top, make_data, make_loss
from tests.exactness_support import assert_same
from tests.raw_support import connect, refused, train_request, training
from tests.ushape_support import build_head, build_middle

BATCH = 10
SERVER_SEED = 4


def new_server(**kwargs: Any) -> SplitServer:
    """A server of the seeded top: every session it opens starts from the same weights as a fresh server."""
    return SplitServer(build_top("plain", SERVER_SEED), make_loss(), "adam", ["accuracy"], max_batch_size=64, **kwargs)


@pytest.fixture
def servers() -> Iterator[list[SplitServer]]:
    started: list[SplitServer] = []
    yield started
    for server in started:
        server.stop(grace=1.0)


def serve(started: list[SplitServer], **kwargs: Any) -> tuple[SplitServer, str]:
    server = new_server(**kwargs)
    started.append(server)
    return server, f"127.0.0.1:{server.start('127.0.0.1:0')}"


def train(target: str, seed: int, epochs: int = 2, end: bool = False) -> tuple[SplitClient, list[np.ndarray]]:
    """A client of seed `seed` (its part's weights, its data and their order) trained for `epochs`."""
    x, y = make_data(40, seed=100 + seed)
    client = SplitClient(build_bottom("plain", seed), "adam", target=target, connect_timeout=10, max_batch_size=64)
    with client:
        client.fit(x, y, batch_size=BATCH, epochs=epochs, seed=seed, verbose=0)
        if end:
            client.end_session()
    return client, client.model.get_weights()


def server_part(server: SplitServer, session_id: str) -> list[np.ndarray]:
    session = server.session(session_id)
    session.settle()
    return [np.array(w) for w in session.trainer.model.get_weights()]


def alone(started: list[SplitServer], seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The run of client `seed` against a fresh server of its own: (client part, server part)."""
    server, target = serve(started)
    client, weights = train(target, seed)
    return weights, server_part(server, client.session_id)


def test_a_second_run_against_one_server_equals_a_run_against_a_fresh_server(servers: list[SplitServer]) -> None:
    server, target = serve(servers)
    first, _ = train(target, seed=1)
    second, second_weights = train(target, seed=1)
    assert first.session_id != second.session_id, "the second run joined the first one's session"
    assert second.step == first.step == 8
    expected_client, expected_server = alone(servers, seed=1)
    assert_same(second_weights, expected_client, "client part")
    assert_same(server_part(server, second.session_id), expected_server, "server part")
    # The first session trained the model object the server was given; the second a copy.
    assert server.session().id == first.session_id
    assert_same(server.model.get_weights(), server_part(server, first.session_id), "the server's own model")


def test_a_fresh_client_after_another_ones_first_step_gets_a_session_of_its_own(servers: list[SplitServer]) -> None:
    """The retry-cache bug of issue 15: a newcomer used to be answered from the first client's cached reply."""
    server, target = serve(servers)
    x, y = make_data(BATCH, seed=7)
    first_client = SplitClient(build_bottom("plain", 1), "adam", target=target, connect_timeout=10, max_batch_size=64)
    with first_client as first:
        first.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)  # exactly one step
        assert first.step == 1
        second, weights = train(target, seed=2)
        assert second.session_id != first.session_id and second.step == 8
    assert server.session(first.session_id).next_step == 1, "the newcomer's steps landed in the first session"
    expected_client, expected_server = alone(servers, seed=2)
    assert_same(weights, expected_client, "the newcomer's part")
    assert_same(server_part(server, second.session_id), expected_server, "the newcomer's server part")


# -- the registry's limits, over raw calls ----------------------------------------------------------------

# Client "c"'s handshake (its CloseSession requests name it too).
handshake = partial(raw.handshake, client_id="c")


def test_max_sessions_refuses_a_new_session_while_all_are_in_use_until_one_is_closed(
    servers: list[SplitServer],
) -> None:
    """Sessions with a training stream open are never evicted for a new one (tests/test_sessions_slots.py)."""
    server, target = serve(servers, max_sessions=2)
    channel, stub = connect(target)
    with channel:
        first, second = handshake(stub).session_id, handshake(stub).session_id
        with training(stub, first), training(stub, second):
            code, details = refused(lambda: handshake(stub))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "limit of 2 sessions" in details
            assert handshake(stub, first).session_id == first  # joining one it holds is no new session
            closed = stub.CloseSession(pb.CloseSessionRequest(session_id=first, client_id="c"), timeout=10)
            assert closed.steps == 1 and not closed.checkpointed
            assert handshake(stub).session_id not in (first, second, "")
            assert len(server.sessions.sessions()) == 2 and server.sessions.find(second) is not None


def test_a_closed_session_without_checkpoints_is_gone(servers: list[SplitServer]) -> None:
    _, target = serve(servers)
    channel, stub = connect(target)
    with channel:
        session = handshake(stub).session_id
        assert [r.step for r in raw.train(stub, train_request(session, 0), train_request(session, 1, 1))] == [0, 1]
        closed = stub.CloseSession(pb.CloseSessionRequest(session_id=session, client_id="c"), timeout=10)
        assert (closed.steps, closed.checkpointed) == (2, False)
        for call in (lambda: raw.train(stub, train_request(session, 2)), lambda: handshake(stub, session)):
            code, details = refused(call)
            assert code == grpc.StatusCode.NOT_FOUND and session in details


def test_an_unknown_or_malformed_session_is_refused(servers: list[SplitServer]) -> None:
    _, target = serve(servers)
    channel, stub = connect(target)
    with channel:
        code, details = refused(lambda: handshake(stub, "f" * 32))
        assert code == grpc.StatusCode.NOT_FOUND and "open a new session" in details
        code, details = refused(lambda: handshake(stub, "../../etc"))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "letters, digits" in details
        code, _ = refused(lambda: raw.train(stub, train_request("", 0)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_an_idle_session_is_checkpointed_unloaded_and_resumed_where_it_was(
    servers: list[SplitServer], tmp_path: Path
) -> None:
    server, target = serve(servers, checkpoint_dir=tmp_path, checkpoint_every=0, session_idle_timeout=0.3)
    channel, stub = connect(target)
    with channel:
        session = handshake(stub).session_id
        raw.train(stub, train_request(session, 0), train_request(session, 1, 1))
        weights = server_part(server, session)
        deadline = time.monotonic() + 20
        while server.sessions.sessions() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not server.sessions.sessions(), "the idle session was not unloaded"
        assert (tmp_path / session / "checkpoint").is_file()
        code, details = refused(lambda: raw.train(stub, train_request(session, 2, 2)))
        assert code == grpc.StatusCode.ABORTED and "handshake again" in details
        resumed = handshake(stub, session)
        assert (resumed.session_id, resumed.next_step) == (session, 2)
        assert_same(server_part(server, session), weights, "the resumed part")
        assert [r.step for r in raw.train(stub, train_request(session, 2, 2))] == [2]


def test_an_idle_session_without_checkpoints_expires(servers: list[SplitServer]) -> None:
    server, target = serve(servers, session_idle_timeout=0.2)
    channel, stub = connect(target)
    with channel:
        session = handshake(stub).session_id
        deadline = time.monotonic() + 20
        while server.sessions.sessions() and time.monotonic() < deadline:
            time.sleep(0.05)
        code, details = refused(lambda: raw.train(stub, train_request(session, 0)))
        assert code == grpc.StatusCode.NOT_FOUND and "keeps no checkpoints" in details


def test_a_resend_is_answered_only_when_it_repeats_the_step(servers: list[SplitServer]) -> None:
    server, target = serve(servers)
    channel, stub = connect(target)
    with channel:
        session = handshake(stub).session_id
        (first,) = raw.train(stub, train_request(session, 0))
        (again,) = raw.train(stub, train_request(session, 0))  # its reply was lost: the same request again
        assert again.iv_gradient.content == first.iv_gradient.content
        assert server.session().resent == 1
        code, details = refused(lambda: raw.train(stub, train_request(session, 0, seed=9)))  # another request as step 0
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "repeat the step exactly" in details
        metadata = [("split-client-id-bin", b"someone-else")]
        code, _ = refused(lambda: list(stub.Train(iter([train_request(session, 0)]), timeout=10, metadata=metadata)))
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        assert server.session().next_step == 1 and server.session().resent == 1


def test_an_encoding_the_session_did_not_agree_on_is_refused(servers: list[SplitServer]) -> None:
    server, target = serve(servers, wire_encodings=["raw", "float16", "int8"])
    channel, stub = connect(target)
    with channel:
        session = handshake(stub).session_id  # asks for nothing narrower: raw
        for encoding in (pb.ENCODING_FLOAT16, pb.ENCODING_INT8):
            code, details = refused(lambda e=encoding: raw.train(stub, train_request(session, 0, encoding=e)))  # type: ignore[misc]
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "agreed on raw" in details
        assert server.session().next_step == 0
        narrow = handshake(stub, session, encodings=[pb.ENCODING_INT8]).session_id
        assert [r.step for r in raw.train(stub, train_request(narrow, 0, encoding=pb.ENCODING_INT8))] == [0]


def make_client(target: str, **kwargs: Any) -> SplitClient:
    return SplitClient(build_bottom("plain", 1), "adam", target=target, connect_timeout=10, max_batch_size=64, **kwargs)


def test_the_client_api_names_ends_and_resumes_its_session(servers: list[SplitServer], tmp_path: Path) -> None:
    server, target = serve(servers, checkpoint_dir=tmp_path / "server")
    x, y = make_data(20)
    client = make_client(target, checkpoint_dir=tmp_path / "client", checkpoint_every=0)
    assert client.session_id == ""
    with client:
        client.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
        session = client.session_id
        assert session and server.session(session).next_step == 2
        client.end_session()
    assert not server.sessions.sessions()
    assert (tmp_path / "server" / session / "ckpt-2.index").is_file(), "the server did not checkpoint the end"
    # The client's checkpoints name the session: a new client of them resumes it where it ended, both sides
    # at the final step (which the client saved at the end of fit).
    with make_client(target, checkpoint_dir=tmp_path / "client") as again:
        assert (again.session_id, again.agreement.next_step, again.step) == (session, 2, 2)
        assert server.session(session).next_step == 2
    # Naming it works too, for inference with weights from elsewhere (a client whose part is at another step
    # moves the session to the latest step both hold: see docs/sessions.md).
    with make_client(target, session_id=session) as named:
        assert named.agreement.session_id == session


def ushape_run(target: str, seed: int) -> tuple[SplitClient, list[np.ndarray]]:
    x, y = make_data(30, seed=100 + seed)
    client = SplitClient(
        build_bottom("plain", seed),
        "adam",
        target=target,
        connect_timeout=10,
        max_batch_size=64,
        head=build_head(seed),
        loss=make_loss(),
    )
    with client:
        client.fit(x, y, batch_size=BATCH, epochs=2, seed=seed, verbose=0)
    assert client.head is not None
    return client, [*client.model.get_weights(), *client.head.model.get_weights()]


def test_ushape_sessions_are_isolated_too(servers: list[SplitServer]) -> None:
    """The U-shape's middle per session (batch normalization's moving statistics included)."""

    def middle_server() -> tuple[SplitServer, str]:
        server = SplitServer(build_middle("batchnorm", SERVER_SEED), optimizer="adam", cut="ushape", max_batch_size=64)
        servers.append(server)
        return server, f"127.0.0.1:{server.start('127.0.0.1:0')}"

    shared, target = middle_server()
    first, _ = ushape_run(target, seed=1)
    second, second_weights = ushape_run(target, seed=2)
    assert first.session_id != second.session_id
    fresh, fresh_target = middle_server()
    alone, alone_weights = ushape_run(fresh_target, seed=2)
    assert_same(second_weights, alone_weights, "bottom and head")
    assert_same(server_part(shared, second.session_id), server_part(fresh, alone.session_id), "middle")


def test_every_session_may_hold_its_stream_and_a_call_at_once(servers: list[SplitServer]) -> None:
    """The default worker budget follows --max-sessions: each training client holds its training stream open
    while it validates (a unary call), so a full server must have room for both per session."""
    max_sessions = 10  # more than the service's 8 slots of before
    _, target = serve(servers, max_sessions=max_sessions)
    channel, stub = connect(target)
    streams = []
    with channel:
        for index in range(max_sessions):
            session = handshake(stub).session_id
            requests: queue.SimpleQueue[pb.TrainRequest | None] = queue.SimpleQueue()
            requests.put(train_request(session, 0, index))
            stream = stub.Train(iter(requests.get, None), timeout=30)
            assert next(stream).step == 0  # the stream stays open: its requests have not ended
            streams.append((session, stream, requests))
        for session, _, _ in streams:
            request = train_request(session, 0)
            evaluate = pb.EvaluateRequest(session_id=session, iv=request.iv, labels=request.labels, reset_metrics=True)
            assert len(stub.Evaluate(evaluate, timeout=10).metrics) == 2
        for _, stream, requests in streams:
            requests.put(None)
            assert not list(stream)


def test_a_trainer_an_ended_session_gave_back_serves_a_later_session_as_a_new_copy_would(
    servers: list[SplitServer],
) -> None:
    """Ended sessions give their trainers back (server_part/parts.py), so a later session skips building and
    tracing a part: reset to the initial weights, a fresh optimizer and zeroed metrics, it must train exactly as
    a new copy (the metrics it reports included)."""
    server, target = serve(servers)
    train(target, seed=1, end=True)  # the user's model object: never handed on
    train(target, seed=2, end=True)
    idle = list(server.sessions._parts._idle)
    assert len(idle) == 1
    x, y = make_data(40, seed=103)
    reused = SplitClient(build_bottom("plain", 3), "adam", target=target, connect_timeout=10, max_batch_size=64)
    with reused:
        history = reused.fit(x, y, batch_size=BATCH, epochs=2, seed=3, verbose=0)
    assert server.session(reused.session_id).trainer is idle[0], "the session did not reuse the trainer"
    fresh, fresh_target = serve(servers)
    alone_client = SplitClient(
        build_bottom("plain", 3), "adam", target=fresh_target, connect_timeout=10, max_batch_size=64
    )
    with alone_client:
        expected = alone_client.fit(x, y, batch_size=BATCH, epochs=2, seed=3, verbose=0)
    assert_same(reused.model.get_weights(), alone_client.model.get_weights(), "client part")
    assert_same(server_part(server, reused.session_id), server_part(fresh, alone_client.session_id), "server part")
    assert history.history == expected.history  # the running metrics started from zero, not from seed 2's run


def test_a_session_ended_twice_gives_its_trainer_back_once(servers: list[SplitServer]) -> None:
    """A close racing an idle expiry (or a new session superseding it) ends one session twice: only the end that
    removed it may give its trainer back, or a trainer a new session took would be handed out again."""
    server, target = serve(servers)
    train(target, seed=1, end=True)  # the user's model object's session
    copy, _ = train(target, seed=2)
    session = server.session(copy.session_id)
    parts = server.sessions._parts
    server.sessions._drop(session, "closed in a test")
    assert parts._idle == [session.trainer]
    reused, _ = train(target, seed=3)
    assert server.session(reused.session_id).trainer is session.trainer and parts._idle == []
    server.sessions._drop(session, "ended again in a test")  # the late, second end of the old session
    assert parts._idle == [], "a trainer in use was handed back"
