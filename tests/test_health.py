"""The standard grpc.health.v1 service of a `SplitServer`."""

from __future__ import annotations

import logging
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from splitlearning.protocol import SPLIT_SERVICE
from tests.conftest import StartServer
from tests.raw_support import UNDECODABLE

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
TIMEOUT = 10.0


def check(channel: grpc.Channel, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT).status


def test_service_name() -> None:
    assert SPLIT_SERVICE == "splitlearning.v1.SplitLearningService"


def test_serving_after_start(split_pair: StartServer) -> None:
    split = split_pair()
    with grpc.insecure_channel(split.target) as channel:
        assert check(channel, "") == SERVING
        assert check(channel, "splitlearning.v1.SplitLearningService") == SERVING


def test_unknown_service_is_not_found(split_pair: StartServer) -> None:
    split = split_pair()
    with grpc.insecure_channel(split.target) as channel, pytest.raises(grpc.RpcError) as info:
        check(channel, "no.such.Service")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_not_serving_then_unavailable_after_stop(split_pair: StartServer) -> None:
    split = split_pair()
    with grpc.insecure_channel(split.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        watches = {
            service: stub.Watch(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT)
            for service in ("", SPLIT_SERVICE)
        }
        for stream in watches.values():
            assert next(stream).status == SERVING

        # Each watcher sees NOT_SERVING announced while the server shuts down.
        seen: dict[str, list[int]] = {service: [] for service in watches}

        def drain(service: str) -> None:
            try:
                for reply in watches[service]:
                    seen[service].append(reply.status)
            except grpc.RpcError:
                pass  # the stream ends when the server goes away

        readers = [threading.Thread(target=drain, args=(service,)) for service in watches]
        for reader in readers:
            reader.start()
        split.server.stop(grace=0.3)
        for reader in readers:
            reader.join(TIMEOUT)
            assert not reader.is_alive()
        for service, statuses in seen.items():
            assert NOT_SERVING in statuses, (service, statuses)
            assert SERVING not in statuses, (service, statuses)

        for service in ("", SPLIT_SERVICE):
            with pytest.raises(grpc.RpcError) as info:
                check(channel, service)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_stop_is_idempotent(split_pair: StartServer) -> None:
    split = split_pair()
    split.server.stop(grace=0.5)
    split.server.stop(grace=0.5)
    with pytest.raises(RuntimeError, match="not started"):
        split.server.wait(0.1)


def test_start_twice_is_refused(split_pair: StartServer) -> None:
    split = split_pair()
    with pytest.raises(RuntimeError, match="already started"):
        split.server.start("127.0.0.1:0")


def test_restart_after_stop_serves_again(split_pair: StartServer) -> None:
    split = split_pair()
    split.server.stop(grace=0.5)
    port = split.server.start("127.0.0.1:0")
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        assert check(channel, "") == SERVING
        assert check(channel, SPLIT_SERVICE) == SERVING


def test_bytes_that_are_no_message_are_invalid_argument_logged_once(
    split_pair: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The health service is reachable without the token: random bytes get INVALID_ARGUMENT (not INTERNAL)
    and at most one log line per peer per minute, never a traceback (issue 16, item 2)."""
    split = split_pair()
    caplog.set_level(logging.DEBUG)
    with grpc.insecure_channel(split.target) as channel:
        identity = lambda data: data  # noqa: E731 (bytes on the wire as they are)
        for method in ["Check"] * 10 + ["Watch"] * 10:
            call = (channel.unary_unary if method == "Check" else channel.unary_stream)(
                f"/grpc.health.v1.Health/{method}", request_serializer=identity, response_deserializer=identity
            )
            with pytest.raises(grpc.RpcError) as info:
                reply = call(UNDECODABLE, timeout=TIMEOUT)
                if method == "Watch":
                    list(reply)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
            assert "not a valid HealthCheckRequest" in (info.value.details() or "")
        assert check(channel, "") == SERVING
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    refused = [r for r in caplog.records if "HealthCheckRequest" in r.getMessage()]
    assert len(refused) == 1, [r.getMessage() for r in refused]
