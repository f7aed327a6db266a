"""Admission (issue 16, item 1): half-open calls, unauthenticated or to the health service, stop nothing.

The attack: calls whose request message never completes (HEADERS, then a DATA frame with part of a message;
see tests/halfopen_support.py). Unauthenticated ones must be refused from their metadata, and health checks
and token-holding clients served within 2 s (the issue's bound) while 1,000 are held open, over plaintext and
over TLS without a client certificate. The server's threads stay bounded (its memory, per docs/security.md).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server_part import SplitServer
from splitlearning.protocol import PROTOCOL_VERSION
from splitlearning.security import TlsConfig
from splitlearning.v1 import split_learning_pb2 as pb
from splitlearning.v1 import split_learning_pb2_grpc as pb_grpc
from tests.conftest import CUT_DIM, build_top, make_loss
from tests.halfopen_support import HalfOpenConnection, half_open_calls
from tests.security_support import make_authority

TOKEN = "s3cret-token"
CALLS, CONNECTIONS = 1000, 20
SERVED_WITHIN = 2.0  # seconds: the issue's bound
SERVICE = "/splitlearning.v1.SplitLearningService/"
UNARY = [SERVICE + "Handshake", SERVICE + "Evaluate", SERVICE + "Predict"]
HEALTH = "/grpc.health.v1.Health/Check"


@dataclass
class Guarded:
    server: SplitServer
    port: int
    ca: Path | None
    earlier_threads: set[int]  # pool threads of servers stopped before this one started (they linger, idle)

    def threads(self) -> int:
        """This server's threads for calls (its pool's)."""
        return len(_rpc_threads() - self.earlier_threads)

    def channel(self) -> grpc.Channel:
        target = f"127.0.0.1:{self.port}"
        if self.ca is None:
            return grpc.insecure_channel(target)
        credentials = grpc.ssl_channel_credentials(self.ca.read_bytes())
        return grpc.secure_channel(target, credentials, options=[("grpc.ssl_target_name_override", "localhost")])


@pytest.fixture(params=["plaintext", "tls"])
def guarded(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Guarded]:
    tls, ca = None, None
    if request.param == "tls":  # TLS, no client certificate required
        authority = make_authority(tmp_path, "trusted")
        issued = authority.issue("server", server=True)
        tls, ca = TlsConfig.from_files(issued.cert, issued.key), authority.cert
    server = SplitServer(build_top("plain", 0), make_loss(), "sgd", ["accuracy"], auth_token=TOKEN, tls=tls)
    earlier = _rpc_threads()
    port = server.start("127.0.0.1:0")
    yield Guarded(server, port, ca, earlier)
    server.stop(grace=0.5)


def _rpc_threads() -> set[int]:
    return {t.ident or 0 for t in threading.enumerate() if t.name.startswith("split-rpc")}


def wait_refused(connections: list[HalfOpenConnection], at_least: int) -> None:
    """Bounded: until the server has ended `at_least` of the calls (it takes them in turn), or 60 s (1,000 TLS
    handshakes on two busy cores took over 20 s once in CI)."""
    deadline = time.monotonic() + 60.0
    while sum(c.refused for c in connections) < at_least and time.monotonic() < deadline:
        time.sleep(0.05)


def assert_served(guarded: Guarded) -> None:
    """A health check and a token-holding client's handshake, each within SERVED_WITHIN seconds."""
    with guarded.channel() as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=SERVED_WITHIN)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = pb_grpc.SplitLearningServiceStub(channel)
        contract = pb.CutContract(iv=pb.TensorSpec(shape=[CUT_DIM], dtype=pb.DTYPE_FLOAT32))
        request = pb.HandshakeRequest(protocol_version=PROTOCOL_VERSION, contract=contract, max_batch_size=8)
        agreed = stub.Handshake(request, metadata=[("authorization", f"Bearer {TOKEN}")], timeout=SERVED_WITHIN)
        assert agreed.session_id


def test_half_open_unauthenticated_calls_are_refused_and_stop_nothing(guarded: Guarded) -> None:
    with half_open_calls(guarded.port, UNARY, CALLS, CONNECTIONS, guarded.ca) as connections:
        # Refused from their metadata (UNAUTHENTICATED), with no need for the request: every one of them.
        wait_refused(connections, CALLS)
        assert sum(c.refused for c in connections) == CALLS
        assert_served(guarded)
        assert_served(guarded)
        assert guarded.threads() <= guarded.server.admission_threads


def test_half_open_health_checks_stop_nothing(guarded: Guarded) -> None:
    with half_open_calls(guarded.port, [HEALTH], CALLS, CONNECTIONS, guarded.ca) as connections:
        wait_refused(connections, CALLS - guarded.server.admission_threads)
        assert_served(guarded)
        assert_served(guarded)
        assert guarded.threads() <= guarded.server.admission_threads
