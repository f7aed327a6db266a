"""What `SplitClient` calls per batch, whatever stands between it and the server (a protocol, no code).

`Transport` is the plain link (standard cut); `ushape.UShapeLink` finishes the model locally around the
server's middle; `privacy.NoisyLink` clips and noises every IV before it leaves. They stack.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Link(Protocol):
    def train(self, step: int, iv: np.ndarray, labels: np.ndarray, reset: bool) -> tuple[np.ndarray, list[float]]:
        """One training step for `iv`: dLoss/dIV and the running metrics (loss first)."""
        ...

    def evaluate(self, iv: np.ndarray, labels: np.ndarray, reset: bool, step: int | None = None) -> list[float]:
        """Accumulate loss and metrics for one batch, no update; the running values. `step` is the client's,
        which the server checks against its own (None: not checked)."""
        ...

    def predict(self, iv: np.ndarray, step: int | None = None) -> np.ndarray:
        """The whole model's outputs for one batch of IVs (`step` as for `evaluate`)."""
        ...
