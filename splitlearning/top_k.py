"""Top-k sparsification, pure numpy: plain for the IV (client), with error feedback for its gradient (server).

In each row (a sample's entries) the k = ceil(fraction x entries per row) of largest magnitude are kept and the
rest set to zero (an entry whose magnitude ties with the k-th largest is kept too, so the choice depends on the
values alone). Per row, so that every sample keeps its strongest entries (per tensor, some samples would send
none).

Error feedback (Stich et al., "Sparsified SGD with memory", 2018): the sender keeps what it left out of its last
tensor (the residual) and adds it to the next one of the same shape before choosing, so nothing is dropped for
good, only sent late. That is what a gradient wants, and only a gradient: the client's update sums them. An IV is
used once, by the step it belongs to; a residual of other samples' activations added to it is noise, and with
ReLU activations (never negative) it grows without bound. So the IV is sparsified plainly, at training and
inference alike (the server's part learns from sparse IVs and is scored on them), and the gradient with feedback.
Measured on the digits benchmark (top-k 0.1, 8 epochs, seed 0; docs/performance.md, "Beyond exact"): both with
feedback, scored on dense IVs, 0.56 test accuracy and falling; neither with feedback, scored on sparse IVs, 0.66;
the gradient with feedback and the IV without, scored on sparse IVs (this module's rule), 0.79.

A tensor of another shape than the residual's (an epoch's shorter last batch) gets none added, and what it leaves
out is dropped; the residual waits for the next tensor of its shape.
"""

from __future__ import annotations

import math

import numpy as np


def keep_count(fraction: float, size: int) -> int:
    """k: the entries of a row of `size` entries that top-k with `fraction` sends (at least one)."""
    return min(size, max(1, math.ceil(fraction * size))) if size else 0


def sparsify(tensor: np.ndarray, fraction: float) -> np.ndarray:
    """`tensor` with each row's entries below its k-th largest magnitude set to zero (no feedback): a new array."""
    values = np.array(tensor, dtype=np.result_type(tensor, np.float32), copy=True)
    rows = _rows(values)
    if rows.size:
        rows[_dropped(rows, fraction)] = 0
    return values


def _keep_largest(values: np.ndarray, fraction: float) -> np.ndarray:
    """Keep each row's largest magnitudes of `values` in place and return what was left out (a new array)."""
    rows = _rows(values)
    if not rows.size:
        return np.zeros_like(values)
    dropped = _dropped(rows, fraction)
    left = np.where(dropped, rows, 0).astype(rows.dtype, copy=False)
    rows[dropped] = 0
    return left.reshape(values.shape)


def _rows(values: np.ndarray) -> np.ndarray:
    """`values` as one row per sample (a view)."""
    return values.reshape(len(values), math.prod(values.shape[1:])) if values.ndim else values.reshape(1, 1)


def _dropped(rows: np.ndarray, fraction: float) -> np.ndarray:
    """Where each row's magnitude is below the row's k-th largest: what top-k does not send. A magnitude tied
    with the k-th is kept (so a row may keep more than k where magnitudes tie), which makes the choice a function
    of the values alone, the same here as in `TopK` (splitlearning/top_k_layer.py) and on any CPU."""
    width = rows.shape[1]
    magnitudes = np.abs(rows)
    at = width - keep_count(fraction, width)
    kth = np.partition(magnitudes, at, axis=1)[:, at : at + 1]
    return magnitudes < kth


class ErrorFeedback:
    """One sender's stream of tensors, sparsified to `fraction` of their entries with error feedback."""

    def __init__(self, fraction: float, residual: np.ndarray | None = None) -> None:
        """`residual`: what an earlier sender left out (restored from a checkpoint), else None."""
        if not 0 < fraction < 1:
            raise ValueError(f"top-k keeps a fraction in (0, 1) of each tensor's entries, got {fraction}")
        self.fraction = fraction
        self._residual = residual

    @property
    def residual(self) -> np.ndarray | None:
        """What the tensors sent so far left out, to be added to the next of its shape (None: nothing yet)."""
        return self._residual

    def __call__(self, tensor: np.ndarray) -> np.ndarray:
        """The tensor to send: `tensor` plus the residual, all but each row's k largest magnitudes set to zero."""
        values = np.array(tensor, dtype=np.result_type(tensor, np.float32), copy=True)
        residual = self._residual
        if residual is not None and residual.shape == values.shape:
            values += residual
        left = _keep_largest(values, self.fraction)
        if residual is None or residual.shape == values.shape:
            self._residual = left
        return values
