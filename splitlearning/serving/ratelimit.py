"""Refusals logged at most once per peer per interval: a flood of bad calls from one host is one log line a minute
(counted in full by the Prometheus series of whoever refuses them). Used by the health service's refusals of
undecodable requests (health.py) and by the token check's (auth.py)."""

from __future__ import annotations

import threading
import time

LOG_INTERVAL_S = 60.0
# Peers whose last logged refusal is remembered; past it, those logged over a minute ago are forgotten.
_PEERS_REMEMBERED = 1024


class OncePerPeer:
    """True for a peer's first event, then False until `interval` seconds have passed (per host, any port)."""

    def __init__(self, interval: float = LOG_INTERVAL_S) -> None:
        self._interval = interval
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()

    def __call__(self, peer: str) -> bool:
        host = peer.rsplit(":", 1)[0] if peer.startswith(("ipv4:", "ipv6:")) else peer
        now = time.monotonic()
        with self._lock:
            last = self._last.get(host)
            if last is not None and now - last < self._interval:
                return False
            if len(self._last) >= _PEERS_REMEMBERED:
                self._last = {h: t for h, t in self._last.items() if now - t < self._interval}
                if len(self._last) >= _PEERS_REMEMBERED:  # that many peers within a minute: log none of the new
                    return False
            self._last[host] = now
            return True
