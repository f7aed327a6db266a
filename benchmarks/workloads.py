"""The benchmark's workloads and their seeded synthetic 28x28 data (no download)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Workload:
    """One benchmark case: a built-in model pair, a batch size, a default number of timed steps."""

    name: str
    model: str
    batch_size: int
    steps: int
    iv_floats: int
    what: str
    slow_link: bool = False
    # Split runs: (wire encoding, micro-batches per step).
    cases: tuple[tuple[str, int], ...] = (("raw", 1), ("raw", 4))


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload("cnn", "mnist-cnn", 128, 60, 1600, "two conv+pool layers | two dense layers, batch 128"),
        Workload(
            "small-batch", "mnist-cnn", 16, 300, 1600, "the same at batch 16 (latency-bound)", cases=(("raw", 1),)
        ),
        Workload(
            "wide-iv", "mnist-wide", 128, 30, 12544, "one conv, no pooling: 49 KB IV per sample (bandwidth-bound)"
        ),
        Workload(
            "slow-link",
            "mnist-cnn",
            128,
            20,
            1600,
            "cnn across two network namespaces, 100 Mbit/s",
            slow_link=True,
            cases=(
                ("raw", 1),
                ("float16", 1),
                ("bfloat16", 1),
                ("int8", 1),
                ("raw", 4),
                ("bfloat16", 4),
                ("int8", 4),
            ),
        ),
    )
}


def synthetic_mnist(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`n` 28x28x1 images in [0, 1] and their int64 labels: ten seeded smooth prototypes plus noise.

    Learnable (each class is its own pattern), so a training run means something, and the same for the
    same `(n, seed)` in every process.
    """
    rng = np.random.default_rng(seed)
    grid = np.linspace(-1.0, 1.0, 28, dtype="float32")
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    prototypes = np.stack(
        [
            np.exp(-(((xx - cx) ** 2) + (yy - cy) ** 2) / (2 * s**2)) + 0.5 * np.sin(f * (xx + yy))
            for cx, cy, s, f in rng.uniform([-0.6, -0.6, 0.2, 1.0], [0.6, 0.6, 0.5, 6.0], size=(10, 4))
        ]
    )
    labels = rng.integers(0, 10, size=n).astype("int64")
    images = prototypes[labels] + 0.4 * rng.standard_normal((n, 28, 28)).astype("float32")
    images = np.clip((images - images.min()) / (images.max() - images.min()), 0.0, 1.0).astype("float32")
    return images[..., None], labels
