"""Benchmark: the uncut model (Keras `fit`, one process) against the split model (two processes, gRPC).

    PYTHONPATH=. python benchmarks/bench.py                       # cnn, small-batch, wide-iv, slow-link
    PYTHONPATH=. python benchmarks/bench.py --workloads cnn --steps 10   # a quick check
    PYTHONPATH=. python benchmarks/bench.py --accuracy-only       # the wire encodings' effect on digits

Prints, per workload, samples/s of each run (steady state: from the end of the first timed step to the end of
the last, for both, so neither pays `fit`'s set-up) and their ratio R (split / uncut, same run, same data, same
seeded model), payload bytes on the wire per step, a bare gRPC echo of that payload, and where a split
step's time goes. By default every process gets the same (first two) cores with one TensorFlow thread per
core: the split's client and server take turns, so each may use all of them, as the uncut process does;
--client-cpus / --server-cpus / --uncut-cpus change that (the figures say which). `slow-link` needs root;
without it the script says so.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import netns  # noqa: E402
from benchmarks.workloads import WORKLOADS, Workload  # noqa: E402
from splitlearning import subprocesses  # noqa: E402
from splitlearning.devices import parse_cpus  # noqa: E402

ENCODINGS = ("raw", "float16", "bfloat16", "int8")
_START_TIMEOUT = 180.0


@dataclass(frozen=True)
class Cores:
    client: str
    server: str
    uncut: str
    uncut_threads: int

    @property
    def client_threads(self) -> int:
        return len(parse_cpus(self.client))

    @property
    def server_threads(self) -> int:
        return len(parse_cpus(self.server))

    def __str__(self) -> str:
        return (
            f"split: client on cores {self.client} ({self.client_threads} TF threads), server on cores "
            f"{self.server} ({self.server_threads} TF threads); "
            f"uncut: cores {self.uncut} ({self.uncut_threads} TF threads)"
        )


class Runner:
    """Starts role processes (optionally inside a network namespace) and collects their JSON."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        self.env["TF_CPP_MIN_LOG_LEVEL"] = "2"
        self._count = 0

    def _spec(self, role: str, spec: dict[str, Any]) -> dict[str, Any]:
        self._count += 1
        out = self.workdir / f"{self._count}-{role}.json"
        return {**spec, "out": str(out), "port_file": str(self.workdir / f"{self._count}-{role}.port")}

    def _command(self, role: str, spec: dict[str, Any], ns: str | None) -> list[str]:
        command = [sys.executable, "-m", "benchmarks.roles", role, json.dumps(spec)]
        return ["ip", "netns", "exec", ns, *command] if ns else command

    def run(self, role: str, spec: dict[str, Any], ns: str | None = None) -> dict[str, Any]:
        spec = self._spec(role, spec)
        subprocess.run(self._command(role, spec, ns), env=self.env, cwd=ROOT, check=True)
        return json.loads(Path(spec["out"]).read_text())

    def start(
        self, role: str, spec: dict[str, Any], ns: str | None = None
    ) -> tuple[subprocess.Popen[bytes], dict[str, Any], int]:
        spec = self._spec(role, spec)
        process = subprocess.Popen(self._command(role, spec, ns), env=self.env, cwd=ROOT)
        port_file, deadline = Path(spec["port_file"]), time.monotonic() + _START_TIMEOUT
        while not (port_file.exists() and port_file.read_text().strip()):
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"{role} did not start (exit status {process.returncode})")
            time.sleep(0.05)
        return process, spec, int(port_file.read_text())

    @staticmethod
    def stop(process: subprocess.Popen[bytes], spec: dict[str, Any]) -> dict[str, Any]:
        """SIGTERM the process (SIGKILL after a minute) and read the figures it wrote on its way out."""
        status = subprocesses.stop(process, timeout=60)
        out = Path(spec["out"])
        if not out.exists():
            raise RuntimeError(f"the process ended (exit status {status}) without writing {out.name}")
        return json.loads(out.read_text())


