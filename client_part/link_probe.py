"""The link a client trains over, measured (docs/performance.md, "Wide-area links"): the round-trip time and
the throughput each way, from a few `Probe` calls on the training channel (its connection, its TLS).

Round trip: the median of `rounds` empty probes. Throughput up (down): `size` bytes carried up (back) by
`rounds` probes; their median time less the round trip is the transfer time. On loopback the transfer of a
small probe is within the timer's noise: a throughput is reported only where the transfer took at least a
tenth of the round trip (else None: "faster than this probe can tell").
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class LinkEstimate:
    rtt_ms: float
    up_mbit_s: float | None
    down_mbit_s: float | None
    probe_bytes: int

    def describe(self) -> str:
        def rate(value: float | None) -> str:
            return f"{value:,.0f} Mbit/s" if value is not None else "faster than the probe tells"

        return f"round trip {self.rtt_ms:.2f} ms, up {rate(self.up_mbit_s)}, down {rate(self.down_mbit_s)}"

    def as_dict(self) -> dict[str, float | int | None]:
        return {
            "rtt_ms": self.rtt_ms,
            "up_mbit_s": self.up_mbit_s,
            "down_mbit_s": self.down_mbit_s,
            "probe_bytes": self.probe_bytes,
        }


def measure(probe: Callable[[int, int], float], size: int, rounds: int = 5) -> LinkEstimate:
    """`probe(up_bytes, down_bytes) -> seconds` called 3 x `rounds` times (plus one to warm the connection)."""
    probe(0, 0)
    rtt = statistics.median(probe(0, 0) for _ in range(rounds))
    up = statistics.median(probe(size, 0) for _ in range(rounds)) - rtt
    down = statistics.median(probe(0, size) for _ in range(rounds)) - rtt
    return LinkEstimate(rtt * 1e3, _rate(size, up, rtt), _rate(size, down, rtt), size)


def _rate(size: int, seconds: float, rtt: float) -> float | None:
    if seconds < max(rtt / 10, 1e-4):
        return None
    return size * 8 / seconds / 1e6
