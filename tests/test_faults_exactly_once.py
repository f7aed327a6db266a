"""Exactly-once steps on a real server: resends answered from the first reply, past steps and gaps refused,
a second client refused while the first trains, and a client behind a proxy that drops replies."""

from __future__ import annotations

import queue
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from client_part import SplitClient
from client_part.retry import RetryPolicy
from client_part.transport import RemoteError, Transport
from server_part import SplitServer
from splitlearning import codec
from splitlearning.contract import Spec
from splitlearning.protocol import CLIENT_ID_METADATA_KEY
from splitlearning.v1 import split_learning_pb2 as pb
from splitlearning.v1 import split_learning_pb2_grpc as pb_grpc
from tests.conftest import CUT_DIM, build_pair, make_data, make_loss
from tests.faults_support import CuttingProxy, assert_weights_close
from tests.raw_support import connect, handshake, send_once, train_request

FAST_RETRY = RetryPolicy(timeout=30.0, initial=0.01, maximum=0.2)


@pytest.fixture
def server() -> Iterator[SplitServer]:
    _, top = build_pair("plain", 5)
    server = SplitServer(top, make_loss(), "adam", ["accuracy"])
    server.bound_port = server.start("127.0.0.1:0")  # type: ignore[attr-defined]
    yield server
    server.stop(grace=1.0)


def stub_for(server: SplitServer) -> tuple[grpc.Channel, pb_grpc.SplitLearningServiceStub]:
    """A channel and a stub to the `server` fixture's port."""
    return connect(f"127.0.0.1:{server.bound_port}")  # type: ignore[attr-defined]


def test_resent_step_is_answered_without_a_second_update(server: SplitServer) -> None:
    channel, stub = stub_for(server)
    with channel:
        session = handshake(stub, client_id="a").session_id
        for step in range(3):
            first = send_once(stub, train_request(session, step, step))
            weights = server.model.get_weights()
            for _ in range(2):  # the reply was lost twice: the same request comes again
                again = send_once(stub, train_request(session, step, step))
                assert again == first
            for before, after in zip(weights, server.model.get_weights(), strict=True):
                np.testing.assert_array_equal(before, after)
        # 9 requests, 3 distinct steps: the optimizer counts steps, not requests.
        assert server.trainer.iterations == 3 == server.session().next_step
        assert server.session().resent == 6
        for step, detail in ((1, "already applied"), (5, "gap")):
            with pytest.raises(grpc.RpcError) as refused:
                send_once(stub, train_request(session, step, 0))
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert detail in (refused.value.details() or "")
        with pytest.raises(grpc.RpcError) as unknown:
            send_once(stub, train_request("not-a-session", 3, 0))
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        assert server.trainer.iterations == 3


def test_second_client_is_refused_while_the_first_trains(server: SplitServer) -> None:
    channel, stub = stub_for(server)
    with channel:
        session = handshake(stub, client_id="first").session_id
        requests: queue.SimpleQueue[pb.TrainRequest | None] = queue.SimpleQueue()
        requests.put(train_request(session, 0, 0))
        stream = stub.Train(iter(requests.get, None), timeout=30)
        next(stream)  # the first client's stream is open until it sends None (ends its requests)
        with pytest.raises(grpc.RpcError) as refused:
            handshake(stub, session, client_id="second")
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "in use by another client" in (refused.value.details() or "")
        assert handshake(stub, session, client_id="first").session_id == session  # the holder itself may rejoin
        assert handshake(stub, client_id="second").session_id != session  # naming no session, it opens its own
        requests.put(None)
        list(stream)  # the stream ends
        assert handshake(stub, session, client_id="second").session_id == session  # once it is closed, another may join


def test_a_stream_from_a_client_that_no_longer_holds_the_session_is_refused(server: SplitServer) -> None:
    channel, stub = stub_for(server)

    def stream_as(client_id: str | None, step: int) -> pb.TrainResponse:
        metadata = [(CLIENT_ID_METADATA_KEY, client_id.encode())] if client_id is not None else []
        # The whole stream, to its end: the server counts it as open until then.
        (reply,) = stub.Train(iter([train_request(session, step, step)]), timeout=10, metadata=metadata)
        return reply

    with channel:
        session = handshake(stub, client_id="first").session_id
        assert stream_as("first", 0).step == 0
        # "first" had no stream open: "second" holds it.
        assert handshake(stub, session, client_id="second").session_id == session
        weights = server.model.get_weights()
        with pytest.raises(grpc.RpcError) as refused:
            stream_as("first", 1)  # "first" did not handshake again: its steps must not mix with "second"'s
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "held by another client" in (refused.value.details() or "")
        for before, after in zip(weights, server.model.get_weights(), strict=True):
            np.testing.assert_array_equal(before, after)
        assert server.session().next_step == 1
        assert stream_as("second", 1).step == 1
        assert stream_as(None, 2).step == 2  # a stream that names no client is the holder's, as before
        with pytest.raises(grpc.RpcError) as refused:
            stream_as("stranger", 3)  # it never joined: the refusal must not say it joined before the holder
        details = refused.value.details() or ""
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "'stranger' has not joined this session" in details, details
        assert "joined after" not in details and "take it back" not in details, details
        assert server.session().next_step == 3


