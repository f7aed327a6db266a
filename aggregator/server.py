"""`Aggregator`: the rounds of every group, served over gRPC, on its own (`AggregatorServer`, `split-aggregator`)
or mounted in a `SplitServer` (`split-server --aggregator`)."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import grpc
from prometheus_client import CollectorRegistry

from aggregator.rounds import Rounds
from aggregator.servicer import AggregatorServicer, add_to_server
from aggregator.store import GroupStore
from aggregator.telemetry import AggregatorTelemetry
from splitlearning.aggregation import FEDAVG, Aggregation
from splitlearning.protocol import AGGREGATOR_SERVICE, MAX_STATE_BYTES
from splitlearning.security import Secret, TlsConfig, describe
from splitlearning.serving.host import Host, HostConfig

log = logging.getLogger(__name__)

# A first part's weights travel in one message: room for large ones (the server's own limit is its batch's).
_TICK_SECONDS = 0.5


class Aggregator:
    """Every group's rounds (aggregator/rounds.py) with their metrics and a thread that closes overdue rounds.

    `members`: how many members each group has (a SplitFed round waits for all of them); `deadline`: seconds
    a round (round-robin: a turn) may stay open, after which it closes without the members that did not submit
    (0: wait for ever); `min_members`: the fewest submissions a SplitFed round closes with at its deadline;
    `state_dir`: keep every group's state there, so a restarted aggregator goes on where it stopped;
    `aggregation`: how a SplitFed round's first parts are combined (the server's second parts must be combined
    by the same rule: it refuses a member's handshake otherwise).
    """

    def __init__(
        self,
        members: int,
        deadline: float = 0.0,
        min_members: int = 1,
        state_dir: str | Path | None = None,
        registry: CollectorRegistry | None = None,
        max_state_bytes: int = MAX_STATE_BYTES,
        aggregation: Aggregation = FEDAVG,
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
            aggregation=aggregation,
        )
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    # -- a `Mount` (splitlearning/serving/host.py): served alone, or mounted in a SplitServer ---------------------

    service_names = (AGGREGATOR_SERVICE,)

    @property
    def max_message_bytes(self) -> int:
        """A member's first part travels in one message."""
        return self.max_state_bytes

    def add_to(self, server: grpc.Server) -> None:
        """Register the service on `server`."""
        add_to_server(AggregatorServicer(self.rounds), server)

    def start(self) -> None:
        """Start closing overdue rounds."""
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
        token = Secret(auth_token) if isinstance(auth_token, str) else auth_token
        config = HostConfig(
            "split-agg",
            # Each member holds at most one call (a join that waits, or a submission), and a few spare.
            max_workers if max_workers is not None else 2 * aggregator.rounds.members + 4,
            clear_text="first-part weights",
            tls=tls,
            auth_token=token,
            metrics_host=metrics_host,
            metrics_port=metrics_port,
        )
        self.host = Host(config, [aggregator], aggregator.registry)

    @property
    def metrics_port(self) -> int | None:
        return self.host.metrics_port

    def start(self, address: str = "127.0.0.1:0") -> int:
        port = self.host.start(address)
        log.info(
            "serving %s on %s (port %d, %s): %s",
            AGGREGATOR_SERVICE,
            address,
            port,
            describe(self.tls, self.host.config.auth_token),
            self.aggregator.describe(),
        )
        self.host.warn_if_insecure(address)
        return port

    def wait(self, timeout: float | None = None) -> bool:
        return self.host.wait(timeout)

    def stop(self, grace: float | None = 5.0) -> None:
        if self.host.stop(grace):
            log.info("stopped")

    def __enter__(self) -> AggregatorServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
