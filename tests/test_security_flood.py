"""A flood of token-less calls from one peer is one log line, and every call is counted (issue 26; docs/security.md).

Real servers on 127.0.0.1 port 0 (a SplitServer and an AggregatorServer, each with a token), real channels; the
counter is read from the Prometheus endpoint each server serves.
"""

from __future__ import annotations

import logging

import grpc
import pytest

from aggregator.server import Aggregator, AggregatorServer
from server_part import SplitServer
from tests.conftest import build_top, make_loss
from tests.observability_support import scrape, value

TOKEN = "flood-token-0123456789"
CALLS = 40
SERIES = "split_unauthenticated_requests_total"
SPLIT = "/splitlearning.v1.SplitLearningService/"
AGGREGATOR = "/splitlearning.v1.AggregatorService/"
REFUSED_LINE = "missing or invalid bearer token"

identity = lambda data: data  # noqa: E731 (bytes on the wire as they are)


def flood(port: int, methods: list[str], calls: int) -> None:
    """`calls` token-less calls per method (a fresh connection for every tenth: other ports, the same host)."""
    for start in range(0, calls, 10):
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            for method in methods:
                unary = channel.unary_unary(method, request_serializer=identity, response_deserializer=identity)
                for _ in range(min(10, calls - start)):
                    metadata = [("authorization", "Bearer wrong")] if start % 20 else []
                    with pytest.raises(grpc.RpcError) as refused:
                        unary(b"", metadata=metadata, timeout=10)
                    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


def refusal_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if REFUSED_LINE in r.getMessage()]


def test_a_token_less_flood_on_a_split_server_is_one_log_line_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    server = SplitServer(build_top("plain", 0), make_loss(), "sgd", ["accuracy"], auth_token=TOKEN, metrics_port=0)
    port = server.start("127.0.0.1:0")
    try:
        flood(port, [SPLIT + "Handshake", SPLIT + "Predict"], CALLS)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:  # unknown: UNIMPLEMENTED, no label per name
            unknown = channel.unary_unary(SPLIT + "NoSuchMethod", request_serializer=identity)
            with pytest.raises(grpc.RpcError) as info:
                unknown(b"", timeout=10)
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert server.metrics_port is not None
        samples = scrape(server.metrics_port)
        assert value(samples, SERIES, method=SPLIT + "Handshake") == CALLS
        assert value(samples, SERIES, method=SPLIT + "Predict") == CALLS
        assert not [key for key in samples if key[0] == SERIES and "NoSuchMethod" in str(key)]
        lines = refusal_lines(caplog)
        assert len(lines) == 1, lines  # the first refusal, naming its peer; the rest within the minute are counted
        assert "127.0.0.1" in lines[0] and "not logged" in lines[0] and TOKEN not in caplog.text
    finally:
        server.stop(grace=0.5)
    # Started again (a new host on the same registry): the series counts on.
    port = server.start("127.0.0.1:0")
    try:
        flood(port, [SPLIT + "Handshake"], 1)
        assert server.metrics_port is not None
        assert value(scrape(server.metrics_port), SERIES, method=SPLIT + "Handshake") == CALLS + 1
    finally:
        server.stop(grace=0.5)


def test_a_token_less_flood_on_an_aggregator_is_one_log_line_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    server = AggregatorServer(Aggregator(2, 0.0), auth_token=TOKEN, metrics_port=0)
    port = server.start("127.0.0.1:0")
    try:
        flood(port, [AGGREGATOR + "JoinRound", AGGREGATOR + "SubmitRound"], CALLS)
        assert server.metrics_port is not None
        samples = scrape(server.metrics_port)
        assert value(samples, SERIES, method=AGGREGATOR + "JoinRound") == CALLS
        assert value(samples, SERIES, method=AGGREGATOR + "SubmitRound") == CALLS
        assert len(refusal_lines(caplog)) == 1, refusal_lines(caplog)
    finally:
        server.stop(grace=0.5)
