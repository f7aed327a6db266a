"""Defences against label leakage, applied by the party that holds the labels to the gradients it sends
(docs/security.md, "Defences"). numpy only; each changes training (the receiver back-propagates noisy
gradients), so a run with one is no longer the uncut model's (off, nothing changes: bit for bit).

- `gaussian`: adds N(0, sigma²) to every element, sigma = strength · (the batch's mean per-example gradient norm) / √d,
  so the noise's norm is about `strength` times a typical gradient's.
- `max-norm` (Li et al. 2022, the heuristic): each example j gets N(0, sigma_j² I) with
  sigma_j² = (max_i ‖g_i‖² - ‖g_j‖²) / d, so every example's expected squared norm is the batch's largest: the
  norm attack loses its signal. `strength` is not used.
- `marvell` (Li et al. 2022, optimised noise): per batch, with Δ the difference of the two classes' mean
  gradients, a power budget P = strength · ‖Δ‖² is split between the classes to minimise the symmetrised KL
  divergence between their noisy gradient distributions (modelled as Gaussians around their class means, as in
  the paper's objective): KL_sym = ½(b₁/b₀ + b₀/b₁) - 1 + ½‖Δ‖²(1/b₀ + 1/b₁) subject to p·b₁ + (1 - p)·b₀ = P, b
  the noise variance along Δ of each class, p the positives' share. Noise off Δ's direction only adds to both
  distributions alike and does not lower this objective, so all of the budget goes along Δ; the split (b₀, b₁) is
  found by a search over a fine grid. A batch without both classes is sent as it is. This is the paper's
  optimisation in its simplest form (class means, no within-class spread), derived here; not the authors' code.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from splitlearning.leakage import per_example, positives_of


class Kind(enum.Enum):
    NONE = "none"
    GAUSSIAN = "gaussian"
    MAX_NORM = "max-norm"
    MARVELL = "marvell"


KINDS = tuple(kind.value for kind in Kind)


@dataclass(frozen=True)
class LabelDefence:
    """Which defence, how strong, against which class (see the module), and the seed of its noise."""

    kind: Kind = Kind.NONE
    strength: float = 0.0
    positive: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", Kind(self.kind))
        if not np.isfinite(self.strength) or self.strength < 0:
            raise ValueError(f"the label defence's strength must be >= 0, got {self.strength}")
        if self.kind in (Kind.GAUSSIAN, Kind.MARVELL) and self.strength == 0:
            raise ValueError(f"--label-defence {self.kind.value} needs a strength > 0 (--label-defence-strength)")

    @property
    def active(self) -> bool:
        return self.kind is not Kind.NONE

    def apply(self, gradients: np.ndarray, labels: np.ndarray, key: Sequence[int] = ()) -> np.ndarray:
        """The gradients to send for one batch (a new array; the input is unchanged); `labels` the batch's. The
        noise is drawn from a generator seeded by (seed, *key): with the step in `key`, a step done again (a
        resend, a restart from a checkpoint) sends the same gradients."""
        if self.kind is Kind.NONE:
            return gradients
        return _Draw(self, np.random.default_rng([self.seed, *key]))(gradients, labels)


class _Draw:
    """One batch's noise, from `rng`."""

    def __init__(self, defence: LabelDefence, rng: np.random.Generator) -> None:
        self.defence = defence
        self._rng = rng

    def __call__(self, gradients: np.ndarray, labels: np.ndarray) -> np.ndarray:
        kind = self.defence.kind
        rows = per_example(gradients)
        if kind is Kind.GAUSSIAN:
            noisy = rows + self._gaussian(rows)
        elif kind is Kind.MAX_NORM:
            noisy = rows + self._max_norm(rows)
        else:
            noisy = rows + self._marvell(rows, positives_of(labels, self.defence.positive))
        return noisy.reshape(gradients.shape).astype(gradients.dtype)

    def _gaussian(self, rows: np.ndarray) -> np.ndarray:
        d = rows.shape[1]
        sigma = self.defence.strength * float(np.linalg.norm(rows, axis=1).mean()) / np.sqrt(d)
        return self._rng.normal(0.0, sigma, size=rows.shape)

    def _max_norm(self, rows: np.ndarray) -> np.ndarray:
        d = rows.shape[1]
        squares = (rows * rows).sum(axis=1)
        sigmas = np.sqrt(np.maximum(squares.max() - squares, 0.0) / d)
        return self._rng.normal(0.0, 1.0, size=rows.shape) * sigmas[:, None]

    def _marvell(self, rows: np.ndarray, positives: np.ndarray) -> np.ndarray:
        if positives.all() or not positives.any():
            return np.zeros_like(rows)
        delta = rows[positives].mean(axis=0) - rows[~positives].mean(axis=0)
        gap = float(delta @ delta)
        if gap == 0.0:
            return np.zeros_like(rows)
        b0, b1 = marvell_variances(gap, float(positives.mean()), self.defence.strength * gap)
        scale = np.where(positives, np.sqrt(b1), np.sqrt(b0))
        return (self._rng.normal(0.0, 1.0, size=len(rows)) * scale)[:, None] * (delta / np.sqrt(gap))[None, :]


def marvell_variances(gap: float, share: float, power: float, points: int = 2000) -> tuple[float, float]:
    """(b₀, b₁): the noise variances along Δ for the negatives and the positives that minimise the symmetrised
    KL of the module's docstring, for ‖Δ‖² = `gap`, positives' share `share` and budget `power`."""
    t = np.linspace(0.0, power / share, points + 2)[1:-1]  # b₁, open interval
    b1 = t
    b0 = (power - share * t) / (1.0 - share)
    objective = 0.5 * (b1 / b0 + b0 / b1) - 1.0 + 0.5 * gap * (1.0 / b0 + 1.0 / b1)
    best = int(np.argmin(objective))
    return float(b0[best]), float(b1[best])


def symmetric_kl(gap: float, b0: float, b1: float) -> float:
    """The objective Marvell minimises (the module's docstring), for tests and benchmarks."""
    return 0.5 * (b1 / b0 + b0 / b1) - 1.0 + 0.5 * gap * (1.0 / b0 + 1.0 / b1)
