"""Hostile traffic of every kind against a real SplitServer: no traceback in its log, and its threads come back.

An outside check (issue 26) left 32 "Exception serializing message!" tracebacks from gRPC in a server's log
(handlers that returned None: a unary call cancelled before its request arrived, or taken back by admission)
and the server's threads at 55 from 16 long after the calls had gone (the pool's threads never ended). Here a
bounded mix of such calls runs against one server (with a token: calls without it, with it and bytes that are no
message, calls cancelled while they wait for their request, calls over the admission budget, streams that send
nothing, unknown methods, health watches dropped, handshakes with garbage fields, sessions never trained in).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server_part import SplitServer
from splitlearning.protocol import PROTOCOL_VERSION
from splitlearning.v1 import split_learning_pb2 as pb
from tests.conftest import CUT_DIM, build_top, make_loss

TOKEN = "s3cret-token"
AUTH = [("authorization", f"Bearer {TOKEN}")]
SERVICE = "/splitlearning.v1.SplitLearningService/"
UNARY = ["Handshake", "CloseSession", "Evaluate", "Predict"]
WORKERS = 3  # admission's service slots: small, so that the hostile calls go over the budget
GARBAGE = [b"\x0a\x10x", b"\xff" * 7, b"\x08" + b"\xff" * 11, b"\x12\x05ab"]
THREADS_BACK_WITHIN = 25.0  # seconds: a bound on the wait, not a timing under test
THREAD_MARGIN = 2  # threads a gRPC channel or a finished call may leave behind for a moment
MARKERS = ("Traceback", "Exception serializing", "Exception calling application", "Exception iterating")

identity = lambda data: data  # noqa: E731 (bytes on the wire as they are)


@pytest.fixture
def server() -> Iterator[tuple[SplitServer, int]]:
    split = SplitServer(
        build_top("plain", 0), make_loss(), "sgd", ["accuracy"], auth_token=TOKEN, max_workers=WORKERS, max_sessions=2
    )
    port = split.start("127.0.0.1:0")
    yield split, port
    split.stop(grace=0.5)


def test_hostile_traffic_logs_no_traceback_and_leaves_no_thread(
    server: tuple[SplitServer, int], caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    _, port = server
    caplog.set_level(logging.DEBUG)
    target = f"127.0.0.1:{port}"
    with grpc.insecure_channel(target) as channel:  # warm: a session opened (the model built), a health check
        _handshake(channel, AUTH)
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    baseline = threading.active_count()
    capfd.readouterr()

    for _ in range(2):
        with grpc.insecure_channel(target) as channel:
            _hostile(channel)

    deadline = time.monotonic() + THREADS_BACK_WITHIN
    while threading.active_count() > baseline + THREAD_MARGIN and time.monotonic() < deadline:
        time.sleep(0.1)
    threads = threading.active_count()
    err = capfd.readouterr()
    logged = [caplog.text, err.err, err.out]
    found = [marker for marker in MARKERS if any(marker in text for text in logged)]
    assert not found, f"{found} in the server's log:\n{caplog.text}\n{err.err}"
    assert not [r for r in caplog.records if r.exc_info], "a log record with a traceback"
    assert threads <= baseline + THREAD_MARGIN, f"{threads} threads, {baseline} before the hostile calls: " + ", ".join(
        sorted(t.name for t in threading.enumerate())
    )


def _hostile(channel: grpc.Channel) -> None:
    """One round of every kind of hostile call; each ends (refused or cancelled) before this returns."""
    for method in UNARY:
        unary = channel.unary_unary(SERVICE + method, request_serializer=identity, response_deserializer=identity)
        _refused(unary, b"", timeout=10)  # no token
        _refused(unary, b"", metadata=[("authorization", "Bearer wrong")], timeout=10)
        for garbage in GARBAGE:
            _refused(unary, garbage, metadata=AUTH, timeout=10)
        nothing = channel.stream_unary(SERVICE + method, request_serializer=identity, response_deserializer=identity)
        _refused(nothing, iter(()), metadata=AUTH, timeout=10)  # the request stream ends with no request
    train = channel.stream_stream(SERVICE + "Train", request_serializer=identity, response_deserializer=identity)
    stray = pb.TrainRequest(session_id="nope", step=1).SerializeToString()
    _refused(_drained(train), iter([b""]), timeout=10)  # no token
    _refused(_drained(train), iter(GARBAGE), metadata=AUTH, timeout=10)
    _refused(_drained(train), iter([stray]), timeout=10)
    _refused(_drained(train), iter([stray]), metadata=AUTH, timeout=10)
    _refused(_drained(train), iter(()), metadata=AUTH, timeout=10, allow_ok=True)  # sends nothing, hangs up
    unknown = channel.unary_unary("/no.Such/Method", request_serializer=identity, response_deserializer=identity)
    _refused(unknown, b"", timeout=10)
    _refused(unknown, b"", metadata=AUTH, timeout=10)
    _cancelled_while_waiting(channel)
    _over_budget(channel)
    _garbage_handshakes(channel)
    _dropped_watches(channel)
    _sessions_never_trained(channel)


def _cancelled_while_waiting(channel: grpc.Channel) -> None:
    """Calls that open, send no request, and are cancelled by their client (unary and stream methods)."""
    for method in [*UNARY, "Train"]:
        release = threading.Event()
        calls = []
        for metadata in ([], AUTH):
            if method == "Train":
                stream = channel.stream_stream(SERVICE + method, request_serializer=identity)
                calls.append(stream(_waiting(release), metadata=metadata, timeout=10))
            else:
                unary = channel.stream_unary(SERVICE + method, request_serializer=identity)
                calls.append(unary.future(_waiting(release), metadata=metadata, timeout=10))
        _settle(calls)
        release.set()


def _over_budget(channel: grpc.Channel) -> None:
    """More calls waiting for their request than admission has slots: the oldest are taken back (cancelled by
    the server), and the last ones cancelled by their client."""
    release = threading.Event()
    unary = channel.stream_unary(SERVICE + "Handshake", request_serializer=identity)
    calls = [unary.future(_waiting(release), metadata=AUTH, timeout=10) for _ in range(3 * WORKERS)]
    _settle(calls)
    release.set()


def _garbage_handshakes(channel: grpc.Channel) -> None:
    handshake = channel.unary_unary(
        SERVICE + "Handshake", request_serializer=pb.HandshakeRequest.SerializeToString, response_deserializer=identity
    )
    spec = pb.TensorSpec(shape=[CUT_DIM], dtype=pb.DTYPE_FLOAT32)
    requests = [
        pb.HandshakeRequest(),
        pb.HandshakeRequest(protocol_version=10**6, contract=pb.CutContract(iv=spec)),
        pb.HandshakeRequest(protocol_version=PROTOCOL_VERSION, session_id="x" * 5000, contract=pb.CutContract(iv=spec)),
        pb.HandshakeRequest(protocol_version=PROTOCOL_VERSION, client_id="\u202e" * 300),
        pb.HandshakeRequest(
            protocol_version=PROTOCOL_VERSION,
            contract=pb.CutContract(iv=pb.TensorSpec(shape=[-1, 2**40], dtype=pb.DTYPE_FLOAT32)),
        ),
        pb.HandshakeRequest(
            protocol_version=PROTOCOL_VERSION,
            contract=pb.CutContract(iv=pb.TensorSpec(shape=[CUT_DIM], dtype=99)),  # type: ignore[arg-type]
            max_batch_size=2**31,
            encodings=[12345],  # type: ignore[list-item]
        ),
        pb.HandshakeRequest(protocol_version=PROTOCOL_VERSION, session_id="not-open", contract=pb.CutContract(iv=spec)),
    ]
    for request in requests:
        _refused(handshake, request, metadata=AUTH, timeout=10, allow_ok=True)


def _dropped_watches(channel: grpc.Channel) -> None:
    watch = health_pb2_grpc.HealthStub(channel).Watch
    for _ in range(2):  # read, then dropped
        call = watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
        next(call)  # SERVING
        call.cancel()
    calls = [watch(health_pb2.HealthCheckRequest(service=""), timeout=10) for _ in range(4)]  # over the budget
    _settle(calls)
    garbage = channel.unary_stream("/grpc.health.v1.Health/Watch", request_serializer=identity)
    _refused(_drained(garbage), GARBAGE[0], timeout=10)
    check = channel.unary_unary("/grpc.health.v1.Health/Check", request_serializer=identity)
    _refused(check, GARBAGE[0], timeout=10)


def _sessions_never_trained(channel: grpc.Channel) -> None:
    for _ in range(3):  # one more than the server holds
        _refused(_handshake, channel, AUTH, allow_ok=True)


def _handshake(channel: grpc.Channel, metadata: list[tuple[str, str]]) -> Any:
    contract = pb.CutContract(iv=pb.TensorSpec(shape=[CUT_DIM], dtype=pb.DTYPE_FLOAT32))
    request = pb.HandshakeRequest(protocol_version=PROTOCOL_VERSION, contract=contract, max_batch_size=8)
    handshake = channel.unary_unary(
        SERVICE + "Handshake", request_serializer=pb.HandshakeRequest.SerializeToString, response_deserializer=identity
    )
    return handshake(request, metadata=metadata, timeout=10)


def _waiting(release: threading.Event) -> Iterator[bytes]:
    """A request stream that sends nothing until `release` (bounded), then ends."""
    release.wait(10)
    yield from ()


def _settle(calls: list[Any]) -> None:
    """Give the server the calls (a moment, bounded), then cancel those still open and wait for each to end."""
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline and not all(call.done() for call in calls):
        time.sleep(0.02)
    for call in calls:
        call.cancel()
    for call in calls:
        with contextlib.suppress(grpc.FutureCancelledError):
            call.exception(timeout=10)


def _drained(stream: Any) -> Any:
    """A response-streaming call as a function that reads every response."""
    return lambda *args, **kwargs: list(stream(*args, **kwargs))


def _refused(call: Any, *args: Any, allow_ok: bool = False, **kwargs: Any) -> None:
    """`call(*args, **kwargs)` ends with a refusal (not UNKNOWN nor INTERNAL: no handler failed), or with OK where
    `allow_ok`."""
    try:
        call(*args, **kwargs)
    except grpc.RpcError as error:
        assert error.code() not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), error
        return
    assert allow_ok, "a hostile call was answered"
