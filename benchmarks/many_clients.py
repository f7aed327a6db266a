"""Many clients, one server: total and per-client training throughput with 1, 2 and 4 concurrent clients.

    PYTHONPATH=. python benchmarks/many_clients.py                 # the cnn pair (mnist-cnn), batch 128
    PYTHONPATH=. python benchmarks/many_clients.py --clients 1,2 --steps 20

One `split-server` process holds a session per client; each client is a process of its own (as data holders
are), on the same machine. Every client warms up (TensorFlow's tracing, its session's first steps), then all
start their timed steps together (a barrier on files) and train the same number of steps. Reported per round:
total samples/s (all clients' timed samples over the span from the first start to the last end), each client's
own samples/s, and the server's CPU use over that span (cores busy, from /proc). No figure is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
_TICKS = os.sysconf("SC_CLK_TCK")


def client_role(spec: dict[str, Any]) -> None:
    """One client process: warm up, wait at the barrier, train `steps` timed steps, write its figures."""
    from benchmarks.workloads import synthetic_mnist
    from client_part import SplitClient
    from splitlearning.models import BUILTIN

    pair = BUILTIN[spec["model"]]
    batch, steps, warmup = spec["batch_size"], spec["steps"], spec["warmup"]
    x, y = synthetic_mnist(batch * (steps + warmup), seed=spec["seed"])
    target = spec["target"]
    client = SplitClient(pair.client(spec["seed"]), "adam", target=target, max_batch_size=batch, rpc_timeout=600)
    with client:
        client.fit(x[: batch * warmup], y[: batch * warmup], batch_size=batch, epochs=1, verbose=0)
        Path(spec["ready"]).touch()
        while not Path(spec["go"]).exists():
            time.sleep(0.005)
        started = time.time()
        client.fit(x[batch * warmup :], y[batch * warmup :], batch_size=batch, epochs=1, verbose=0)
        ended = time.time()
        client.end_session()
    Path(spec["out"]).write_text(json.dumps({"start": started, "end": ended, "samples": batch * steps}))


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime + stime


def run_round(args: argparse.Namespace, target: str, server_pid: int, clients: int, work: Path) -> dict[str, Any]:
    go = work / f"go-{clients}"
    processes, outs, readies = [], [], []
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    for index in range(clients):
        out, ready = work / f"out-{clients}-{index}.json", work / f"ready-{clients}-{index}"
        spec = {
            "model": args.model,
            "batch_size": args.batch_size,
            "steps": args.steps,
            "warmup": args.warmup,
            "seed": index,
            "target": target,
            "ready": str(ready),
            "go": str(go),
            "out": str(out),
        }
        command = [sys.executable, __file__, "--role-client", json.dumps(spec)]
        processes.append(subprocess.Popen(command, env=env, cwd=ROOT))
        outs.append(out)
        readies.append(ready)
    while not all(ready.exists() for ready in readies):
        if any(p.poll() not in (None, 0) for p in processes):
            raise RuntimeError("a client failed during its warm-up")
        time.sleep(0.05)
    cpu_before, wall_before = cpu_seconds(server_pid), time.time()
    go.touch()
    for process in processes:
        if process.wait(timeout=1800) != 0:
            raise RuntimeError("a client failed")
    cpu_after, wall_after = cpu_seconds(server_pid), time.time()
    results = [json.loads(out.read_text()) for out in outs]
    span = max(r["end"] for r in results) - min(r["start"] for r in results)
    return {
        "clients": clients,
        "total": sum(r["samples"] for r in results) / span,
        "per_client": [r["samples"] / (r["end"] - r["start"]) for r in results],
        "server_cores": (cpu_after - cpu_before) / (wall_after - wall_before),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="many_clients", description=__doc__.split("\n\n")[0])
    parser.add_argument("--role-client", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model", default="mnist-cnn", help="built-in model pair (default: the benchmark's cnn)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=40, help="timed steps per client")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per client first")
    parser.add_argument("--clients", default="1,2,4", help="comma-separated numbers of concurrent clients")
    args = parser.parse_args(argv)
    if args.role_client:
        client_role(json.loads(args.role_client))
        return 0
    counts = [int(c) for c in args.clients.split(",")]
    with tempfile.TemporaryDirectory(prefix="many-clients-") as folder:
        work = Path(folder)
        port_file = work / "port"
        env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
        server_flags = ["--model", args.model, "--address", "127.0.0.1:0", "--port-file", str(port_file)]
        server_flags += ["--max-batch-size", str(args.batch_size), "--max-sessions", str(max(counts) + 1)]
        server_flags += ["--log-level", "WARNING"]
        server = subprocess.Popen([sys.executable, "-m", "server_part", *server_flags], env=env, cwd=ROOT)
        try:
            while not port_file.exists() or not port_file.read_text().strip():
                if server.poll() is not None:
                    raise RuntimeError("split-server did not start")
                time.sleep(0.05)
            target = f"127.0.0.1:{port_file.read_text().strip()}"
            rounds = [run_round(args, target, server.pid, n, work) for n in counts]
        finally:
            server.terminate()
            server.wait(timeout=30)
    base = rounds[0]["total"]
    print(f"\n{args.model}, batch {args.batch_size}, {args.steps} timed steps per client, {os.cpu_count()} cores")
    print("| clients | total samples/s | vs 1 client | per client samples/s | server CPU (cores) |")
    print("| --- | --- | --- | --- | --- |")
    for r in rounds:
        per = ", ".join(f"{v:,.0f}" for v in r["per_client"])
        ratio = r["total"] / base
        print(f"| {r['clients']} | {r['total']:,.0f} | {ratio:.2f} | {per} | {r['server_cores']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
