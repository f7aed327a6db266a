"""Timing helpers shared by the micro-benchmarks."""

from __future__ import annotations

import time
from collections.abc import Callable


def median_seconds(function: Callable[[], object], rounds: int, warmup: int = 0) -> float:
    """The median wall time of `rounds` calls of `function`, after `warmup` untimed ones."""
    for _ in range(warmup):
        function()
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    times.sort()
    return times[len(times) // 2]
