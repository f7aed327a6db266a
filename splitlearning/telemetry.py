"""What both processes log to TensorBoard, under the same tags and steps, so their runs overlay.

The x-axis of every scalar is the session's step count after the step: the optimizer's `iterations` on
either side, `TrainRequest.step + 1` on the server. Per-step scalars are written every `log_every` steps
(when the count is a multiple of it) as means over the steps since the last write; epoch scalars at the
count when the epoch ended. Tags:

    step/<metric>          running loss and metrics of the epoch, as the server computes them
    time/step_ms           client: the whole step; server: request in -> response out
    time/compute_ms        client: the step less the exchange; server: inside the trainer
    time/network_ms        client: the exchange (encode, RPC, decode)
    time/wait_ms           server: response out -> next request in (the client's compute plus the network)
    bytes/sent             serialized message bytes per step, this process -> the other
    bytes/received         serialized message bytes per step, the other -> this process
    optimizer/learning_rate
    epoch/<metric>, epoch/val_<metric>, epoch/samples_per_s, epoch/index
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from splitlearning.events import ScalarWriter

log = logging.getLogger(__name__)


class Window:
    """Sums of per-step values since the last write; `means()` empties it."""

    def __init__(self) -> None:
        self._sums: dict[str, float] = {}
        self._count = 0

    def add(self, values: Mapping[str, float]) -> None:
        for key, value in values.items():
            self._sums[key] = self._sums.get(key, 0.0) + value
        self._count += 1

    def means(self) -> dict[str, float]:
        count = max(self._count, 1)
        means = {key: value / count for key, value in self._sums.items()}
        self._sums, self._count = {}, 0
        return means


class StepLog:
    """TensorBoard scalars for one process's run at `log_dir/<run>`: per step (every `log_every`) and per epoch."""

    def __init__(
        self,
        log_dir: str | Path,
        run: str,
        log_every: int = 1,
        learning_rate: Callable[[], float] | None = None,
    ) -> None:
        if log_every < 1:
            raise ValueError(f"--log-every must be at least 1, got {log_every}")
        self.writer = ScalarWriter(Path(log_dir) / run)
        self.log_every = log_every
        self._learning_rate = learning_rate
        self._window = Window()
        log.info("TensorBoard scalars go to %s", self.writer.path.parent)

    def step(self, done: int, metrics: Mapping[str, float], timing: Mapping[str, float]) -> None:
        """After the step that brings the count to `done`: `metrics` as they stand, `timing` to average."""
        self._window.add(timing)
        if done % self.log_every:
            return
        values = {f"step/{name}": value for name, value in metrics.items()}
        values.update(self._window.means())
        if self._learning_rate is not None:
            values["optimizer/learning_rate"] = self._learning_rate()
        self.writer.scalars(done, values)

    def epoch(self, done: int, epoch: int, logs: Mapping[str, float]) -> None:
        """At the end of epoch `epoch` (from 0), with the step count `done`; flushes the file."""
        values = {f"epoch/{name.replace('/', '_')}": value for name, value in logs.items()}
        values["epoch/index"] = epoch
        self.writer.scalars(done, values)
        self.writer.flush()

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


def learning_rate_of(optimizer: Any) -> float:
    """The optimizer's current learning rate (a schedule's value at the current step)."""
    return float(np.asarray(optimizer.learning_rate))
