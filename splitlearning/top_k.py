"""Top-k sparsification with error feedback: pure numpy, for the IV (client) and its gradient (server).

Each sender keeps, per stream of tensors, what it left out of the last one (the residual). The next tensor of the
same shape gets it added back before, in each row (a sample's entries), its k = ceil(fraction x entries per row)
of largest magnitude are chosen; the rest become the new residual. Per row, so that every sample keeps its
strongest entries (per tensor, some samples would send none). The residual measured better than none: on the
digits benchmark (docs/performance.md, "Beyond exact") top-k 0.1 without it reached 0.19 test accuracy after 3
epochs, with it 0.58. So nothing is dropped for good, only sent late (Stich et al., "Sparsified SGD with
memory", 2018). A tensor of another shape than the residual's (an epoch's shorter last batch) gets none added,
and what it leaves out is dropped; the residual waits for the next tensor of its shape.
"""

from __future__ import annotations

import math

import numpy as np


def keep_count(fraction: float, size: int) -> int:
    """k: the entries of a row of `size` entries that top-k with `fraction` sends (at least one)."""
    return min(size, max(1, math.ceil(fraction * size))) if size else 0


class ErrorFeedback:
    """One sender's stream of tensors, sparsified to `fraction` of their entries with error feedback."""

    def __init__(self, fraction: float) -> None:
        if not 0 < fraction < 1:
            raise ValueError(f"top-k keeps a fraction in (0, 1) of each tensor's entries, got {fraction}")
        self.fraction = fraction
        self._residual: np.ndarray | None = None

    def __call__(self, tensor: np.ndarray) -> np.ndarray:
        """The tensor to send: `tensor` plus the residual, all but each row's k largest magnitudes set to zero."""
        values = np.array(tensor, dtype=np.result_type(tensor, np.float32), copy=True)
        residual = self._residual
        if residual is not None and residual.shape == values.shape:
            values += residual
        if not values.size:
            return values
        rows = values.reshape(len(values), -1) if values.ndim else values.reshape(1, 1)
        width = rows.shape[1]
        k = keep_count(self.fraction, width)
        sent = np.zeros_like(rows)
        if k and rows.size:
            kept = np.argpartition(np.abs(rows), width - k, axis=1)[:, width - k :]
            np.put_along_axis(sent, kept, np.take_along_axis(rows, kept, axis=1), axis=1)
            rows -= sent  # what is left out: the next tensor's residual
        if residual is None or residual.shape == values.shape:
            self._residual = values
        return sent.reshape(values.shape)

    def reset(self) -> None:
        self._residual = None