def split_run(
    runner: Runner, base: dict[str, Any], cores: Cores, case: tuple[str, int], link: netns.Link | None
) -> dict[str, Any]:
    encoding, micro_batches = case
    host = link.server_ip if link else "127.0.0.1"
    server_spec = {**base, "cpus": cores.server, "threads": cores.server_threads, "address": f"{host}:0"}
    server_spec["device"] = base["server_device"]  # `base`'s device is the uncut run's and the client's
    server, server_spec, port = runner.start("server", server_spec, link.server_ns if link else None)
    try:
        client_spec = {**base, "cpus": cores.client, "threads": cores.client_threads, "target": f"{host}:{port}"}
        client_spec["encoding"] = encoding
        client_spec["micro_batches"] = micro_batches
        result = runner.run("client", client_spec, link.client_ns if link else None)
    finally:
        served = runner.stop(server, server_spec)
    result["server"] = served["durations"]
    return result


def echo_run(runner: Runner, cores: Cores, up: int, down: int, link: netns.Link | None, rounds: int) -> float:
    host = link.server_ip if link else "127.0.0.1"
    sizes = {"request_bytes": up, "reply_bytes": down}
    spec = {**sizes, "cpus": cores.server, "threads": 1, "address": f"{host}:0"}
    server, spec, port = runner.start("echo-server", spec, link.server_ns if link else None)
    try:
        client_spec = {**sizes, "cpus": cores.client, "target": f"{host}:{port}", "rounds": rounds}
        result = runner.run("echo-client", client_spec, link.client_ns if link else None)
    finally:
        runner.stop(server, spec)
    return float(result["median_s"])


def breakdown(result: dict[str, Any], micro_batches: int) -> dict[str, float]:
    """Mean milliseconds per step of each phase (server phases from the server's own timers)."""
    steps, m = result["steps"], micro_batches
    # A timer that never ran (a local loss's client decodes no gradient and calls no `receive`) reads as empty.
    client: dict[str, list[float]] = defaultdict(list, result["durations"])
    server: dict[str, list[float]] = defaultdict(list, result["server"])

    def per_step(values: list[float], calls_per_step: int = 1) -> float:
        tail = values[-steps * calls_per_step :]
        return 1e3 * sum(tail) / steps if tail else 0.0

    pipelined = not client.get("exchange")
    if pipelined:  # sends and waits for answers interleave with the compute: the wait is in `receive` alone
        client = defaultdict(list, {**client, "exchange": client["receive"], "forward": [], "backward": []})
    # The exchange's own encoding and decoding are listed apart; a pipelined step encodes in `send`, outside it.
    inside = per_step(client["decode"], m) + (0.0 if pipelined else per_step(client["encode"], 2 * m))
    phases = {
        "forward": per_step(client["forward"]),
        "encode": per_step(client["encode"], 2 * m),
        "exchange": per_step(client["exchange"], m) - inside,
        "decode": per_step(client["decode"], m),
        "backward": per_step(client["backward"]),
        "srv_decode": per_step(server["decode"], 2 * m),
        "srv_checks": per_step(server["state"], m) - per_step(server["step"], m),
        "srv_step": per_step(server["step"], m),
        "srv_encode": per_step(server["encode"], m),
        "srv_total": per_step(server["servicer"], m),
    }
    phases["grpc"] = phases["exchange"] - phases["srv_total"]
    # In transit: from gRPC taking a message's bytes on one side to the parser receiving them on the other.
    calls = steps * m
    phases["uplink"] = _median_gap(client["sent"][-calls:], server["parsed"][-calls:])
    phases["downlink"] = _median_gap(server["sent"][-calls:], client["parsed"][-calls:])
    phases["loop"] = 1e3 * result["seconds"] / steps - per_step(client["step"])
    phases["total"] = 1e3 * result["seconds"] / steps
    return phases


