"""`Aggregator`: the rounds of every group, served over gRPC, on its own (`AggregatorServer`, `split-aggregator`)
or mounted in a `SplitServer` (`split-server --aggregator`)."""

from __future__ import annotations

import logging
import threading
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2
from prometheus_client import CollectorRegistry

from aggregator.rounds import Rounds
from aggregator.servicer import AggregatorServicer, add_to_server
from aggregator.store import GroupStore
from aggregator.telemetry import AggregatorTelemetry
from splitlearning import keepalive
from splitlearning.addresses import bind
from splitlearning.protocol import AGGREGATOR_SERVICE, MAX_STATE_BYTES
from splitlearning.security import Secret, TlsConfig, describe, is_loopback
from splitlearning.serving import admission
from splitlearning.serving.auth import TokenAuthInterceptor
from splitlearning.serving.health import add_health_to_server
from splitlearning.serving.prometheus import MetricsEndpoint, host_of

log = logging.getLogger(__name__)

# A first part's weights travel in one message: room for large ones (the server's own limit is its batch's).
_TICK_SECONDS = 0.5


class Aggregator:
    """Every group's rounds (aggregator/rounds.py) with their metrics and a thread that closes overdue rounds.

    `members`: how many members each group has (a SplitFed round waits for all of them); `deadline`: seconds
    a round (round-robin: a turn) may stay open, after which it closes without the members that did not submit
    (0: wait for ever); `min_members`: the fewest submissions a SplitFed round closes with at its deadline;
    `state_dir`: keep every group's state there, so a restarted aggregator goes on where it stopped.
    """

    def __init__(
        self,
        members: int,
        deadline: float = 0.0,
        min_members: int = 1,
        state_dir: str | Path | None = None,
        registry: CollectorRegistry | None = None,
        max_state_bytes: int = MAX_STATE_BYTES,
    ) -> None:
        self.max_state_bytes = max_state_bytes
        self.registry = registry if registry is not None else CollectorRegistry()
        self.telemetry = AggregatorTelemetry(self.registry)
        store = GroupStore(Path(state_dir)) if state_dir is not None else None
        self.rounds = Rounds(
            members,
            deadline,
            min_members,
            store,
            on_close=self.telemetry.round_closed,
            on_submit=self.telemetry.submitted,
            on_open=self.telemetry.round_opened,
        )
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    def add_to(self, server: grpc.Server) -> None:
        """Register the service on `server` and start closing overdue rounds."""
        add_to_server(AggregatorServicer(self.rounds), server)
        if self._ticker is None:
            self._stop.clear()
            self._ticker = threading.Thread(target=self._tick, name="split-rounds", daemon=True)
            self._ticker.start()

    def stop(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
            self._ticker = None

    def describe(self) -> str:
        deadline = f"a {self.rounds.deadline:g} s deadline per round" if self.rounds.deadline else "no deadline"
        return f"{self.rounds.members} members per group, {deadline}"

    def _tick(self) -> None:
        while not self._stop.wait(_TICK_SECONDS):
            try:
                self.rounds.tick()
            except Exception:  # a failed write, say: logged, and the next tick tries again
                log.exception("closing overdue rounds failed")


class AggregatorServer:
    """An `Aggregator` on a gRPC server of its own, with health checking, TLS and a bearer token as asked."""

    def __init__(
        self,
        aggregator: Aggregator,
        tls: TlsConfig | None = None,
        auth_token: Secret | str | None = None,
        max_workers: int | None = None,
        metrics_port: int | None = None,
        metrics_host: str | None = None,
    ) -> None:
        self.aggregator = aggregator
        self.tls = tls
        self._auth_token = Secret(auth_token) if isinstance(auth_token, str) else auth_token
        # Each member holds at most one call (a join that waits, or a submission), and a few spare.
        self._max_workers = max_workers if max_workers is not None else 2 * aggregator.rounds.members + 4
        self._metrics_request = (metrics_host, metrics_port)
        self._metrics: MetricsEndpoint | None = None
        self._server: grpc.Server | None = None
        self._health = health.HealthServicer()

    @property
    def metrics_port(self) -> int | None:
        return self._metrics.port if self._metrics is not None else None

    def start(self, address: str = "127.0.0.1:0") -> int:
        if self._server is not None:
            raise RuntimeError("this aggregator is already started")
        gate = admission.AdmissionInterceptor(self._max_workers)
        server = grpc.server(
            futures.ThreadPoolExecutor(self._max_workers + admission.EXTRA_THREADS, thread_name_prefix="split-agg"),
            options=[
                ("grpc.max_receive_message_length", self.aggregator.max_state_bytes),
                ("grpc.max_send_message_length", self.aggregator.max_state_bytes),
                ("grpc.so_reuseport", 0),
                *keepalive.server_options(keepalive.SERVER_MIN_PING_MS),
            ],
            interceptors=[*([TokenAuthInterceptor(self._auth_token)] if self._auth_token else []), gate],
        )
        self.aggregator.add_to(server)
        self._health = health.HealthServicer()
        add_health_to_server(self._health, server)
        port = bind(server, address, self.tls)
        server.start()
        self._server = server
        host, metrics_port = self._metrics_request
        if metrics_port is not None:
            self._metrics = MetricsEndpoint(self.aggregator.registry, host or host_of(address), metrics_port)
        for name in ("", AGGREGATOR_SERVICE):
            self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "serving %s on %s (port %d, %s): %s",
            AGGREGATOR_SERVICE,
            address,
            port,
            describe(self.tls, self._auth_token),
            self.aggregator.describe(),
        )
        if self.tls is None and not is_loopback(address):
            log.warning(
                "INSECURE: serving without TLS on non-loopback address %s: first-part weights cross the network in "
                "clear text; pass --tls-cert/--tls-key (and --tls-ca for mutual TLS)",
                address,
            )
        return port

    def wait(self, timeout: float | None = None) -> bool:
        if self._server is None:
            raise RuntimeError("this aggregator is not started")
        return bool(self._server.wait_for_termination(timeout))

    def stop(self, grace: float | None = 5.0) -> None:
        if self._server is None:
            return
        self._health.enter_graceful_shutdown()
        self.aggregator.stop()
        self._server.stop(grace).wait(None if grace is None else grace + 2.0)
        self._server = None
        if self._metrics is not None:
            self._metrics.stop()
            self._metrics = None
        log.info("stopped")

    def __enter__(self) -> AggregatorServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