def test_a_client_whose_session_was_taken_between_its_handshake_and_its_first_step_is_refused(
    server: SplitServer,
) -> None:
    transport = Transport(f"127.0.0.1:{server.bound_port}", 1 << 20, rpc_timeout=10)  # type: ignore[attr-defined]
    channel, stub = stub_for(server)
    try:
        transport.handshake(Spec((CUT_DIM,), np.dtype("float32")), None, 8, client_id="first")
        # Before "first" opened its stream: "second" holds it now.
        handshake(stub, transport.session_id, client_id="second")
        request = train_request(transport.session_id, 0, 0)
        iv, labels = codec.from_proto(request.iv, "iv"), codec.from_proto(request.labels, "labels")
        with pytest.raises(RemoteError, match="held by another client") as refused:
            transport.train(0, iv, labels, True)  # its stream names "first" (the transport's own metadata)
        assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert server.session().next_step == 0
    finally:
        channel.close()
        transport.close()


def train(
    target: str, bottom: object, x: np.ndarray, y: np.ndarray, micro_batches: int = 1
) -> tuple[SplitClient, dict[str, list[float]]]:
    with SplitClient(
        bottom, "adam", target=target, connect_timeout=10, retry=FAST_RETRY, rpc_timeout=10, micro_batches=micro_batches
    ) as client:
        history = client.fit(x, y, batch_size=4, epochs=3, shuffle=True, seed=1, verbose=0).history
    return client, history


def train_through_proxy(
    cut_every: int | None, micro_batches: int = 1
) -> tuple[SplitClient, dict[str, list[float]], SplitServer, CuttingProxy]:
    """Train a fresh seeded pair, the client reaching the server through a proxy that cuts every `cut_every`
    bytes of answers (never with None)."""
    x, y = make_data(n=40)
    bottom, top = build_pair("plain", 9)
    server = SplitServer(top, make_loss(), "adam", ["accuracy"])
    port = server.start("127.0.0.1:0")
    proxy = CuttingProxy(port, cut_every)
    try:
        client, history = train(f"127.0.0.1:{proxy.port}", bottom, x, y, micro_batches)
    finally:
        proxy.close()
        server.stop(grace=1.0)
    return client, history, server, proxy


def test_dropped_replies_are_retried_once_each() -> None:
    plain, _, plain_server, _ = train_through_proxy(None)
    cut, _, cut_server, proxy = train_through_proxy(1500)
    assert proxy.cuts >= 3, "the proxy never cut: this test proved nothing"
    assert cut_server.session().resent >= 1, "no reply was lost after its step was applied"
    assert cut.step == cut_server.trainer.iterations == plain_server.trainer.iterations == 30
    assert_weights_close(cut.model.get_weights(), plain.model.get_weights(), "client part")
    assert_weights_close(cut_server.model.get_weights(), plain_server.model.get_weights(), "server part")


def test_pipelined_steps_survive_cut_streams_with_the_weights_and_metrics_of_an_uncut_run() -> None:
    plain, plain_history, plain_server, _ = train_through_proxy(None, micro_batches=2)
    cut, cut_history, cut_server, proxy = train_through_proxy(700, micro_batches=2)
    assert proxy.cuts >= 3, "the proxy never cut: this test proved nothing"
    # Both ways a pipelined step is repaired happened: started over, and answered from the stored replies.
    assert cut_server.session().restarted >= 1, "no stream was cut between a step's micro-batches"
    assert cut_server.session().resent >= 1, "no reply was lost after its step was applied"
    assert cut.step == cut_server.trainer.iterations == plain_server.trainer.iterations == 30
    assert_weights_close(cut.model.get_weights(), plain.model.get_weights(), "client part")
    assert_weights_close(cut_server.model.get_weights(), plain_server.model.get_weights(), "server part")
    assert cut_history.keys() == plain_history.keys()
    for name, values in plain_history.items():  # no sample counted twice in the running metrics
        np.testing.assert_allclose(cut_history[name], values, rtol=1e-5, err_msg=name)


def test_a_refused_handshake_leaves_the_holders_wire_encoding_alone() -> None:
    _, top = build_pair("plain", 5)
    server = SplitServer(top, make_loss(), "adam", wire_encodings=["int8"])
    port = server.start("127.0.0.1:0")
    channel, stub = connect(f"127.0.0.1:{port}")
    try:
        session = handshake(stub, client_id="holder").session_id  # asks for nothing narrower: raw
        requests: queue.SimpleQueue[pb.TrainRequest | None] = queue.SimpleQueue()
        requests.put(train_request(session, 0, 0))
        stream = stub.Train(iter(requests.get, None), timeout=30)
        assert next(stream).iv_gradient.encoding == pb.ENCODING_RAW
        with pytest.raises(grpc.RpcError) as refused:
            handshake(stub, session, client_id="other", encodings=[pb.ENCODING_INT8])
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        requests.put(train_request(session, 1, 1))
        assert next(stream).iv_gradient.encoding == pb.ENCODING_RAW, "the refused client re-encoded the session"
        requests.put(None)
        list(stream)
    finally:
        channel.close()
        server.stop(grace=1.0)
