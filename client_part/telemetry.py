"""What the client counts per training step: a few numbers, kept cheap enough for every step.

`SplitClient` feeds the meter: `exchange` from inside the step (the gRPC round trip: encode, send, wait,
decode), `step` after it. Communication is the exchange; compute is the rest of the step (forward,
backward, the update, handing tensors to and from TensorFlow). `EpochLog` turns it into log lines.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import keras

if TYPE_CHECKING:
    from client_part.client import SplitClient

log = logging.getLogger("split-client")


@dataclass
class StepTotals:
    """Sums over training steps (or, as `ClientMeter.last`, one step's values)."""

    steps: int = 0
    samples: int = 0
    seconds: float = 0.0
    network_seconds: float = 0.0
    bytes_sent: int = 0
    bytes_received: int = 0

    @property
    def compute_seconds(self) -> float:
        return max(self.seconds - self.network_seconds, 0.0)

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "compute_seconds": self.compute_seconds}


class ClientMeter:
    """Totals since creation, and the last step's values."""

    def __init__(self) -> None:
        self.totals = StepTotals()
        self.last = StepTotals()
        self._pending = StepTotals()

    def exchange(self, seconds: float, sent: int, received: int) -> None:
        """The step's round trip took `seconds` and moved these serialized bytes."""
        self._pending.network_seconds += seconds
        self._pending.bytes_sent += sent
        self._pending.bytes_received += received

    def step(self, samples: int, seconds: float) -> None:
        """A training step of `samples` took `seconds` in all."""
        last, self._pending = self._pending, StepTotals()
        last.steps, last.samples, last.seconds = 1, samples, seconds
        self.last = last
        t = self.totals
        t.steps += 1
        t.samples += samples
        t.seconds += seconds
        t.network_seconds += last.network_seconds
        t.bytes_sent += last.bytes_sent
        t.bytes_received += last.bytes_received

    def snapshot(self) -> StepTotals:
        return StepTotals(**asdict(self.totals))


class EpochLog(keras.callbacks.Callback):
    """INFO: one line per epoch; DEBUG: one per step; each with the session, step and peer."""

    def __init__(self, client: SplitClient) -> None:
        super().__init__()
        self._client = client

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        if log.isEnabledFor(logging.DEBUG):
            last = self._client.meter.last
            log.debug(
                "step done in %.2f ms (network %.2f ms): %s",
                last.seconds * 1e3,
                last.network_seconds * 1e3,
                _format(logs),
                extra=self._extra(),
            )

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        log.info("epoch %d: %s", epoch + 1, _format(logs), extra={**self._extra(), "epoch": epoch + 1})

    def _extra(self) -> dict[str, Any]:
        client = self._client
        return {"session": client.session_id, "step": client.step, "peer": client.target}


def _format(logs: dict[str, Any] | None) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in (logs or {}).items())
