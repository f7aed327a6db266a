"""`TensorBoardLogger`: a Keras callback for `SplitClient.fit` writing the client's run under `log_dir/client`.

Scalars and steps as in `splitlearning.telemetry`, so the client's run overlays the server's by step.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import keras

from client_part.telemetry import StepTotals
from splitlearning.telemetry import StepLog, learning_rate_of

if TYPE_CHECKING:
    from client_part.client import SplitClient


class TensorBoardLogger(keras.callbacks.Callback):
    def __init__(self, client: SplitClient, log_dir: str | Path, log_every: int = 1) -> None:
        super().__init__()
        self._client = client
        self._log = StepLog(log_dir, "client", log_every, lambda: learning_rate_of(client.trainer.optimizer))
        self._epoch_start = StepTotals()

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._epoch_start = self._client.meter.snapshot()

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        last = self._client.meter.last
        timing = {
            "time/step_ms": last.seconds * 1e3,
            "time/compute_ms": last.compute_seconds * 1e3,
            "time/network_ms": last.network_seconds * 1e3,
            "bytes/sent": float(last.bytes_sent),
            "bytes/received": float(last.bytes_received),
        }
        self._log.step(self._client.step, logs or {}, timing)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        now, start = self._client.meter.totals, self._epoch_start
        values = dict(logs or {})
        seconds = now.seconds - start.seconds
        if seconds > 0:
            values["samples_per_s"] = (now.samples - start.samples) / seconds
        self._log.epoch(self._client.step, epoch, values)

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        self._log.writer.flush()

    def close(self) -> None:
        self._log.close()
