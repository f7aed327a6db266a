"""Top-k sparsification with error feedback: pure numpy, for the IV (client) and its gradient (server).

Each sender keeps, per stream of tensors, what it left out of the last one (the residual). The next tensor of the
same shape gets it added back before its k = ceil(fraction x size) entries of largest magnitude are chosen; the
rest become the new residual. So nothing is dropped for good, only sent late (Stich et al., "Sparsified SGD with
memory", 2018). A tensor of another shape than the residual's (an epoch's shorter last batch) gets none added,
and what it leaves out is dropped; the residual waits for the next tensor of its shape.
"""

from __future__ import annotations

import math

import numpy as np


def keep_count(fraction: float, size: int) -> int:
    """k: the entries of a tensor of `size` entries that top-k with `fraction` sends (at least one)."""
    return min(size, max(1, math.ceil(fraction * size))) if size else 0


class ErrorFeedback:
    """One sender's stream of tensors, sparsified to `fraction` of their entries with error feedback."""

    def __init__(self, fraction: float) -> None:
        if not 0 < fraction < 1:
            raise ValueError(f"top-k keeps a fraction in (0, 1) of each tensor's entries, got {fraction}")
        self.fraction = fraction
        self._residual: np.ndarray | None = None

    def __call__(self, tensor: np.ndarray) -> np.ndarray:
        """The tensor to send: `tensor` plus the residual, all but its k largest magnitudes set to zero."""
        values = np.array(tensor, dtype=np.result_type(tensor, np.float32), copy=True)
        residual = self._residual
        if residual is not None and residual.shape == values.shape:
            values += residual
        flat = values.reshape(-1)
        k = keep_count(self.fraction, flat.size)
        sent = np.zeros_like(values)
        if k:
            kept = np.argpartition(np.abs(flat), flat.size - k)[flat.size - k :]
            sent.reshape(-1)[kept] = flat[kept]
            flat[kept] = 0  # what is left out: the next tensor's residual
        if residual is None or residual.shape == values.shape:
            self._residual = values
        return sent

    def reset(self) -> None:
        self._residual = None
