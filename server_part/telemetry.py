"""What the server counts while serving: Prometheus metrics, TensorBoard scalars and per-step debug logs.

No gRPC here: the interceptor (server_part/interceptor.py) measures the RPCs and calls these methods with
plain numbers. Each `ServerTelemetry` owns its `CollectorRegistry` (not the process-global one), so several
servers in one process (tests) count apart. The hot path is a few counter increments per step.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from splitlearning.telemetry import StepLog

log = logging.getLogger(__name__)

# Step latencies on loopback are a few ms; over a WAN, hundreds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
QUANTILES = (0.5, 0.9, 0.99)
_RECENT = 1024


class _RecentQuantiles(Collector):
    """`split_server_step_latency_recent_seconds{quantile=...}` over the last steps, computed at scrape."""

    def __init__(self) -> None:
        self._values: collections.deque[float] = collections.deque(maxlen=_RECENT)

    def add(self, seconds: float) -> None:
        self._values.append(seconds)

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "split_server_step_latency_recent_seconds",
            f"Quantiles of the training step latency over the last {_RECENT} steps",
            labels=["quantile"],
        )
        values = np.fromiter(list(self._values), float)
        if values.size:
            for q in QUANTILES:
                family.add_metric([str(q)], float(np.quantile(values, q)))
        yield family


class _SessionSeries:
    """One session's share of the telemetry: its labelled series, its TensorBoard run and its epochs."""

    def __init__(self, telemetry: ServerTelemetry, session: str) -> None:
        self.session = session
        self.steps = telemetry.session_steps.labels(session)
        self.step_gauge = telemetry.step_gauge.labels(session)
        self.metric_gauges = [telemetry.metric_gauge.labels(session, name) for name in telemetry.metric_names]
        self.tensorboard: StepLog | None = None
        if telemetry.log_dir is not None:
            rate = telemetry.learning_rate
            self.tensorboard = StepLog(
                telemetry.log_dir,
                f"server/{session}",
                telemetry.log_every,
                (lambda: rate(session)) if rate is not None else None,
            )
        self.epoch = -1
        self.last_done = 0
        self.last_metrics: list[float] = []
        self.epoch_open = False


