"""What this host's TCP does to a split step on a long link, said once in the log where it costs time.

A split step sends one message each way and waits for the answer, so between messages the connection is idle
and every message is a short burst. Linux's BBR (`net.ipv4.tcp_congestion_control = bbr`) never leaves its
start-up phase on such a connection: its bandwidth estimate is a message's bytes per round trip, and it paces
each message at 2.89 times that, so a message smaller than the link's bandwidth-delay product takes about a
third of the round-trip time to send, whatever its size. Measured (benchmarks/wan.py, docs/performance.md,
"Wide-area links"): 80 ms at 1 Gbit/s, 205 KB each way, 27 ms more per message than cubic, which sends it in
one window at the link's rate (E 0.63 against 0.84). gRPC does not let a program choose its sockets'
congestion control, so the fix is the operator's: cubic for the host, or for the route to the peer only.
"""

from __future__ import annotations

import logging
from pathlib import Path

from splitlearning.security import is_loopback

log = logging.getLogger(__name__)

CONGESTION_CONTROL = Path("/proc/sys/net/ipv4/tcp_congestion_control")

_hinted: set[str] = set()  # the hints given in this process


def congestion_control(path: Path | None = None) -> str | None:
    """This host's (network namespace's) default TCP congestion control (read from `path`, by default
    `CONGESTION_CONTROL`), or None where it cannot be read."""
    try:
        return (path or CONGESTION_CONTROL).read_text().strip() or None
    except OSError:
        return None


def pacing_hint(address: str, congestion: str | None) -> str | None:
    """What to do about `congestion` for a peer at (or a server bound to) `address`, or None if nothing."""
    if congestion != "bbr" or is_loopback(address):
        return None
    return (
        "this host's TCP congestion control is bbr: on a link of tens of ms it paces each message of a split step "
        "over about a third of the round trip, whatever its size (docs/performance.md, 'Wide-area links'); cubic "
        "sends it at the link's rate: sysctl -w net.ipv4.tcp_congestion_control=cubic, or for the route to the "
        "peer only, ip route change <the route> congctl cubic (on both hosts; ignore this on a LAN)"
    )


def hint_once(address: str, path: Path | None = None) -> str | None:
    """Log `pacing_hint` for `address` at INFO, the first time this process meets it; return it (None: no hint,
    or given already)."""
    hint = pacing_hint(address, congestion_control(path))
    if hint is None or hint in _hinted:
        return None
    _hinted.add(hint)
    log.info(hint)
    return hint
