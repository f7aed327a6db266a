"""Half-open calls against a real `split-server` process (issue 16): its RSS and threads, and how fast a health
check and a token holder's handshake are served, with rounds of calls whose request never completes.

    PYTHONPATH=. python benchmarks/halfopen.py [--calls 2000] [--connections 20] [--rounds 4]

The calls come from the raw HTTP/2 client of the admission tests (tests/halfopen_support.py), on loopback.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from splitlearning.protocol import PROTOCOL_VERSION
from splitlearning.v1 import split_learning_pb2 as pb
from splitlearning.v1 import split_learning_pb2_grpc as pb_grpc
from tests.halfopen_support import half_open_calls

SERVICE = "/splitlearning.v1.SplitLearningService/"
ATTACKS = {
    "unauthenticated Handshake/Predict": [SERVICE + "Handshake", SERVICE + "Predict"],
    "health Check": ["/grpc.health.v1.Health/Check"],
}
TOKEN = "halfopen-benchmark-token"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_and_threads(pid: int) -> tuple[int, int]:
    with open(f"/proc/{pid}/status") as status:
        fields = dict(line.split(":", 1) for line in status)
    return int(fields["VmRSS"].split()[0]) // 1024, int(fields["Threads"])


def served(port: int) -> tuple[float, float]:
    """Seconds to a health check's answer and to a token holder's handshake (each with a 2 s deadline)."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        started = time.perf_counter()
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2.0)
        health = time.perf_counter() - started
        contract = pb.CutContract(iv=pb.TensorSpec(shape=[64], dtype=pb.DTYPE_FLOAT32))
        request = pb.HandshakeRequest(protocol_version=PROTOCOL_VERSION, contract=contract, max_batch_size=8)
        started = time.perf_counter()
        stub = pb_grpc.SplitLearningServiceStub(channel)
        stub.Handshake(request, metadata=[("authorization", f"Bearer {TOKEN}")], timeout=2.0)
        return health, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--connections", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        token = Path(directory) / "token"
        token.write_text(TOKEN + "\n")
        token.chmod(0o600)
        port = free_port()
        command = [sys.executable, "-m", "server_part", "--address", f"127.0.0.1:{port}", "--model", "digits-mlp"]
        command += ["--auth-token-file", str(token), "--log-level", "WARNING"]
        server = subprocess.Popen(command, stderr=subprocess.DEVNULL, env={**os.environ})
        try:
            deadline = time.monotonic() + 120.0
            while True:
                try:
                    idle = served(port)
                    break
                except grpc.RpcError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
            print(
                f"idle: RSS {rss_and_threads(server.pid)[0]} MiB, threads {rss_and_threads(server.pid)[1]}, "
                f"health {idle[0] * 1e3:.1f} ms, handshake {idle[1] * 1e3:.1f} ms"
            )
            for kind, methods in ATTACKS.items():
                for round_ in range(args.rounds):
                    with half_open_calls(port, methods, args.calls, args.connections) as connections:
                        deadline = time.monotonic() + 30.0
                        while sum(c.refused for c in connections) < args.calls - 20 and time.monotonic() < deadline:
                            time.sleep(0.05)
                        time.sleep(0.3)
                        ended = sum(c.refused for c in connections)
                        rss, threads = rss_and_threads(server.pid)
                        health, handshake = served(port)
                    print(
                        f"round {round_}: {args.calls} half-open {kind} on {args.connections} connections: "
                        f"{ended} ended by the server; RSS {rss} MiB, threads {threads}, "
                        f"health {health * 1e3:.1f} ms, handshake {handshake * 1e3:.1f} ms",
                        flush=True,
                    )
        finally:
            server.terminate()
            server.wait(10)


if __name__ == "__main__":
    main()
