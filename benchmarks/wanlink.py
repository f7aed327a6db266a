"""A wide-area link on one machine: round-trip time and rate, both measured.

Three network namespaces, client -- router -- server, joined by two veth pairs. The router shapes the rate
of each direction on its egress (`tc tbf`, one qdisc per direction) and adds the delay in one of two ways
(netem, the kernel's own delay, is not built into every kernel, and fq, which could honour a delivery time
set by BPF, neither):

- `packet` (the default): the router routes every forwarded packet through a TUN device, where a small
  process of its own (`delay`, below) holds each packet for the one-way delay and writes it back, in order.
  The endpoints' TCP sees the whole round-trip time (its windows, slow start and buffers act as on a real
  path); the TUN device takes segmentation offloads, so at 1 Gbit/s it reads about 4,000 packets a second
  (29 KB each on average), not 80,000.
- `proxy`: a delaying TCP proxy (`proxy`, below) in the router, in a process of its own: each chunk it reads
  is written on at arrival + the delay, in order, so the delay does not cap the throughput. The two TCP
  legs see no delay (only HTTP/2's own flow control spans it), as through any terminating proxy.

`measure` then times what the link really adds, from the client's namespace to the server's: small-message
ping-pongs on one TCP connection (the RTT) and a bulk transfer each way (the rate; socket buffers forced
large so that TCP's own windows do not cap it).

    python -m benchmarks.wanlink delay TUN UP_MS DOWN_MS CLIENT_SUBNET   # run by `wan_link`, in the router
    python -m benchmarks.wanlink proxy LISTEN_HOST PORT TARGET_HOST DELAY_MS  # the same, as a TCP proxy
    python -m benchmarks.wanlink probe-server HOST PORT_FILE             # run by `measure`, in the server
    python -m benchmarks.wanlink probe-client HOST PORT UP_BYTES DOWN_BYTES  # ... and in the client
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import ipaddress
import json
import os
import select
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLIENT_IP, ROUTER_CLIENT_IP = "10.232.1.1", "10.232.1.2"
SERVER_IP, ROUTER_SERVER_IP = "10.232.2.1", "10.232.2.2"
TUN = "wantun0"
MODES = ("packet", "proxy")
_FORCED_BUFFER = 64 << 20  # the probe's socket buffers: far above any bandwidth-delay product measured here


@dataclass(frozen=True)
class Link:
    """A built link. `expose(port)` gives the address a client in `client_ns` dials to reach `server_ns`'s
    `port` through it."""

    client_ns: str
    server_ns: str
    router_ns: str
    server_ip: str
    rate_bit: int
    rtt_ms: float
    mode: str
    proxies: list[subprocess.Popen[bytes]]

    def expose(self, port: int) -> str:
        if self.mode == "packet":
            return f"{self.server_ip}:{port}"
        command = [
            *_in(self.router_ns),
            sys.executable,
            "-m",
            "benchmarks.wanlink",
            "proxy",
            ROUTER_CLIENT_IP,
            str(port),
            self.server_ip,
            f"{self.rtt_ms / 2}",
        ]
        self.proxies.append(subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE))
        ready = self.proxies[-1].stdout
        assert ready is not None
        if not ready.readline():
            raise RuntimeError("the delaying proxy did not start")
        return f"{ROUTER_CLIENT_IP}:{port}"

    def release(self) -> None:
        """Stop the proxies `expose` started (the link stays)."""
        while self.proxies:
            _stop(self.proxies.pop())


def parse_rate(text: str) -> int:
    """'100mbit' / '1gbit' / '500kbit' -> bits per second."""
    units = {"kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "bit": 1}
    for unit, factor in units.items():
        if text.lower().endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def unavailable() -> str | None:
    """Why the link cannot be built here, or None when it can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, tc, a TUN device)"
    if not os.path.exists("/dev/net/tun"):
        return "needs /dev/net/tun"
    return None


def _in(ns: str) -> list[str]:
    return ["ip", "netns", "exec", ns]


