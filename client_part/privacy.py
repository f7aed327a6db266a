"""Privacy of the cut (opt-in): clip each sample's IV to an L2 norm and add Gaussian noise before it leaves.

Each sample's IV `v` (all its non-batch dimensions together) becomes `v * min(1, C / ||v||_2) + N(0, (s*C)^2)`,
with C the clipping norm and s the noise multiplier: the Gaussian mechanism on a per-sample sensitivity of C.
It runs on the client on every IV it sends (training, evaluation, prediction). The server's dLoss/dIV is then
taken at the noisy IV, and the client back-propagates it through its own, un-noised forward pass: the standard
approach (the noise is treated as a constant and the clipping as the identity), so training with noise is by
design not equal to the uncut model. See docs/security.md for what it protects and what it costs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from client_part.link import Link


@dataclass(frozen=True)
class GaussianNoise:
    """Clip each sample's IV to L2 norm `clip_norm`, then add N(0, (noise_multiplier * clip_norm)^2) per value."""

    clip_norm: float
    noise_multiplier: float = 0.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip_norm) and self.clip_norm > 0):
            raise ValueError(f"clip norm must be a positive number, got {self.clip_norm}")
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise ValueError(f"noise multiplier must be zero or positive, got {self.noise_multiplier}")

    @property
    def stddev(self) -> float:
        return self.noise_multiplier * self.clip_norm


def member_seed(seed: int, member: int | None) -> int:
    """The noise seed of a group's member: members started with the same --seed must not add the same noise
    (one member's noise would then tell another's); one client alone keeps --seed itself."""
    if member is None:
        return seed
    return int(np.random.SeedSequence([seed, member]).generate_state(1)[0])


def clip(iv: np.ndarray, clip_norm: float) -> np.ndarray:
    """Each sample (row of the batch) scaled down to L2 norm at most `clip_norm`; shorter ones unchanged."""
    flat = iv.reshape(len(iv), -1)
    norms = np.linalg.norm(flat.astype(np.float64), axis=1)
    scale = np.minimum(1.0, clip_norm / np.maximum(norms, np.finfo(np.float64).tiny))
    return (flat * scale[:, None].astype(iv.dtype)).reshape(iv.shape).astype(iv.dtype, copy=False)


class NoisyLink:
    """A `Link` that privatises every IV (clip + noise) before handing it to `link`."""

    def __init__(self, link: Link, noise: GaussianNoise) -> None:
        self._link = link
        self.noise = noise
        self._rng = np.random.default_rng(noise.seed)

    def privatize(self, iv: np.ndarray) -> np.ndarray:
        if iv.dtype.kind != "f":
            raise TypeError(f"IV noise needs a floating IV, got {iv.dtype.name}")
        clipped = clip(iv, self.noise.clip_norm)
        if self.noise.noise_multiplier == 0:
            return clipped
        noise = self._rng.normal(0.0, self.noise.stddev, size=iv.shape)
        return (clipped + noise).astype(iv.dtype, copy=False)

    def train(self, step: int, iv: np.ndarray, labels: np.ndarray, reset: bool) -> tuple[np.ndarray, list[float]]:
        return self._link.train(step, self.privatize(iv), labels, reset)

    def evaluate(self, iv: np.ndarray, labels: np.ndarray, reset: bool, step: int | None = None) -> list[float]:
        return self._link.evaluate(self.privatize(iv), labels, reset, step)

    def predict(self, iv: np.ndarray, step: int | None = None) -> np.ndarray:
        return self._link.predict(self.privatize(iv), step)
