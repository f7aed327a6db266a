"""Multi-client training: the group's test accuracy per round and the wall time per round, for SplitFed groups of
N = 2 and 4 members on IID and non-IID shards of the digits, against the uncut model trained on all the data.

    PYTHONPATH=. python benchmarks/multi_client.py        # what docs/performance.md shows (about 4 min, 2 cores)
    PYTHONPATH=. python benchmarks/multi_client.py --rounds 3 --configs splitfed:2:random --png ''   # a quick check

Each configuration is a real run, as data holders would start it: one `split-server --aggregator --members N`
process and N `split-client --group --shard K/N --shard-by BY` processes on this machine, each member on its own
shard of the digits' training split (`--validation-split 0`: a member trains on its whole shard), `--rounds R`
rounds of one local epoch, the members' `--history-json` collected. Configurations: `SCHEME:N[:BY]`, SCHEME
`splitfed` or `round-robin`, BY `random` (IID) or `label` (non-IID); `splitfed:1` is one client on all the data
(a group of one, `--member 1`, no shard), the cost of a round without a group.

Figures, per configuration:

- **the group's test accuracy after round r**: `start_test` of round r+1 (the round's start is the group's model
  after round r: averaged first and second parts), `final_test` after the last round; round 0 is the untrained
  start. Every member evaluates the same model on the same test split, so every member must report the same
  accuracy for each round (SplitFed: checked, and the run fails if not); round-robin has one member per turn, so
  only the final model is evaluated by all (checked too). A round-robin round is one turn of each member, its
  model the one the last turn of the round ends with.
- **wall time per round**: from the aggregator's log (the server's, at INFO, one line per close): the time from
  one round's close to the next (round-robin: from the close of one round's last turn to the next round's),
  which is the time a round takes the whole group (members' session set-up, evaluations, training, hand-in, the
  slowest member's waiting included). Round 1 starts at the first member's join, so it also holds the other
  members' start-up and TensorFlow's first tracing; the table gives it apart and the median over rounds 2..R.
- **member seconds**: each member's own time in a round (`seconds` of its round records: session set-up, the
  start's and the local model's evaluations on the test split, training, hand-in; no waiting), the mean over
  members and rounds 2..R.

The reference, **uncut**: `keras.Sequential([first part, second part])` of the same seeded pair, compiled with
the same optimizer and learning rate (the CLIs' defaults, adam 0.003), trained in this process on the whole
training split with the same batch size, one epoch per round in the order a split client draws (a permutation
seeded by (seed, epoch)), evaluated on the test split after each epoch. Its optimizer state carries over from
epoch to epoch; a SplitFed round starts each member with a fresh optimizer (docs/multi_client.md), so
`splitfed:1` differs from it by that alone.

Prints the machine, two markdown tables (accuracy per round; wall time per round) and writes a PNG (accuracy
against round, a line per configuration and the uncut model) and, with `--json`, the raw figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from splitlearning import subprocesses  # noqa: E402

DEFAULT_CONFIGS = (
    "splitfed:1,splitfed:2:random,splitfed:2:label,splitfed:4:random,splitfed:4:label,round-robin:2:random"
)
SCHEMES = ("splitfed", "round-robin")
START_TIMEOUT = 120.0
RUN_TIMEOUT = 1800.0
_LOG_TIME = "%Y-%m-%d %H:%M:%S,%f"


@dataclass(frozen=True)
class Config:
    """One group run: `members` processes training with `scheme` on shards cut `by` random or label."""

    scheme: str
    members: int
    by: str = "random"

    @classmethod
    def parse(cls, text: str) -> Config:
        parts = text.strip().split(":")
        if len(parts) not in (2, 3) or parts[0] not in SCHEMES or not parts[1].isdigit() or int(parts[1]) < 1:
            raise ValueError(f"expected SCHEME:N[:BY] with SCHEME in {', '.join(SCHEMES)} and N >= 1, got {text!r}")
        by = parts[2] if len(parts) == 3 else "random"
        if by not in ("random", "label"):
            raise ValueError(f"{text!r}: shards are cut by random or label, got {by!r}")
        return cls(parts[0], int(parts[1]), by)

    @property
    def name(self) -> str:
        if self.members == 1:
            return f"{self.scheme} N=1 (one client)"
        return f"{self.scheme} N={self.members} {'IID' if self.by == 'random' else 'non-IID'}"

    @property
    def turns(self) -> int:
        """Aggregator rounds (round-robin: turns) in one round of the group."""
        return self.members if self.scheme == "round-robin" else 1


@dataclass
class GroupRun:
    """The figures of one configuration."""

    config: Config
    name: str
    rounds: int
    samples: list[int]  # per member, per round
    accuracy: list[float]  # the group's test accuracy after round r, r = 0 (the start) .. rounds
    loss: list[float]
    members_agree: bool  # every member reported the same group accuracy and loss wherever several evaluated it
    spread: float  # the largest difference in test accuracy between members evaluating the same model
    round_seconds: list[float]  # wall time of round r = 1 .. rounds (the aggregator's closes)
    member_seconds: list[list[float]]  # per member: its `seconds` per round (round-robin: per turn)
    total_seconds: float  # from starting the server to the last member's exit
    retried: int  # rounds (turns) a member had to train again (a failed attempt: none expected here)
    histories: list[dict[str, Any]] = field(default_factory=list)

    @property
    def steady_round(self) -> float:
        later = self.round_seconds[1:] or self.round_seconds
        return statistics.median(later)

    @property
    def steady_member(self) -> float:
        """Each member's own seconds per round (round-robin: per turn), its first one left out."""
        later = [s for seconds in self.member_seconds for s in seconds[1:]]
        return statistics.fmean(later or [s for seconds in self.member_seconds for s in seconds])


