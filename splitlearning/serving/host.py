"""One builder of a gRPC server for every service of this project: the thread pool sized from admission's
budgets, message limits, keepalive, the interceptors (the token check first, then admission, then the caller's),
standard health checking, TLS, the Prometheus endpoint, and a bounded graceful stop.

A role describes what it serves as `Mount`s (the model server's sessions, the aggregator's rounds) and a `Host`
serves them; `split-server --aggregator` is one host with both mounted, `split-aggregator` a host of its own.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import grpc
from grpc_health.v1 import health, health_pb2
from prometheus_client import CollectorRegistry

from splitlearning import keepalive
from splitlearning.addresses import bind
from splitlearning.security import Secret, TlsConfig, is_loopback
from splitlearning.serving import admission
from splitlearning.serving.auth import TokenAuthInterceptor, unauthenticated_requests
from splitlearning.serving.health import add_health_to_server
from splitlearning.serving.pool import IdleEndingThreadPool
from splitlearning.serving.prometheus import MetricsEndpoint, host_of

log = logging.getLogger(__name__)


class Mount(Protocol):
    """A service a `Host` serves. The host registers it, starts it once bound, stops it before the server
    stops (in the order mounted), and reports each of `service_names` to health checking."""

    @property
    def service_names(self) -> tuple[str, ...]:
        """The full names of its gRPC services."""
        ...

    @property
    def max_message_bytes(self) -> int:
        """The largest message it receives or sends (the host's limits are the largest of its mounts')."""
        ...

    def add_to(self, server: grpc.Server) -> None:
        """Register its servicers on `server`."""
        ...

    def start(self) -> None:
        """Begin its background work (the server is bound and about to serve)."""
        ...

    def stop(self) -> None:
        """Refuse new work and end its background work (the server stops next)."""
        ...

    def describe(self) -> str:
        """What it serves, in a few words, for the log."""
        ...


@dataclass(frozen=True)
class HostConfig:
    """How a `Host` serves. `max_workers`: concurrent calls of its services (admission's slots; a thread each,
    plus a few for health checks and refusals); `max_receive_bytes` / `max_send_bytes`: message limits on top
    of its mounts' own; `clear_text`: what crosses the network unencrypted without TLS, for the warning."""

    name: str
    max_workers: int
    clear_text: str
    tls: TlsConfig | None = None
    auth_token: Secret | None = None
    max_receive_bytes: int = 0
    max_send_bytes: int = 0
    min_ping_interval_ms: int = keepalive.SERVER_MIN_PING_MS
    max_concurrent_streams: int | None = None
    metrics_host: str | None = None
    metrics_port: int | None = None

    @property
    def threads(self) -> int:
        """The most threads its calls use: a slot each of every budget, and a few for refusals."""
        return self.max_workers + admission.EXTRA_THREADS


class Host:
    """Serves `mounts` on one gRPC server: `start` binds and serves, `stop` drains and ends (see the module)."""

    def __init__(
        self,
        config: HostConfig,
        mounts: Sequence[Mount],
        registry: CollectorRegistry,
        interceptors: Sequence[grpc.ServerInterceptor] = (),
    ) -> None:
        self.config = config
        self.mounts = list(mounts)
        self.registry = registry
        self.unauthenticated = unauthenticated_requests(registry)  # calls the token check refused, by method
        self._interceptors = list(interceptors)
        self._server: grpc.Server | None = None
        self._pool: IdleEndingThreadPool | None = None
        self.health = health.HealthServicer()
        self._metrics: MetricsEndpoint | None = None

    @property
    def serving(self) -> bool:
        return self._server is not None

    @property
    def metrics_port(self) -> int | None:
        """The bound port of the Prometheus endpoint while serving, else None."""
        return self._metrics.port if self._metrics is not None else None

    def start(self, address: str) -> int:
        """Bind `address`, start the mounts and serve; return the bound port (useful with port 0)."""
        if self._server is not None:
            raise RuntimeError(f"this {self.config.name} is already started")
        config = self.config
        receive = max([config.max_receive_bytes, *(mount.max_message_bytes for mount in self.mounts)])
        send = max([config.max_send_bytes, *(mount.max_message_bytes for mount in self.mounts)])
        # Admission, not gRPC's `maximum_concurrent_rpcs` (which counted calls still waiting for their request,
        # the unauthenticated ones included): a budget per kind of call, a thread per slot (admission.py).
        gate = admission.AdmissionInterceptor(config.max_workers)
        # Calls one connection may have open: bounds what one connection holds.
        streams = [] if config.max_concurrent_streams is None else [config.max_concurrent_streams]
        # Its threads end once idle: after a burst of calls the process is back to the threads it had (pool.py).
        self._pool = IdleEndingThreadPool(config.threads, config.name)
        server = grpc.server(
            self._pool,
            options=[
                ("grpc.max_receive_message_length", receive),
                ("grpc.max_send_message_length", send),
                *(("grpc.max_concurrent_streams", limit) for limit in streams),
                ("grpc.so_reuseport", 0),  # a second server on a taken port must fail, not share its clients
                *keepalive.server_options(config.min_ping_interval_ms),
            ],
            # The token check first, from the metadata: an unauthenticated call reaches nothing else.
            interceptors=[
                *(
                    [TokenAuthInterceptor(config.auth_token, self.unauthenticated)]
                    if config.auth_token is not None
                    else []
                ),
                gate,
                *self._interceptors,
            ],
        )
        for mount in self.mounts:
            mount.add_to(server)
        self.health = health.HealthServicer()  # a stopped one ignores set(): each start gets its own
        add_health_to_server(self.health, server)  # bytes that are no message: INVALID_ARGUMENT
        port = bind(server, address, config.tls)
        for mount in self.mounts:
            mount.start()
        server.start()
        self._server = server
        if config.metrics_port is not None:
            self._metrics = MetricsEndpoint(self.registry, config.metrics_host or host_of(address), config.metrics_port)
        for name in ("", *(name for mount in self.mounts for name in mount.service_names)):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        return port

    def warn_if_insecure(self, address: str) -> None:
        """Warn once serving in clear text beyond loopback (what crosses, and the flags that encrypt it)."""
        if self.config.tls is None and not is_loopback(address):
            token = " and the bearer token" if self.config.auth_token is not None else ""
            log.warning(
                "INSECURE: serving without TLS on non-loopback address %s: %s%s cross the network in clear text; "
                "pass --tls-cert/--tls-key (and --tls-ca for mutual TLS)",
                address,
                self.config.clear_text,
                token,
            )

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server stops (or `timeout` passes); True if it stopped."""
        if self._server is None:
            raise RuntimeError(f"this {self.config.name} is not started")
        return bool(self._server.wait_for_termination(timeout))

    def stop(self, grace: float | None = 5.0) -> bool:
        """Health turns NOT_SERVING, the mounts stop (in order), then RPCs get `grace` seconds to finish and
        the rest are cancelled; the metrics endpoint closes. False if it was not serving."""
        if self._server is None:
            return False
        self.health.enter_graceful_shutdown()
        for mount in self.mounts:
            mount.stop()
        # Bounded: RPCs still open after `grace` are cancelled, and the process must not hang on a stuck one.
        if not self._server.stop(grace).wait(None if grace is None else grace + 2.0):
            log.warning("RPCs did not finish within %g s of the grace period; stopping anyway", grace)
        self._server = None
        if self._pool is not None:  # gRPC leaves its pool as it is: idle threads end now, busy ones when done
            self._pool.shutdown(wait=False)
            self._pool = None
        if self._metrics is not None:
            self._metrics.stop()
            self._metrics = None
        return True