def _median_gap(sent: list[float], received: list[float]) -> float:
    """Median ms from each message's send to its receipt (the i-th sent is the i-th received: one stream); NaN when
    the two sides timed different counts (steps in flight across the run's window: stale gradients, a local loss)."""
    if len(sent) != len(received):
        return float("nan")
    gaps = sorted(r - s for s, r in zip(sent, received, strict=True))
    return 1e3 * gaps[len(gaps) // 2] if gaps else float("nan")


def wire_bytes(result: dict[str, Any]) -> tuple[int, int]:
    steps, durations = result["steps"], result["durations"]
    # A local loss's replies carry no tensor: nothing decoded.
    up, down = durations.get("encode_bytes", []), durations.get("decode_bytes", [])
    return round(sum(up) / steps), round(sum(down) / steps)


def bench_workload(runner: Runner, workload: Workload, args: argparse.Namespace, cores: Cores) -> list[dict[str, Any]]:
    steps = args.steps or workload.steps
    base = {
        "model": workload.model,
        "batch_size": workload.batch_size,
        "samples": steps * workload.batch_size,
        "warmup_steps": 3,
        "seed": 0,
        "device": args.device,  # the uncut run's and the split client's
        "server_device": args.server_device or args.device,
    }
    print(f"\n== {workload.name}: {workload.what}; {steps} timed steps of {workload.batch_size}", flush=True)
    print(f"   IV {workload.iv_floats:,} float32 per sample; {cores}", flush=True)
    print(f"   devices: uncut and split client {base['device']}, split server {base['server_device']}", flush=True)
    uncut = max(
        runner.run("uncut", {**base, "cpus": cores.uncut, "threads": cores.uncut_threads})["samples_per_s"]
        for _ in range(args.repeats)
    )
    print(f"   uncut, keras fit          {uncut:10,.0f} samples/s", flush=True)
    cases = parse_cases(args.cases) if args.cases else workload.cases
    rows = []
    with netns.slow_link(args.rate) if workload.slow_link else _no_link() as link:
        for case in cases:
            encoding, micro_batches = case
            label = encoding if micro_batches == 1 else f"{encoding}, {micro_batches} micro-batches"
            runs = [split_run(runner, base, cores, case, link) for _ in range(args.repeats)]
            best = max(runs, key=lambda r: r["samples_per_s"])
            up, down = wire_bytes(best)
            echo = echo_run(runner, cores, up, down, link, rounds=args.echo_rounds)
            phases = breakdown(best, micro_batches)
            ratio = best["samples_per_s"] / uncut
            print(f"   split, {label:<24} {best['samples_per_s']:10,.0f} samples/s   R = {ratio:.3f}")
            print(f"      wire per step: {up:,} B up + {down:,} B down; bare gRPC echo of it: {1e3 * echo:.2f} ms")
            if micro_batches > 1:
                print(
                    "      per step (ms, pipelined: phases overlap): encode {encode:.2f} | waiting for answers "
                    "{exchange:.2f} [server: decode {srv_decode:.2f}, checks {srv_checks:.2f}, step {srv_step:.2f}, "
                    "encode {srv_encode:.2f}; in transit up {uplink:.2f}, down {downlink:.2f} each] | decode "
                    "{decode:.2f} | fit loop {loop:.2f} | total {total:.2f}".format(**phases),
                    flush=True,
                )
                rows.append(_row(workload, label, uncut, best, ratio, up, down, echo, phases))
                continue
            print(
                "      per step (ms): client forward {forward:.2f} | encode {encode:.2f} | exchange {exchange:.2f} "
                "[server: decode {srv_decode:.2f}, checks {srv_checks:.2f}, step {srv_step:.2f}, "
                "encode {srv_encode:.2f}; gRPC+wire {grpc:.2f}, in transit up {uplink:.2f}, down {downlink:.2f}] | "
                "decode {decode:.2f} | "
                "client backward {backward:.2f} | fit loop {loop:.2f} | total {total:.2f}".format(**phases),
                flush=True,
            )
            rows.append(_row(workload, label, uncut, best, ratio, up, down, echo, phases))
    return rows


def _row(
    workload: Workload,
    label: str,
    uncut: float,
    best: dict[str, Any],
    ratio: float,
    up: int,
    down: int,
    echo: float,
    phases: dict[str, float],
) -> dict[str, Any]:
    return {
        "workload": workload.name,
        "encoding": label,
        "batch": workload.batch_size,
        "uncut": uncut,
        "split": best["samples_per_s"],
        "ratio": ratio,
        "up": up,
        "down": down,
        "echo_ms": 1e3 * echo,
        "step_ms": phases["total"],
    }


def parse_cases(text: str) -> list[tuple[str, int]]:
    """'raw,int8:4' -> [('raw', 1), ('int8', 4)]: wire encoding and micro-batches per step."""
    cases = []
    for item in filter(None, (p.strip() for p in text.split(","))):
        encoding, _, parts = item.partition(":")
        if encoding not in ENCODINGS:
            raise SystemExit(f"--cases: unknown encoding {encoding!r}; expected one of {ENCODINGS}")
        cases.append((encoding, int(parts or 1)))
    return cases


class _no_link:  # noqa: N801 (a null context manager, used like netns.slow_link)
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def accuracy(runner: Runner, args: argparse.Namespace) -> None:
    print(f"\n== wire encodings on digits (digits-cnn, real 8x8 images, {args.accuracy_epochs} epochs, batch 64)")
    results = runner.run("accuracy", {"encodings": list(ENCODINGS), "epochs": args.accuracy_epochs})
    raw = results["raw"]["bytes_per_step"]
    print("   | encoding | test accuracy | test loss | bytes per step (IV + labels + gradient) |")
    print("   | --- | --- | --- | --- |")
    for name, r in results.items():
        saved = 1 - r["bytes_per_step"] / raw
        print(f"   | {name} | {r['accuracy']:.4f} | {r['loss']:.4f} | {r['bytes_per_step']:,.0f} (-{saved:.0%}) |")


def pick_cores(args: argparse.Namespace) -> Cores:
    """By default every run gets the same cores: the split's two processes take turns (the client waits for
    the server's answer), so each may use all of them, as the uncut process does."""
    everything = ",".join(str(c) for c in sorted(os.sched_getaffinity(0))[:2])
    uncut = args.uncut_cpus or everything
    return Cores(
        client=args.client_cpus or uncut,
        server=args.server_cpus or uncut,
        uncut=uncut,
        uncut_threads=len(parse_cpus(uncut)),
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated: {', '.join(WORKLOADS)}")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per run (default: per workload)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each case; the best is reported")
    parser.add_argument(
        "--cases",
        default=None,
        help="split runs as ENCODING[:MICRO_BATCHES], comma-separated, e.g. 'raw,int8:4' (default: per workload)",
    )
    parser.add_argument("--rate", default="100mbit", help="slow-link rate, as tc tbf takes it")
    parser.add_argument("--echo-rounds", type=int, default=50, help="round trips of the bare gRPC echo")
    parser.add_argument(
        "--client-cpus",
        default=None,
        help="cores of the split client, e.g. 0 or 0-1 (default: the uncut run's); one TF thread per core",
    )
    parser.add_argument(
        "--server-cpus",
        default=None,
        help="cores of the split server, e.g. 1 (default: the uncut run's); one TF thread per core",
    )
    parser.add_argument("--uncut-cpus", default=None, help="cores of the uncut run (default: both of them)")
    parser.add_argument(
        "--device", default="/CPU:0", help="device of the uncut run and the split client, e.g. /GPU:0 (default: /CPU:0)"
    )
    parser.add_argument("--server-device", default=None, help="device of the split server (default: --device)")
    parser.add_argument("--accuracy-epochs", type=int, default=5, help="epochs of the digits accuracy check")
    parser.add_argument("--no-accuracy", action="store_true", help="skip the wire encodings' accuracy check")
    parser.add_argument("--accuracy-only", action="store_true", help="run only the accuracy check")
    parser.add_argument("--json", type=Path, default=None, help="also write the summary rows here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cores = pick_cores(args)
    print(f"machine: {os.cpu_count()} cores, load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="split-bench-") as tmp:
        runner = Runner(Path(tmp))
        if not args.accuracy_only:
            for name in args.workloads.split(","):
                workload = WORKLOADS[name]
                if workload.slow_link and (why := netns.unavailable()):
                    print(f"\n== {name}: skipped: {why}")
                    continue
                rows += bench_workload(runner, workload, args, cores)
        if args.accuracy_only or not args.no_accuracy:
            accuracy(runner, args)
    if rows:
        print("\n| workload | batch | wire | uncut samples/s | split samples/s | R | bytes/step up+down | echo ms |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for r in rows:
            print(
                f"| {r['workload']} | {r['batch']} | {r['encoding']} | {r['uncut']:,.0f} | {r['split']:,.0f} | "
                f"{r['ratio']:.2f} | {r['up'] + r['down']:,} | {r['echo_ms']:.2f} |"
            )
    print(f"load average at the end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