@dataclass
class Uncut:
    accuracy: list[float]  # after epoch r, r = 0 (the start) .. rounds
    loss: list[float]
    epoch_seconds: list[float]  # `fit` of one epoch, per epoch
    samples: int  # the whole training split


# -- one group run -----------------------------------------------------------------------------------------------


def _env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "TF_CPP_MIN_LOG_LEVEL": "2"}


def _member_command(config: Config, k: int, target: str, args: argparse.Namespace, history: Path) -> list[str]:
    command = [sys.executable, "-m", "client_part", "--target", target, "--model", args.model]
    command += ["--group", "bench", "--scheme", config.scheme, "--rounds", str(args.rounds), "--local-epochs", "1"]
    command += ["--batch-size", str(args.batch_size), "--seed", str(args.seed), "--validation-split", "0"]
    command += ["--history-json", str(history), "--log-level", "WARNING"]
    if config.members == 1:
        return [*command, "--member", "1"]
    return [*command, "--shard", f"{k}/{config.members}", "--shard-by", config.by]


def run_group(config: Config, args: argparse.Namespace, work: Path) -> GroupRun:
    """Start the server with the aggregator and `config.members` members; wait for them; read their figures."""
    folder = work / f"{config.scheme}-{config.members}-{config.by}"
    folder.mkdir(parents=True)
    port_file, server_log = folder / "port", folder / "server.log"
    server_command = [sys.executable, "-m", "server_part", "--model", args.model, "--seed", str(args.seed)]
    server_command += ["--address", "127.0.0.1:0", "--port-file", str(port_file), "--aggregator"]
    server_command += ["--members", str(config.members), "--round-deadline", "0", "--log-format", "json"]
    started = time.perf_counter()
    members: list[subprocess.Popen[bytes]] = []
    with server_log.open("wb") as log_file:
        server = subprocess.Popen(server_command, env=_env(), cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while not (port_file.exists() and port_file.read_text().strip()):
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"split-server did not start: {_tail(server_log)}")
                time.sleep(0.05)
            target = f"127.0.0.1:{port_file.read_text().strip()}"
            for k in range(1, config.members + 1):
                command = _member_command(config, k, target, args, folder / f"member-{k}.json")
                with (folder / f"member-{k}.log").open("wb") as out:
                    members.append(subprocess.Popen(command, env=_env(), cwd=ROOT, stdout=out, stderr=out))
            deadline = time.monotonic() + RUN_TIMEOUT
            for k, member in enumerate(members, 1):
                if member.wait(timeout=max(1.0, deadline - time.monotonic())) != 0:
                    raise RuntimeError(f"{config.name}: member {k} failed: {_tail(folder / f'member-{k}.log')}")
            total = time.perf_counter() - started
        finally:
            for member in members:
                subprocesses.stop(member, timeout=10)
            subprocesses.stop(server, timeout=20)
    histories = [json.loads((folder / f"member-{k}.json").read_text()) for k in range(1, config.members + 1)]
    closes = _closes(server_log, config)
    return _figures(config, args.rounds, histories, closes, total)


