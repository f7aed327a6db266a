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


class ServerTelemetry:
    """Counters, histograms and (with `log_dir`) TensorBoard scalars for one `SplitServer`."""

    def __init__(
        self,
        metric_names: Sequence[str],
        log_dir: str | Path | None = None,
        log_every: int = 1,
        learning_rate: Callable[[], float] | None = None,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.metric_names = list(metric_names)
        r = self.registry
        self.steps = Counter("split_server_steps", "Training steps answered (a retried step counts again)", registry=r)
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
        self.step_gauge = Gauge("split_server_step", "Steps applied in the session (the next step to send)", registry=r)
        self.metric_gauge = Gauge(
            "split_server_train_metric", "Running training loss and metrics of the epoch", ["name"], registry=r
        )
        self.recent = _RecentQuantiles()
        r.register(self.recent)
        self._train_latency = self.latency.labels("Train")
        self._train_requests = self.requests.labels("Train")
        self._train_received = self.bytes_received.labels("Train")
        self._train_sent = self.bytes_sent.labels("Train")
        self._metric_gauges = [self.metric_gauge.labels(name) for name in self.metric_names]
        self._tensorboard = StepLog(log_dir, "server", log_every, learning_rate) if log_dir is not None else None
        self._lock = threading.Lock()  # guards the epoch bookkeeping below
        self._epoch = -1
        self._last_done = 0
        self._last_metrics: list[float] = []
        self._epoch_open = False

    def rpc(self, method: str, code: str, seconds: float, received: int, sent: int) -> None:
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
            self.close_epoch()  # validation follows the epoch's last step

    def step(
        self,
        step: int,
        reset: bool,
        metrics: Sequence[float],
        compute: float,
        serve: float,
        wait: float | None,
        received: int,
        sent: int,
        completes: bool = True,
    ) -> None:
        """A training request of step `step` (from 0) was answered with the running `metrics`; seconds and
        bytes as measured. Every request counts as one; only a reply that completes a step not counted yet
        counts as a step (not a resend answered from the first reply, nor a micro-batch before the last)."""
        self._train_requests.inc()
        self._train_latency.observe(serve)
        self.recent.add(serve)
        self.compute.inc(compute)
        self._train_received.inc(received)
        self._train_sent.inc(sent)
        with self._lock:
            new = completes and step + 1 > self._last_done
        if not new:
            return
        self.steps.inc()
        self.step_gauge.set(step + 1)
        for gauge, value in zip(self._metric_gauges, metrics, strict=False):
            gauge.set(value)
        if reset:
            self._open_epoch(step)
        with self._lock:
            self._last_done, self._last_metrics, self._epoch_open = step + 1, list(metrics), True
        if self._tensorboard is not None:
            timing = {
                "time/step_ms": serve * 1e3,
                "time/compute_ms": compute * 1e3,
                "bytes/received": float(received),
                "bytes/sent": float(sent),
            }
            if wait is not None:
                timing["time/wait_ms"] = wait * 1e3
            self._tensorboard.step(step + 1, dict(zip(self.metric_names, metrics, strict=False)), timing)

    def close_epoch(self) -> None:
        """The epoch in progress has ended (validation began, a new epoch began, or the server stops)."""
        with self._lock:
            if not self._epoch_open:
                return
            self._epoch_open = False
            done, metrics, epoch = self._last_done, self._last_metrics, self._epoch
        logs = dict(zip(self.metric_names, metrics, strict=False))
        log.info("epoch %d: %s", epoch + 1, ", ".join(f"{k} {v:.4f}" for k, v in logs.items()), extra={"step": done})
        if self._tensorboard is not None:
            self._tensorboard.epoch(done, epoch, logs)

    def close(self) -> None:
        self.close_epoch()
        if self._tensorboard is not None:
            self._tensorboard.close()

    def _open_epoch(self, step: int) -> None:
        self.close_epoch()
        with self._lock:
            self._epoch += 1
