"""The client's leakage meters (splitlearning/leakage.py; docs/security.md, "Measured leakage"): the distance
correlation between sampled batches' inputs and the IVs sent for them, and, in the U-shape, where this client
holds the labels, the label attacks on the gradients it sends the server. Their values join each epoch's logs
(so the per-epoch line, the history, `--history-json` and TensorBoard carry them)."""

from __future__ import annotations

from typing import Any

import numpy as np

from client_part.link import Link
from splitlearning.leakage import InputLeakMeter, LabelLeakMeter


class ClientLeakage:
    """`batch` before each step with its inputs, `sent` with the IV that leaves; `epoch_logs` at its end."""

    def __init__(self, input_samples: int, label: LabelLeakMeter | None) -> None:
        self.input = InputLeakMeter(input_samples) if input_samples else None
        self.label = label
        self._inputs: np.ndarray | None = None

    def start_epoch(self) -> None:
        for meter in (self.input, self.label):
            if meter is not None:
                meter.reset()

    def batch(self, inputs: Any) -> None:
        """The next step's inputs: kept if the batch is sampled."""
        self._inputs = None
        if self.input is None:
            return
        if self.input.due():
            self._inputs = np.asarray(inputs)
        else:
            self.input.skip()

    def sent(self, iv: np.ndarray) -> None:
        """The IV as it leaves (after clipping and noise): measured against the kept inputs, once per step."""
        if self._inputs is not None and self.input is not None:
            self.input.add(self._inputs, iv)
            self._inputs = None

    def epoch_logs(self) -> dict[str, float]:
        logs: dict[str, float] = {}
        for meter in (self.label, self.input):
            if meter is not None:
                logs.update(meter.result())
        return logs


class MeteredLink:
    """A `Link` that shows every IV it sends to `leakage` (inside the noise, so the meter judges what leaves)."""

    def __init__(self, link: Link, leakage: ClientLeakage) -> None:
        self._link = link
        self._leakage = leakage

    def train(self, step: int, iv: np.ndarray, labels: np.ndarray, reset: bool) -> tuple[np.ndarray, list[float]]:
        self._leakage.sent(iv)
        return self._link.train(step, iv, labels, reset)

    def evaluate(self, iv: np.ndarray, labels: np.ndarray, reset: bool, step: int | None = None) -> list[float]:
        return self._link.evaluate(iv, labels, reset, step)

    def predict(self, iv: np.ndarray, step: int | None = None) -> np.ndarray:
        return self._link.predict(iv, step)