def _tail(path: Path, chars: int = 2000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(no output)"


def _closes(server_log: Path, config: Config) -> list[tuple[datetime, float, int]]:
    """The aggregator's closes, in order: (when, its own seconds, members counted) per aggregator round."""
    closes = []
    for line in server_log.read_text(errors="replace").splitlines():
        if not line.startswith("{"):
            continue
        entry = json.loads(line)
        message = entry.get("message", "")
        if entry.get("logger") == "aggregator.rounds" and " closed " in message:
            if " closed with " not in message:
                raise RuntimeError(f"{config.name}: a round closed without a member: {message}")
            counted = int(message.split(" closed with ", 1)[1].split()[0])
            seconds = float(message.rsplit(" in ", 1)[1].split()[0])
            closes.append((datetime.strptime(entry["time"], _LOG_TIME), seconds, counted))
    return closes


def _figures(
    config: Config,
    rounds: int,
    histories: list[dict[str, Any]],
    closes: list[tuple[datetime, float, int]],
    total: float,
) -> GroupRun:
    """Accuracy and loss after each round, the members' agreement on them, and the times per round."""
    turns = config.turns
    if len(closes) != rounds * turns:
        raise RuntimeError(f"{config.name}: the aggregator closed {len(closes)} rounds, expected {rounds * turns}")
    expected_members = 1 if config.scheme == "round-robin" else config.members
    if any(counted != expected_members for _, _, counted in closes):
        raise RuntimeError(f"{config.name}: a round counted other than {expected_members} members: {closes}")
    # Who evaluated the group's model after round r (r = 0 .. rounds): the members starting aggregator round
    # r * turns (SplitFed: all; round-robin: the member whose turn it is), and all of them after the last.
    seen: list[list[dict[str, float]]] = [[] for _ in range(rounds + 1)]
    for history in histories:
        for record in history["rounds"]:
            if record["round"] % turns == 0:
                seen[record["round"] // turns].append(record["start_test"])
        seen[rounds].append(history["final_test"])
    if any(not evaluations for evaluations in seen):
        raise RuntimeError(f"{config.name}: no member evaluated the group's model after some round: {seen}")
    spread = max(max(e["accuracy"] for e in ev) - min(e["accuracy"] for e in ev) for ev in seen)
    agree = all(all(e == ev[0] for e in ev) for ev in seen)
    times = [when for when, _, _ in closes]
    # Round 1 from the first member's join (the aggregator's own count for its first close), then close to close.
    round_seconds = [closes[0][1] + (times[turns - 1] - times[0]).total_seconds()]
    round_seconds += [(times[r * turns - 1] - times[(r - 1) * turns - 1]).total_seconds() for r in range(2, rounds + 1)]
    return GroupRun(
        config=config,
        name=config.name,
        rounds=rounds,
        samples=[h["rounds"][0]["samples"] for h in histories],
        accuracy=[ev[0]["accuracy"] for ev in seen],
        loss=[ev[0]["loss"] for ev in seen],
        members_agree=agree,
        spread=spread,
        round_seconds=round_seconds,
        member_seconds=[[record["seconds"] for record in h["rounds"]] for h in histories],
        total_seconds=total,
        retried=sum(record.get("attempts", 1) - 1 for h in histories for record in h["rounds"]),
        histories=histories,
    )


# -- the uncut reference -----------------------------------------------------------------------------------------


def run_uncut(args: argparse.Namespace) -> Uncut:
    """The uncut pair in this process on all the training data: one epoch per round, test after each."""
    from splitlearning import tensorflow_setup

    tensorflow_setup.load(verbose=False)  # without TensorFlow's C++ start-up lines
    import keras

    from client_part.batches import epoch_order
    from splitlearning import data, models
    from splitlearning.models import BUILTIN

    pair = BUILTIN[args.model]
    dataset = data.load("digits", seed=args.seed)
    x, y = dataset.x_train, dataset.y_train
    model = keras.Sequential([pair.client(args.seed), pair.server(args.seed)])
    optimizer = models.make_optimizer("adam", args.learning_rate)
    model.compile(optimizer=optimizer, loss=pair.loss, metrics=["accuracy"], jit_compile=False)

    def test() -> dict[str, float]:
        return model.evaluate(dataset.x_test, dataset.y_test, batch_size=args.batch_size, return_dict=True, verbose=0)

    results, seconds = [test()], []
    for epoch in range(args.rounds):
        order = epoch_order(len(x), args.seed, epoch, shuffle=True)
        started = time.perf_counter()
        model.fit(x[order], y[order], batch_size=args.batch_size, epochs=1, shuffle=False, verbose=0)
        seconds.append(time.perf_counter() - started)
        results.append(test())
    return Uncut([r["accuracy"] for r in results], [r["loss"] for r in results], seconds, len(x))


# -- reporting ---------------------------------------------------------------------------------------------------


def machine() -> str:
    model = "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    return f"{os.cpu_count()} cores ({model}), {platform.machine()}, load average {load}"


def accuracy_table(runs: list[GroupRun], uncut: Uncut | None) -> str:
    names = [run.name for run in runs] + (["uncut, all data"] if uncut else [])
    lines = ["| round | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
    rounds = max([run.rounds for run in runs] + ([len(uncut.accuracy) - 1] if uncut else []))
    for r in range(rounds + 1):
        values = [run.accuracy[r] if r < len(run.accuracy) else None for run in runs]
        if uncut:
            values.append(uncut.accuracy[r] if r < len(uncut.accuracy) else None)
        cells = ["" if v is None else f"{v:.4f}" for v in values]
        lines.append(f"| {'start' if r == 0 else r} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def time_table(runs: list[GroupRun], uncut: Uncut | None) -> str:
    one = next((run for run in runs if run.config.members == 1 and run.config.scheme == "splitfed"), None)
    lines = [
        "| configuration | samples per member | round 1 s | rounds 2..R s, median (min-max) | vs one client "
        "| member s per round (turn) | whole run s | members agree |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in runs:
        later = run.round_seconds[1:] or run.round_seconds
        ratio = f"{run.steady_round / one.steady_round:.2f}" if one else ""
        samples = ", ".join(f"{s:,}" for s in sorted(set(run.samples)))
        agree = "yes" if run.members_agree else f"NO (spread {run.spread:.4f})"
        if run.config.scheme == "round-robin":
            agree += " (final model)"
        lines.append(
            f"| {run.name} | {samples} | {run.round_seconds[0]:.1f} | {run.steady_round:.2f} "
            f"({min(later):.2f}-{max(later):.2f}) | {ratio} | {run.steady_member:.2f} | {run.total_seconds:.0f} "
            f"| {agree} |"
        )
    if uncut:
        later = uncut.epoch_seconds[1:] or uncut.epoch_seconds
        lines.append(
            f"| uncut, all data (one `fit` epoch, in process) | {uncut.samples:,} | "
            f"{uncut.epoch_seconds[0]:.1f} | {statistics.median(later):.2f} ({min(later):.2f}-{max(later):.2f}) "
            "| | | | |"
        )
    return "\n".join(lines)


def plot(runs: list[GroupRun], uncut: Uncut | None, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    figure, axis = plt.subplots(figsize=(9, 4.2))
    for run in runs:
        style = "--" if run.config.by == "label" else "-"
        marker = "s" if run.config.scheme == "round-robin" else "o"
        axis.plot(range(len(run.accuracy)), run.accuracy, style, marker=marker, markersize=3, label=run.name)
    if uncut:
        axis.plot(range(len(uncut.accuracy)), uncut.accuracy, ":", color="black", linewidth=2, label="uncut, all data")
    axis.set_xlabel("round (uncut: epoch)")
    axis.set_ylabel("test accuracy (the group's model)")
    axis.set_title(title, fontsize=9)
    axis.set_ylim(0, 1)
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))  # beside the lines, not on them
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    plt.close(figure)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="multi_client", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--configs", default=DEFAULT_CONFIGS, help=f"SCHEME:N[:BY], comma-separated ({DEFAULT_CONFIGS})"
    )
    parser.add_argument("--rounds", type=int, default=10, help="rounds per group, epochs of the uncut model")
    parser.add_argument("--model", default="digits-cnn", help="built-in digits pair: digits-cnn or digits-mlp")
    parser.add_argument("--batch-size", type=int, default=64, help="the clients' default")
    parser.add_argument("--learning-rate", type=float, default=0.003, help="adam's, as the CLIs' default")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-uncut", action="store_true", help="skip the uncut reference")
    parser.add_argument("--png", default=str(ROOT / "docs" / "multi_client_accuracy.png"), help="'' for none")
    parser.add_argument("--json", default=None, help="write the raw figures here")
    parser.add_argument("--from-json", default=None, help="print the tables and draw the PNG of an earlier --json")
    parser.add_argument("--keep", default=None, help="keep the processes' logs and histories in this folder")
    args = parser.parse_args(argv)
    try:
        args.configs = [Config.parse(text) for text in args.configs.split(",") if text.strip()]
    except ValueError as error:
        parser.error(f"--configs: {error}")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return args


def _title(model: str, rounds: int, batch_size: int) -> str:
    return f"{model}, digits, {rounds} rounds of 1 local epoch, batch {batch_size}, adam"


def show(runs: list[GroupRun], uncut: Uncut | None, title: str, png: str) -> None:
    """Print the two tables; draw the PNG unless `png` is ''."""
    print(accuracy_table(runs, uncut))
    print()
    print(time_table(runs, uncut))
    if png:
        plot(runs, uncut, Path(png), title)
        print(f"\nwrote {png}")


def replay(path: Path, png: str) -> int:
    """The tables and the PNG of an earlier run's `--json`, without running anything."""
    saved = json.loads(path.read_text())
    runs = [GroupRun(**{**run, "config": Config(**run["config"])}) for run in saved["runs"]]
    uncut = Uncut(**saved["uncut"]) if saved["uncut"] else None
    settings = saved["settings"]
    print(f"{path}: {' '.join(saved['command'])}, {saved['seconds']:.0f} s; machine {saved['machine']}\n")
    show(runs, uncut, _title(settings["model"], settings["rounds"], settings["batch_size"]), png)
    return 0 if all(run.members_agree for run in runs) else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        return replay(Path(args.from_json), args.png)
    begun, at_start = time.perf_counter(), machine()
    print(f"machine: {at_start}", flush=True)
    runs: list[GroupRun] = []
    with tempfile.TemporaryDirectory(prefix="multi-client-") as scratch:
        work = Path(args.keep) if args.keep else Path(scratch)
        for config in args.configs:
            run = run_group(config, args, work)
            agree = "all members agree" if run.members_agree else f"MEMBERS DISAGREE (spread {run.spread:.4f})"
            if run.retried:
                agree += f"; {run.retried} round(s) trained again after a failed attempt"
            print(
                f"{run.name}: accuracy {' '.join(f'{a:.3f}' for a in run.accuracy)}; round 1 "
                f"{run.round_seconds[0]:.1f} s, then {run.steady_round:.2f} s a round; {agree}; "
                f"{run.total_seconds:.0f} s in all",
                flush=True,
            )
            runs.append(run)
    uncut = None if args.no_uncut else run_uncut(args)
    if uncut:
        print(f"uncut: accuracy {' '.join(f'{a:.3f}' for a in uncut.accuracy)}", flush=True)
    elapsed = time.perf_counter() - begun
    title = _title(args.model, args.rounds, args.batch_size)
    print(f"\n{title}; machine at the end: {machine()}; {elapsed:.0f} s in all\n")
    show(runs, uncut, title, args.png)
    if args.json:
        report = {
            "command": [Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])],
            "machine": {"at_start": at_start, "at_end": machine()},
            "settings": {
                k: v for k, v in vars(args).items() if k not in ("configs", "json", "png", "keep", "from_json")
            },
            "seconds": elapsed,
            "runs": [{**asdict(run), "config": asdict(run.config)} for run in runs],
            "uncut": asdict(uncut) if uncut else None,
        }
        Path(args.json).write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json}")
    if not all(run.members_agree for run in runs):
        print("members disagreed on the group's accuracy (see the table): a bug", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
