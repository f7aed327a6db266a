"""A slow link on one machine: two network namespaces joined by a veth pair, each end shaped with `tc tbf`.

Needs root, `ip` and `tc` (iproute2). netem is not available on every kernel, so the link is shaped in rate
only; latency comes from the queue and the rate itself.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

CLIENT_IP, SERVER_IP = "10.231.0.1", "10.231.0.2"


@dataclass(frozen=True)
class Link:
    client_ns: str
    server_ns: str
    server_ip: str
    rate: str


def unavailable() -> str | None:
    """Why the slow link cannot be built here, or None when it can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces and tc)"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return f"needs {' and '.join(missing)} (apt-get install -y iproute2)"
    return None


def _sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, text=True)


@contextmanager
def slow_link(rate: str = "100mbit", prefix: str = "splitbench") -> Iterator[Link]:
    """Build the two namespaces and the shaped veth pair; tear them down on exit."""
    client_ns, server_ns = f"{prefix}-client", f"{prefix}-server"
    ends = {client_ns: ("sbc0", CLIENT_IP), server_ns: ("sbs0", SERVER_IP)}
    for ns in (client_ns, server_ns):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)  # left over from a killed run
    try:
        for ns in ends:
            _sh("ip", "netns", "add", ns)
        _sh("ip", "link", "add", "sbc0", "type", "veth", "peer", "name", "sbs0")
        for ns, (dev, ip) in ends.items():
            _sh("ip", "link", "set", dev, "netns", ns)
            _sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
            _sh("ip", "-n", ns, "link", "set", dev, "up")
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
            # Egress of each end: together, both directions are shaped.
            tbf = ["tbf", "rate", rate, "burst", "32kbit", "latency", "400ms"]
            _sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", *tbf)
        yield Link(client_ns, server_ns, SERVER_IP, rate)
    finally:
        for ns in ends:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
