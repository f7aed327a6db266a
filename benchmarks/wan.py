"""Benchmark: split training across a wide-area link, against its floor.

    PYTHONPATH=. python benchmarks/wan.py                        # 4 links x raw, int8, int8:4 (needs root)
    PYTHONPATH=. python benchmarks/wan.py --links 80ms@100mbit --cases int8,int8:4 --rounds 3
    PYTHONPATH=. python benchmarks/wan.py --links loopback       # no link: E against the in-process floor
    PYTHONPATH=. python benchmarks/wan.py --grpc A: --grpc 'B:grpc.http2.lookahead_bytes=4194304'   # A/B

The cnn pair (batch 128, SGD by default), the split server and client each in a process of its own, the
server in one network namespace and the client in another, joined through `benchmarks/wanlink.py`: a router
namespace that shapes the rate of each direction (`tc tbf`) and delays each packet by half the round-trip
time (a TUN device and a small process of its own; `--mode proxy`: a delaying TCP proxy instead). Before the
cases of each link, what the link really adds is measured and printed: the RTT of small ping-pongs and the
rate of a bulk transfer each way.

Per case: the bytes per step each way (payload), the compute floor (one step of the two parts' compiled
steps in turn in one process, no gRPC: `benchmarks/compute_floor.py`'s `ComputeFloor`; timed in the client's
own process just before its run's warm-up and just after its timed steps, on the same cores: the mean of the
two medians), the floor = compute + RTT + bytes up / rate up + bytes down / rate down (the measured link),
the measured ms per step (steady state, mean) and E = floor / measured. With micro-batches, transfer and
compute overlap, so E may pass 1. Then where the step's time goes, per hop (the client's and the server's timers):
client compute, waiting for answers, the server's part, each direction's time in transit (from gRPC taking a
message's bytes to the other side's parser receiving them) against the link's one-way delay plus transfer.

`--rounds N` repeats everything N times, the cases in turn within a round (and `--grpc` option sets in turn
within a case), and prints medians: run it on a quiet machine, or say how loaded it was (printed).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import wanlink  # noqa: E402
from benchmarks.bench import Runner, breakdown, parse_cases, wire_bytes  # noqa: E402
from splitlearning.devices import parse_cpus  # noqa: E402

DEFAULT_LINKS = "20ms@1gbit,20ms@100mbit,80ms@1gbit,80ms@100mbit"


@dataclass(frozen=True)
class LinkCase:
    """A link to build: `rtt_ms` and `rate` (tc's syntax), with the endpoints' TCP congestion control on its
    route (None: the host's), or loopback (no namespaces: rtt 0, no rate)."""

    name: str
    rtt_ms: float = 0.0
    rate: str = ""
    congestion: str | None = None

    @property
    def loopback(self) -> bool:
        return not self.rate


def parse_links(text: str, congestion: str | None = None) -> list[LinkCase]:
    """'20ms@100mbit,80ms@1gbit/cubic,loopback' -> the links, in order. `congestion` ('host,cubic'): each
    link that names none is run once with each (host: the host's own), next to each other."""
    links = []
    variants = [None if c == "host" else c for c in congestion.split(",")] if congestion else [None]
    for item in filter(None, (p.strip() for p in text.split(","))):
        if item == "loopback":
            links.append(LinkCase("loopback"))
            continue
        spec, _, named = item.partition("/")
        rtt, _, rate = spec.partition("@")
        if not rtt.endswith("ms") or not rate:
            raise SystemExit(f"--links: {item!r}: expected RTTms@RATE[/CONGESTION], e.g. 20ms@100mbit, or loopback")
        for cc in [named] if named else variants:
            links.append(LinkCase(f"{spec}/{cc}" if cc else spec, float(rtt[:-2]), rate, cc))
    return links


def parse_grpc(texts: list[str]) -> dict[str, list[list[Any]]]:
    """'NAME:key=value;key=value' -> {NAME: [[key, value], ...]} (integer values as integers); both the server
    and the client take them (a server ignores a channel's option and the other way round)."""
    sets: dict[str, list[list[Any]]] = {}
    for text in texts or ["default:"]:
        name, _, body = text.partition(":")
        options: list[list[Any]] = []
        for pair in filter(None, (p.strip() for p in body.split(";"))):
            key, _, value = pair.partition("=")
            options.append([key, int(value) if value.lstrip("-").isdigit() else value])
        sets[name or "default"] = options
    return sets


def _in_turn(links: list[LinkCase], round_index: int) -> list[LinkCase]:
    """The links in order, except that in every other round the variants of one link (other congestion
    controls, listed next to each other) run in reverse order."""
    if round_index % 2 == 0:
        return links
    groups: list[list[LinkCase]] = []
    for link in links:
        same = groups and (groups[-1][0].rtt_ms, groups[-1][0].rate) == (link.rtt_ms, link.rate)
        if same and not link.loopback:
            groups[-1].append(link)
        else:
            groups.append([link])
    return [link for group in groups for link in reversed(group)]


Case = tuple[str, int, str]  # wire encoding, micro-batches, approximation ('' for the exact split)
APPROXIMATIONS = {
    "": {},
    "stale": {"stale_gradients": True},
    "local": {"local_loss": True},
}


def _approximation(name: str) -> dict[str, Any]:
    """'stale', 'local', 'topk0.1' or 'stale/topk0.1' -> `Approximations`' keyword arguments."""
    settings: dict[str, Any] = {}
    for part in filter(None, name.split("/")):
        if part.startswith("topk"):
            settings["top_k"] = float(part[4:])
        elif part in APPROXIMATIONS:
            settings.update(APPROXIMATIONS[part])
        else:
            raise SystemExit(f"--cases: unknown approximation {part!r}; expected stale, local or topkF (e.g. topk0.1)")
    return settings


def parse_wan_cases(text: str) -> list[Case]:
    """'raw,int8:4,raw+stale,raw+topk0.1' -> (encoding, micro-batches, approximation) per case."""
    cases = []
    for item in filter(None, (p.strip() for p in text.split(","))):
        plain, _, approximation = item.partition("+")
        _approximation(approximation)  # refuse a typo before any link is built
        ((encoding, parts),) = parse_cases(plain)
        cases.append((encoding, parts, approximation))
    return cases


def _label(case: Case) -> str:
    encoding, parts, approximation = case
    label = encoding if parts == 1 else f"{encoding}:{parts}"
    return f"{label}+{approximation}" if approximation else label


@contextlib.contextmanager
def _link(link: LinkCase, mode: str) -> Iterator[wanlink.Link | None]:
    if link.loopback:
        yield None
        return
    with wanlink.wan_link(link.rate, link.rtt_ms, mode, congestion=link.congestion) as built:
        yield built


def split_runs(
    runner: Runner,
    base: dict[str, Any],
    runs: list[tuple[Case, str]],
    option_sets: dict[str, list[list[Any]]],
    built: wanlink.Link | None,
) -> list[dict[str, Any]]:
    """`runs` ((encoding, micro-batches), option set) in turn: a server per option set in the server's
    namespace (started together, each serving every run of its set: a session each), and one client process
    in the client's, dialling each through the link with a fresh channel (a TCP connection of its own) per run.
    Each result gets its server's figures from within its own run's time window."""
    host = built.server_ip if built else "127.0.0.1"
    servers: dict[str, tuple[Any, dict[str, Any], int]] = {}
    try:
        for name, options in option_sets.items():
            spec = {**base, "address": f"{host}:0", "server_options": options}
            servers[name] = runner.start("server", spec, built.server_ns if built else None)
        targets = {name: built.expose(port) if built else f"{host}:{port}" for name, (_, _, port) in servers.items()}
        client_runs = [
            {
                "target": targets[name],
                "encoding": case[0],
                "micro_batches": case[1],
                "approximations": _approximation(case[2]),
                "channel_options": option_sets[name],
            }
            for case, name in runs
        ]
        results = runner.run("wan-client", {**base, "runs": client_runs}, built.client_ns if built else None)["runs"]
    finally:
        if built:
            built.release()
        served = {name: runner.stop(process, spec) for name, (process, spec, _) in servers.items()}
    for result, (_, name) in zip(results, runs, strict=True):
        result["server"] = _within(served[name], *result["window"])
    return results


def _within(served: dict[str, Any], start: float, end: float) -> dict[str, list[float]]:
    """The server's figures from the calls that started in [start, end] (one client's timed steps): both
    processes read the same monotonic clock."""
    durations, starts = served["durations"], served["starts"]
    kept: dict[str, Any] = {"servicer_spans": [span for span in served["servicer"] if start <= span[0] <= end]}
    for key, values in durations.items():
        if key in ("sent", "parsed"):
            kept[key] = [t for t in values if start <= t <= end]
        elif key in starts:
            kept[key] = [v for v, t in zip(values, starts[key], strict=True) if start <= t <= end]
    return kept


def evaluate(result: dict[str, Any], micro_batches: int, measured: dict[str, float]) -> dict[str, Any]:
    """The floor, E and the per-hop breakdown of one run."""
    # The client's process, just before the run's warm-up and just after its timed steps.
    compute_ms = statistics.fmean(f["parts_ms"] for f in result["floor_ms"])
    joined_ms = statistics.fmean(f["joined_ms"] for f in result["floor_ms"])
    up, down = wire_bytes(result)
    step_ms = 1e3 * result["batch"] / result["samples_per_s"]
    up_ms = 1e3 * 8 * up / measured["up_bit_s"] if measured else 0.0
    down_ms = 1e3 * 8 * down / measured["down_bit_s"] if measured else 0.0
    rtt_ms = measured["rtt_ms"] if measured else 0.0
    floor_ms = compute_ms + rtt_ms + up_ms + down_ms
    phases = breakdown(result, micro_batches)
    return {
        "pipelined": micro_batches > 1,
        "hops": hops(result),
        "up_bytes": up,
        "down_bytes": down,
        "compute_ms": compute_ms,
        "compute_before_after_ms": [f["parts_ms"] for f in result["floor_ms"]],
        "joined_ms": joined_ms,
        "rtt_ms": rtt_ms,
        "up_ms": up_ms,
        "down_ms": down_ms,
        "floor_ms": floor_ms,
        "step_ms": step_ms,
        "E": floor_ms / step_ms,
        "phases": phases,
    }


HOPS = {
    "to_grpc": "client: the step hands the request to gRPC (encode, queue, serialise)",
    "up": "in transit up (gRPC's send to the server's parser)",
    "to_servicer": "server: parser to handler",
    "servicer": "server: decode, step, encode",
    "to_wire": "server: handler to gRPC's send",
    "down": "in transit down",
    "to_step": "client: parser to the step (reader thread, queue, decode)",
}


def hops(result: dict[str, Any]) -> dict[str, float]:
    """Median ms of each hop of a message's round trip (see HOPS), from both processes' timestamps (the same
    monotonic clock): the i-th request sent is the i-th the server parses and answers, on one stream."""
    client: dict[str, list[float]] = defaultdict(list, result["durations"])
    server: dict[str, Any] = defaultdict(list, result["server"])
    spans: dict[str, list[Any]] = defaultdict(list, result["spans"])
    pipelined = not spans["exchange"]
    begins = [s for s, _ in (spans["send"] if pipelined else spans["exchange"])]
    ends = [e for _, e in (spans["receive"] if pipelined else spans["exchange"])]
    servicer = server["servicer_spans"]
    n = min(len(begins), len(ends), len(client["sent"]), len(client["parsed"]), len(server["parsed"]))
    n = min(n, len(server["sent"]), len(servicer))

    def gaps(later: list[float], earlier: list[float]) -> float:
        if not n:  # a timer that never ran (a local loss's client calls no `receive`)
            return float("nan")
        values = sorted(b - a for a, b in zip(earlier[-n:], later[-n:], strict=True))
        return 1e3 * values[len(values) // 2] if values else float("nan")

    return {
        "to_grpc": gaps(client["sent"], begins),
        "up": gaps(server["parsed"], client["sent"]),
        "to_servicer": gaps([s for s, _ in servicer], server["parsed"]),
        "servicer": gaps([e for _, e in servicer], [s for s, _ in servicer]),
        "to_wire": gaps(server["sent"], [e for _, e in servicer]),
        "down": gaps(client["parsed"], server["sent"]),
        "to_step": gaps(ends, client["parsed"]),
        "round_trip": gaps(ends, begins),
        "round_trip_mean": 1e3 * statistics.fmean(e - b for b, e in zip(begins[-n:], ends[-n:], strict=True))
        if n
        else float("nan"),
    }


def _print_run(link: LinkCase, label: str, option_set: str, row: dict[str, Any]) -> None:
    p = row["phases"]
    if row["pipelined"]:  # the phases overlap: the client's own time is what it did not spend waiting
        client_compute, split = row["step_ms"] - p["exchange"], "forward, send, backward: overlapping"
    else:
        client_compute = p["forward"] + p["backward"] + p["encode"] + p["decode"]
        split = f"forward {p['forward']:.1f}, backward {p['backward']:.1f}"
    print(
        f"   {link.name:<13} {label:<8} {option_set:<10} up {row['up_bytes']:>9,} B down {row['down_bytes']:>9,} B | "
        f"floor {row['floor_ms']:6.1f} ms = compute {row['compute_ms']:5.1f} + RTT {row['rtt_ms']:5.1f} + "
        f"up {row['up_ms']:5.1f} + down {row['down_ms']:5.1f} | measured {row['step_ms']:6.1f} ms | E {row['E']:.3f} "
        f"(compute joined by a hand-off {row['joined_ms']:.1f})",
        flush=True,
    )
    half = row["rtt_ms"] / 2
    print(
        f"      per step (ms): client compute {client_compute:.1f} ({split}) | waiting for answers "
        f"{p['exchange']:.1f} [server {p['srv_total']:.1f}; in transit "
        f"up {p['uplink']:.1f} (link {half + row['up_ms']:.1f}), down {p['downlink']:.1f} "
        f"(link {half + row['down_ms']:.1f})] | fit loop {p['loop']:.1f}",
        flush=True,
    )
    h = row["hops"]
    print(
        f"      a message's round trip (ms, medians): step -> gRPC {h['to_grpc']:.1f} | up {h['up']:.1f} | "
        f"-> handler {h['to_servicer']:.1f} | server {h['servicer']:.1f} | -> gRPC {h['to_wire']:.1f} | "
        f"down {h['down']:.1f} | -> step {h['to_step']:.1f}; whole: median {h['round_trip']:.1f}, "
        f"mean {h['round_trip_mean']:.1f}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    links = parse_links(args.links, args.congestion)
    cases = parse_wan_cases(args.cases)
    option_sets = parse_grpc(args.grpc)
    if any(not link.loopback for link in links) and (why := wanlink.unavailable()):
        print(f"the WAN links are skipped: {why}")
        links = [link for link in links if link.loopback]
    cpus = args.cpus or ",".join(str(c) for c in sorted(os.sched_getaffinity(0))[:2])
    threads = len(parse_cpus(cpus))
    steps = args.steps
    base = {
        "model": args.model,
        "batch_size": args.batch,
        "samples": steps * args.batch,
        "warmup_steps": 3,
        "seed": 0,
        "optimizer": args.optimizer,
        "device": "/CPU:0",
        "server_device": "/CPU:0",
        "cpus": cpus,
        "threads": threads,
        "floor_rounds": args.floor_rounds,
    }
    print(f"machine: {os.cpu_count()} cores, load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(
        f"{args.model}, batch {args.batch}, {args.optimizer}; {steps} timed steps per run; client, server and the "
        f"compute floor each on cores {cpus} ({threads} TF threads); delay by {args.mode}; {args.rounds} round(s)"
    )
    for name, options in option_sets.items():
        print(f"gRPC options {name}: {options or 'the product defaults'}")
    rows: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    links_seen: dict[str, list[dict[str, float]]] = defaultdict(list)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="split-wan-") as tmp:
        runner = Runner(Path(tmp))
        for round_index in range(args.rounds):
            load = " ".join(f"{v:.2f}" for v in os.getloadavg())
            print(f"\n== round {round_index + 1} (load average {load})", flush=True)
            for link in _in_turn(links, round_index):
                with _link(link, args.mode) as built:
                    measured: dict[str, float] = {}
                    if built is not None:
                        measured = wanlink.measure(built)
                        links_seen[link.name].append(measured)
                        print(
                            f"   link {link.name}: RTT {measured['rtt_ms']:.2f} ms (min {measured['rtt_min_ms']:.2f}, "
                            f"p90 {measured['rtt_p90_ms']:.2f}), bulk up {measured['up_bit_s'] / 1e6:.1f} Mbit/s, "
                            f"down {measured['down_bit_s'] / 1e6:.1f} Mbit/s",
                            flush=True,
                        )
                        if round_index == 0:
                            print(f"      TCP in the namespaces: {wanlink.tcp_settings(built.client_ns)}", end="")
                            print(f"; on the link's route: {link.congestion}" if link.congestion else "")
                    runs = []
                    for case_index, case in enumerate(cases):
                        # Which option set goes first alternates from case to case and from round to round.
                        names = list(option_sets)
                        flip = (case_index + round_index) % 2 == 1
                        runs += [(case, name) for name in (reversed(names) if flip else names)]
                    for (case, name), result in zip(
                        runs, split_runs(runner, base, runs, option_sets, built), strict=True
                    ):
                        result["batch"] = args.batch
                        row = evaluate(result, case[1], measured)
                        rows[(link.name, _label(case), name)].append(row)
                        _print_run(link, _label(case), name, row)
    summary(rows, links_seen, option_sets, args)
    print(f"\nload average at the end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}; ", end="")
    print(f"{time.monotonic() - started:.0f} s in all")
    if args.json:
        flat = [{"link": k[0], "case": k[1], "grpc": k[2], "runs": v} for k, v in rows.items()]
        args.json.write_text(json.dumps({"links": links_seen, "rows": flat}, indent=2, default=float))
    return 0


def summary(
    rows: dict[tuple[str, str, str], list[dict[str, Any]]],
    links_seen: dict[str, list[dict[str, float]]],
    option_sets: dict[str, list[list[Any]]],
    args: argparse.Namespace,
) -> None:
    def med(values: list[float]) -> float:
        return statistics.median(values)

    print(f"\nmedians over {args.rounds} round(s)")
    if links_seen:
        print("\n| link | RTT ms (median of ping-pongs) | bulk up Mbit/s | bulk down Mbit/s |")
        print("| --- | --- | --- | --- |")
        for name, seen in links_seen.items():
            rtt = med([s["rtt_ms"] for s in seen])
            up, down = (med([s[k] for s in seen]) / 1e6 for k in ("up_bit_s", "down_bit_s"))
            print(f"| {name} | {rtt:.2f} | {up:.1f} | {down:.1f} |")
    several = len(option_sets) > 1
    head = "| link | wire | gRPC options | " if several else "| link | wire | "
    print(f"\n{head}bytes/step up + down | compute ms | floor ms | measured ms/step | E | E min-max |")
    print("| --- " * (head.count("|") - 1 + 6) + "|")
    for (link, label, name), runs in rows.items():
        es = [r["E"] for r in runs]
        cells = [link, label, name] if several else [link, label]
        print(
            "| "
            + " | ".join(cells)
            + f" | {runs[0]['up_bytes']:,} + {runs[0]['down_bytes']:,} | {med([r['compute_ms'] for r in runs]):.1f} | "
            f"{med([r['floor_ms'] for r in runs]):.1f} | {med([r['step_ms'] for r in runs]):.1f} | {med(es):.3f} | "
            f"{min(es):.3f}-{max(es):.3f} |"
        )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--links", default=DEFAULT_LINKS, help=f"RTTms@RATE or loopback, comma-separated (default {DEFAULT_LINKS})"
    )
    parser.add_argument(
        "--cases",
        default="raw,int8,int8:4",
        help="ENCODING[:MICRO_BATCHES][+APPROXIMATION], comma-separated (default raw,int8,int8:4); APPROXIMATION: "
        "stale, local, topkF or stale/topkF (beyond exact: docs/performance.md, 'Beyond exact')",
    )
    parser.add_argument("--mode", choices=wanlink.MODES, default="packet", help="how the link delays (see wanlink)")
    parser.add_argument(
        "--congestion",
        default=None,
        help="the endpoints' TCP congestion control on each link's route, e.g. cubic, or several to compare, "
        "e.g. host,cubic (default: the host's; a link may name its own: 80ms@1gbit/cubic)",
    )
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run (after 3 of warm-up)")
    parser.add_argument("--rounds", type=int, default=1, help="repeat everything; medians are printed")
    parser.add_argument(
        "--floor-rounds", type=int, default=15, help="steps of the compute floor timed before and after each run"
    )
    parser.add_argument(
        "--grpc",
        action="append",
        help="a set of gRPC options for both server and client, NAME:key=value;key=value (repeat to compare; "
        "alternated within each case)",
    )
    parser.add_argument("--model", default="mnist-cnn")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--optimizer", default="sgd")
    parser.add_argument("--cpus", default=None, help="cores of every process (default: the first two)")
    parser.add_argument("--json", type=Path, default=None, help="also write every run's figures here")
    return parser.parse_args(argv)


if __name__ == "__main__":
    raise SystemExit(main())