def _sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, text=True)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _tbf(rate_bit: int) -> list[str]:
    """A token bucket at `rate_bit`: a burst of 1 ms at the rate (16 KB at least; offloaded segments larger
    than that are cut by tbf), a queue of up to 200 ms at the rate (no drops at these windows)."""
    burst = max(16 * 1024, rate_bit // 8 // 1000)
    return ["tbf", "rate", f"{rate_bit}bit", "burst", str(burst), "latency", "200ms"]


@contextlib.contextmanager
def wan_link(
    rate: str, rtt_ms: float, mode: str = "packet", prefix: str | None = None, congestion: str | None = None
) -> Iterator[Link]:
    """Build the three namespaces, the shaped veth pairs and the delay; tear everything down on exit.
    `congestion`: the endpoints' TCP congestion control for the link's route (`ip route ... congctl`; by default
    the namespace's, which new namespaces take from the host: see `tcp_settings`)."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: expected one of {MODES}")
    tag = prefix or f"w{os.getpid() % 100000}"
    client_ns, router_ns, server_ns = f"{tag}-client", f"{tag}-router", f"{tag}-server"
    rate_bit = parse_rate(rate)
    veths = ((f"{tag}c", f"{tag}rc"), (f"{tag}s", f"{tag}rs"))  # (endpoint's end, router's end)
    for ns in (client_ns, router_ns, server_ns):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)  # left over from a killed run
    delayer: subprocess.Popen[bytes] | None = None
    link = Link(client_ns, server_ns, router_ns, SERVER_IP, rate_bit, rtt_ms, mode, [])
    try:
        for ns in (client_ns, router_ns, server_ns):
            _sh("ip", "netns", "add", ns)
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
        plan = (
            (client_ns, veths[0], CLIENT_IP, ROUTER_CLIENT_IP),
            (server_ns, veths[1], SERVER_IP, ROUTER_SERVER_IP),
        )
        for ns, (end, router_end), ip, router_ip in plan:
            _sh("ip", "link", "add", end, "type", "veth", "peer", "name", router_end)
            _sh("ip", "link", "set", end, "netns", ns)
            _sh("ip", "link", "set", router_end, "netns", router_ns)
            _sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", end)
            _sh("ip", "-n", router_ns, "addr", "add", f"{router_ip}/24", "dev", router_end)
            _sh("ip", "-n", ns, "link", "set", end, "up")
            _sh("ip", "-n", router_ns, "link", "set", router_end, "up")
            cc = ["congctl", congestion] if congestion else []
            _sh("ip", "-n", ns, "route", "add", "default", "via", router_ip, *cc)
            # The router's egress towards each endpoint carries one direction: shaped there, both are.
            _sh("ip", "netns", "exec", router_ns, "tc", "qdisc", "add", "dev", router_end, "root", *_tbf(rate_bit))
        for key in ("net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0"):
            _sh(*_in(router_ns), "sysctl", "-qw", key)
        if mode == "packet":
            half = f"{rtt_ms / 2}"
            command = [*_in(router_ns), sys.executable, "-m", "benchmarks.wanlink", "delay", TUN, half, half]
            delayer = subprocess.Popen([*command, f"{CLIENT_IP}/24"], cwd=ROOT, stdout=subprocess.PIPE)
            assert delayer.stdout is not None
            if not delayer.stdout.readline():
                raise RuntimeError("the delaying TUN process did not start")
            _sh("ip", "-n", router_ns, "link", "set", TUN, "up")
            _sh(*_in(router_ns), "sysctl", "-qw", f"net.ipv4.conf.{TUN}.rp_filter=0")
            # What arrives from either endpoint goes through the TUN device (table 100); what the delay
            # process writes back arrives on the TUN device and is routed on by the main table.
            _sh("ip", "-n", router_ns, "route", "add", "default", "dev", TUN, "table", "100")
            for _, (_, router_end) in zip((0, 1), veths, strict=True):
                _sh("ip", "-n", router_ns, "rule", "add", "iif", router_end, "lookup", "100", "priority", "100")
        yield link
    finally:
        link.release()
        if delayer is not None:
            _stop(delayer)
        for ns in (client_ns, router_ns, server_ns):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


# ---------------------------------------------------------------------------------------------------------
# The delay, per packet: a TUN device in the router.

_TUNSETIFF, _TUNSETOFFLOAD = 0x400454CA, 0x400454D0
_IFF_TUN, _IFF_NO_PI, _IFF_VNET_HDR = 0x0001, 0x1000, 0x4000
_TUN_F_CSUM, _TUN_F_TSO4, _TUN_F_TSO6 = 0x01, 0x02, 0x04
_VNET_HDR = 10  # struct virtio_net_hdr: the offload fields ahead of each packet


def delay(tun: str, up_ms: float, down_ms: float, client_subnet: str) -> None:
    """Hold each packet read from `tun` for its direction's delay (to the client's subnet: `down_ms`, else
    `up_ms`) and write it back, in order; until SIGTERM."""
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", tun.encode(), _IFF_TUN | _IFF_NO_PI | _IFF_VNET_HDR))
    fcntl.ioctl(fd, _TUNSETOFFLOAD, _TUN_F_CSUM | _TUN_F_TSO4 | _TUN_F_TSO6)
    os.set_blocking(fd, False)
    _realtime()
    subnet = ipaddress.ip_network(client_subnet, strict=False)
    net, mask = int(subnet.network_address), int(subnet.netmask)
    queues = {True: collections.deque[tuple[float, bytes]](), False: collections.deque[tuple[float, bytes]]()}
    delays = {True: down_ms / 1e3, False: up_ms / 1e3}
    stop = [False]
    signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__(0, True))
    print("ready", flush=True)
    while not stop[0]:
        heads = [q[0][0] for q in queues.values() if q]
        timeout = max(0.0, min(heads) - time.monotonic()) if heads else 0.5
        try:
            readable, _, _ = select.select([fd], [], [], timeout)
        except InterruptedError:
            continue
        now = time.monotonic()
        while readable:
            try:
                packet = os.read(fd, 70_000)
            except BlockingIOError:
                break
            if len(packet) < _VNET_HDR + 20 or packet[_VNET_HDR] >> 4 != 4:
                continue  # IPv4 only (the link has no other addresses)
            (destination,) = struct.unpack_from("!I", packet, _VNET_HDR + 16)
            down = destination & mask == net
            queues[down].append((now + delays[down], packet))
        now = time.monotonic()
        for queue in queues.values():
            while queue and queue[0][0] <= now:
                os.write(fd, queue.popleft()[1])


def _realtime() -> None:
    """Real-time priority where allowed: the link's delay should not grow with the CPU load of the processes
    measured through it (it takes little CPU: a few thousand reads and writes a second)."""
    with contextlib.suppress(OSError, AttributeError):
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))


# ---------------------------------------------------------------------------------------------------------
# The delay, per chunk of a TCP stream: a proxy.


def proxy(listen_host: str, port: int, target_host: str, delay_ms: float) -> None:
    """Accept on `listen_host:port`, connect each to `target_host:port`; each chunk read either way is written
    on at its arrival + `delay_ms`, in order; until SIGTERM."""
    _realtime()
    seconds = delay_ms / 1e3

    async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        chunks: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def read() -> None:
            while data := await reader.read(1 << 20):
                chunks.put_nowait((time.monotonic() + seconds, data))
            chunks.put_nowait((time.monotonic() + seconds, b""))

        reading = asyncio.ensure_future(read())
        try:
            while True:
                due, data = await chunks.get()
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                if not data:
                    writer.write_eof()
                    break
                writer.write(data)
                await writer.drain()
        finally:
            reading.cancel()

    async def handle(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        server_reader, server_writer = await asyncio.open_connection(target_host, port)
        for writer in (client_writer, server_writer):
            writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            await asyncio.gather(pump(client_reader, server_writer), pump(server_reader, client_writer))
        except (ConnectionError, OSError, asyncio.CancelledError):
            pass
        finally:
            client_writer.close()
            server_writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, listen_host, port)
        stopped = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopped.set)
        print("ready", flush=True)
        async with server:
            await stopped.wait()

    asyncio.run(main())


# ---------------------------------------------------------------------------------------------------------
# Measuring the link: small ping-pongs, then bulk each way, between the client's and the server's namespace.

_PINGS, _PING_WARMUP = 60, 5


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for option in (getattr(socket, "SO_SNDBUFFORCE", 32), getattr(socket, "SO_RCVBUFFORCE", 33)):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, option, _FORCED_BUFFER)


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("the probe's peer closed the connection")
        data += chunk
    return bytes(data)


def _receive_bulk(sock: socket.socket, size: int) -> list[tuple[float, int]]:
    """Read `size` bytes; (time, bytes so far) after each read."""
    marks, got, buffer = [], 0, bytearray(4 << 20)
    view = memoryview(buffer)
    while got < size:
        n = sock.recv_into(view[: min(len(buffer), size - got)])
        if not n:
            raise ConnectionError("the probe's peer closed the connection")
        got += n
        marks.append((time.monotonic(), got))
    return marks


def _rate(marks: list[tuple[float, int]]) -> float:
    """Bits/s: the least-squares slope of bytes read against time, from the read that crossed a quarter of the
    transfer (past TCP's ramp-up) to the last; a reader descheduled for a while moves it less than the two
    end points would."""
    total = marks[-1][1]
    tail = [m for m in marks if m[1] >= total // 4]
    if len(tail) < 3:
        return 8 * total / max(marks[-1][0] - marks[0][0], 1e-9)
    t_mean = statistics.fmean(t for t, _ in tail)
    b_mean = statistics.fmean(b for _, b in tail)
    covariance = sum((t - t_mean) * (b - b_mean) for t, b in tail)
    variance = sum((t - t_mean) ** 2 for t, _ in tail)
    return 8 * covariance / max(variance, 1e-18)


def probe_server(host: str, port_file: str) -> None:
    listener = socket.create_server((host, 0))
    Path(port_file).write_text(str(listener.getsockname()[1]))
    conn, _ = listener.accept()
    _tune(conn)
    while header := conn.recv(1):
        if header == b"p":
            conn.sendall(b"p")
        elif header in (b"u", b"d"):
            (size,) = struct.unpack("!Q", _read_exactly(conn, 8))
            if header == b"u":
                marks = _receive_bulk(conn, size)
                reply = json.dumps({"bit_s": _rate(marks)}).encode()
                conn.sendall(struct.pack("!I", len(reply)) + reply)
            else:
                conn.sendall(bytes(size))


def probe_client(host: str, port: int, up_bytes: int, down_bytes: int) -> dict[str, float]:
    sock = socket.create_connection((host, port))
    _tune(sock)
    rtts = []
    for index in range(_PINGS + _PING_WARMUP):
        started = time.perf_counter()
        sock.sendall(b"p")
        _read_exactly(sock, 1)
        if index >= _PING_WARMUP:
            rtts.append(time.perf_counter() - started)
        time.sleep(0.002)
    rtts.sort()
    sock.sendall(b"u" + struct.pack("!Q", up_bytes))
    sock.sendall(bytes(up_bytes))
    (length,) = struct.unpack("!I", _read_exactly(sock, 4))
    up = json.loads(_read_exactly(sock, length))["bit_s"]
    sock.sendall(b"d" + struct.pack("!Q", down_bytes))
    down = _rate(_receive_bulk(sock, down_bytes))
    sock.close()
    return {
        "rtt_ms": 1e3 * statistics.median(rtts),
        "rtt_min_ms": 1e3 * rtts[0],
        "rtt_p90_ms": 1e3 * rtts[int(0.9 * len(rtts))],
        "up_bit_s": up,
        "down_bit_s": down,
    }


def measure(link: Link, seconds: float = 0.6) -> dict[str, float]:
    """RTT (small ping-pongs) and rate each way (bulk of about `seconds` at the shaped rate), through `link`."""
    size = int(link.rate_bit / 8 * seconds)
    with tempfile.TemporaryDirectory(prefix="wanlink-") as folder:
        port_file = Path(folder) / "port"
        command = [sys.executable, "-m", "benchmarks.wanlink", "probe-server", SERVER_IP, str(port_file)]
        server = subprocess.Popen([*_in(link.server_ns), *command], cwd=ROOT)
        try:
            deadline = time.monotonic() + 30
            while not (port_file.exists() and port_file.read_text()):
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the link's probe server did not start")
                time.sleep(0.02)
            target = link.expose(int(port_file.read_text()))
            host, port = target.rsplit(":", 1)
            command = [sys.executable, "-m", "benchmarks.wanlink", "probe-client", host, port, str(size), str(size)]
            out = subprocess.run([*_in(link.client_ns), *command], cwd=ROOT, check=True, capture_output=True)
            return dict(json.loads(out.stdout))
        finally:
            link.release()
            _stop(server)


def tcp_settings(ns: str) -> str:
    """The TCP settings in `ns` that bound a long fat link (its congestion control, buffers, slow start)."""
    keys = (
        "net.ipv4.tcp_congestion_control",
        "net.ipv4.tcp_wmem",
        "net.ipv4.tcp_rmem",
        "net.ipv4.tcp_slow_start_after_idle",
    )
    out = subprocess.run([*_in(ns), "sysctl", *keys], capture_output=True, text=True).stdout
    return "; ".join(" ".join(line.split()) for line in out.splitlines())


def main(argv: list[str]) -> int:
    command, args = argv[0], argv[1:]
    if command == "delay":
        delay(args[0], float(args[1]), float(args[2]), args[3])
    elif command == "proxy":
        proxy(args[0], int(args[1]), args[2], float(args[3]))
    elif command == "probe-server":
        probe_server(args[0], args[1])
    elif command == "probe-client":
        print(json.dumps(probe_client(args[0], int(args[1]), int(args[2]), int(args[3]))))
    elif command == "try":  # build one link and measure it: `try RATE RTT_MS [MODE [CONGESTION]]`
        mode, congestion = (args[2] if len(args) > 2 else "packet"), (args[3] if len(args) > 3 else None)
        with wan_link(args[0], float(args[1]), mode, congestion=congestion) as link:
            print(tcp_settings(link.client_ns))
            print(json.dumps(measure(link)))
    else:
        raise SystemExit(f"unknown command {command!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