class ServerTelemetry:
    """Counters, histograms and (with `log_dir`) TensorBoard scalars for one `SplitServer`.

    Totals (requests, bytes, latency, compute, steps) are server-wide; a session's own state (its step, its
    running metrics, its steps) is labelled `session`, and its TensorBoard run is `log_dir/server/<session>`.
    A session's labelled series are removed when it leaves memory (`forget`), so a long-lived server's
    series stay bounded by its sessions in memory.
    """

    def __init__(
        self,
        metric_names: Sequence[str],
        log_dir: str | Path | None = None,
        log_every: int = 1,
        learning_rate: Callable[[str], float] | None = None,
    ) -> None:
        if log_every < 1:
            raise ValueError(f"--log-every must be at least 1, got {log_every}")
        self.registry = CollectorRegistry(auto_describe=True)
        self.metric_names = list(metric_names)
        self.log_dir, self.log_every, self.learning_rate = log_dir, log_every, learning_rate
        r = self.registry
        self.steps = Counter(
            "split_server_steps", "Training steps answered, all sessions (a retried step counts again)", registry=r
        )
        self.session_steps = Counter(
            "split_server_session_steps", "Training steps applied, by session", ["session"], registry=r
        )
        self.requests = Counter(
            "split_server_requests", "Requests handled, by RPC (each Train message counts)", ["method"], registry=r
        )
        self.errors = Counter(
            "split_server_errors",
            "Requests refused or failed, by RPC and gRPC status code",
            ["method", "code"],
            registry=r,
        )
        self.latency = Histogram(
            "split_server_latency_seconds",
            "Time from request in to response out, by RPC (Train: per step)",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.compute = Counter("split_server_compute_seconds", "Time inside the trainer's training step", registry=r)
        self.bytes_received = Counter(
            "split_server_received_bytes", "Serialized request bytes received, by RPC", ["method"], registry=r
        )
        self.bytes_sent = Counter(
            "split_server_sent_bytes", "Serialized response bytes sent, by RPC", ["method"], registry=r
        )
        self.step_gauge = Gauge(
            "split_server_step", "Steps applied in the session (the next step to send)", ["session"], registry=r
        )
        self.metric_gauge = Gauge(
            "split_server_train_metric",
            "Running training loss and metrics of the session's epoch",
            ["session", "name"],
            registry=r,
        )
        self.sessions = Gauge("split_server_sessions", "Sessions in memory", registry=r)
        self.recent = _RecentQuantiles()
        r.register(self.recent)
        self._train_latency = self.latency.labels("Train")
        self._train_requests = self.requests.labels("Train")
        self._train_received = self.bytes_received.labels("Train")
        self._train_sent = self.bytes_sent.labels("Train")
        self._lock = threading.Lock()  # guards the sessions' series and their epoch bookkeeping
        self._series: dict[str, _SessionSeries] = {}

    def rpc(self, method: str, code: str, seconds: float, received: int, sent: int, session: str = "") -> None:
        """One unary RPC (or a Train stream's end, with `seconds` 0 and no bytes) finished with status `code`."""
        if method != "Train":
            self.requests.labels(method).inc()
            self.latency.labels(method).observe(seconds)
        if received:
            self.bytes_received.labels(method).inc(received)
        if sent:
            self.bytes_sent.labels(method).inc(sent)
        if code != "OK":
            self.errors.labels(method, code).inc()
        if method == "Evaluate" and code == "OK":
            self.close_epoch(session)  # validation follows the epoch's last step

    def step(
        self,
        session: str,
        step: int,
        reset: bool,
        metrics: Sequence[float],
        compute: float,
        serve: float,
        wait: float | None,
        received: int,
        sent: int,
        completes: bool = True,
        epoch: int | None = None,
    ) -> None:
        """A training request of step `step` (from 0) of `session` was answered with the running `metrics`;
        seconds and bytes as measured. Every request counts as one; only a reply that completes a step not
        counted yet counts as a step (not a resend answered from the first reply, nor a micro-batch before
        the last). `epoch`, on a step that resets the metrics, is the epoch's index as the client counts it."""
        self._train_requests.inc()
        self._train_latency.observe(serve)
        self.recent.add(serve)
        self.compute.inc(compute)
        self._train_received.inc(received)
        self._train_sent.inc(sent)
        with self._lock:
            series = self._series.get(session)
            if series is None:
                series = self._series[session] = _SessionSeries(self, session)
            new = completes and step + 1 > series.last_done
        if not new:
            return
        self.steps.inc()
        series.steps.inc()
        series.step_gauge.set(step + 1)
        for gauge, value in zip(series.metric_gauges, metrics, strict=False):
            gauge.set(value)
        # An epoch begins (or goes on here after a restart mid-epoch): a reset, or a step of another epoch (a
        # pipelined step's reset comes with its first micro-batch, and only its last one is counted here).
        if reset or (epoch is not None and epoch != series.epoch):
            self._open_epoch(series, epoch)
        with self._lock:
            series.last_done, series.last_metrics, series.epoch_open = step + 1, list(metrics), True
        if series.tensorboard is not None:
            timing = {
                "time/step_ms": serve * 1e3,
                "time/compute_ms": compute * 1e3,
                "bytes/received": float(received),
                "bytes/sent": float(sent),
            }
            if wait is not None:
                timing["time/wait_ms"] = wait * 1e3
            series.tensorboard.step(step + 1, dict(zip(self.metric_names, metrics, strict=False)), timing)

    def close_epoch(self, session: str) -> None:
        """The session's epoch in progress has ended (validation began, a new epoch began, or it stops)."""
        with self._lock:
            series = self._series.get(session)
            if series is None or not series.epoch_open:
                return
            series.epoch_open = False
            done, metrics, epoch = series.last_done, series.last_metrics, series.epoch
        logs = dict(zip(self.metric_names, metrics, strict=False))
        log.info(
            "epoch %d: %s",
            epoch + 1,
            ", ".join(f"{k} {v:.4f}" for k, v in logs.items()),
            extra={"step": done, "session": session},
        )
        if series.tensorboard is not None:
            series.tensorboard.epoch(done, epoch, logs)

    def forget(self, session: str) -> None:
        """The session left memory: close its epoch and TensorBoard run, remove its labelled series."""
        self.close_epoch(session)
        with self._lock:
            series = self._series.pop(session, None)
        if series is None:
            return
        self._end_run(series)
        for family in (self.session_steps, self.step_gauge):
            family.remove(session)
        for name in self.metric_names:
            self.metric_gauge.remove(session, name)

    def close(self) -> None:
        """The server stopped: close every session's epoch and TensorBoard run. Their labelled series stay (the
        sessions are still in memory, and a server started again goes on with them)."""
        with self._lock:
            held = list(self._series.values())
        for series in held:
            self.close_epoch(series.session)
            self._end_run(series)

    def _end_run(self, series: _SessionSeries) -> None:
        if series.tensorboard is not None:
            series.tensorboard.close()

    def _open_epoch(self, series: _SessionSeries, epoch: int | None) -> None:
        self.close_epoch(series.session)
        with self._lock:
            series.epoch = epoch if epoch is not None else series.epoch + 1
