"""Benchmark: vertical split learning's step throughput (a `LabelParty` and k `split-feature-party` processes over
gRPC on loopback) against the uncut model on the joined table, in the same run on the same machine.

    PYTHONPATH=. python benchmarks/vertical.py                                 # 1, 2 and 4 parties, batch 256 and 64
    PYTHONPATH=. python benchmarks/vertical.py --parties 2 --batch-sizes 256   # one case

Data: a synthetic table of `--rows` people (default 8,192), `--features` float columns per feature party
(default 16) and `--classes` labels (default 10, from a random linear map of all the columns, so the task is
learnable). Every party holds every id, each in an order of its own, so the alignment (the private set
intersection) keeps all of them. The first run of each party count aligns by PSI and its time is printed; the
later runs of as many parties (the other batch sizes) resume that alignment from their state folders, as a
restarted party does (benchmarks/psi.py measures the alignment on its own: docs/vertical.md, "Measured").

Models, as the CLIs build them: each feature party `models.dense_bottom(features, cut_width, hidden)`, the label
party `models.dense_top(hidden, classes)` over the concatenated IVs (no columns of its own), Adam everywhere.
For each (batch, k), in this order:

- **uncut**: one functional Keras model (an Input per party, the same bottoms, Concatenate, the top), trained by
  one compiled custom step (`splitlearning.compiled.Compiled`: forward, loss, gradient, Adam's update, accuracy;
  no `fit` loop) with the split's batch order and sizes (`splitlearning.batch_order.BatchOrder` over the rows in
  id order; the split's aligned order is the PSI's own draw, so its batches hold other people, in the same
  shapes), in this process;
- **in-process parts**: the parts' own compiled steps joined in this process with no gRPC: k bottoms in one
  compiled call that hands its IVs through `tf.numpy_function` to a `FuseTrainer` (the label party's math,
  deferred XLA update included) and back-propagates the returned dLoss/dIV (as tests/vertical_support.py);
- **split**: a `LabelParty` serving in this process (its gRPC server's threads run its steps) and one
  `python -m feature_party` process per feature party (several cannot share a process: each blocks a
  TensorFlow inter-op thread while it waits for its gradient), `--test-fraction 0` so no evaluation runs, each
  party with a `--state-dir` of the run's own and no checkpoints but the first and the last (untimed).

Every rate is steady state: the first epoch (tracing, XLA compilation, the processes' start) is not timed. The
split's clock runs from the end of epoch 1 to the end of the last (the label party's `on_epoch`), over at least
`--timed-steps` steps, epoch starts included (every party derives the epoch's batch order then); the floors get
their batches' rows before the clock starts and time the same steps three times over, the median pass counting.
Prints a markdown table row per case, the split's per-step breakdown at the label party (its own compute under
the coordinator's lock, of which the previous step's deferred update; how far apart the k parties' IVs of a
step arrived, the meeting's wait for the slowest; the rest: the feature parties' own work and the round trip;
the extra time of an epoch's first step; the cores busy with this run's processes and with other work, and
idle, during the timed steps, from /proc on Linux) and the alignment's time.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from splitlearning import tensorflow_setup  # noqa: E402

tensorflow_setup.load(verbose=False)

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from label_party.coordinator import ALIGNMENT_FILE, EpochRecord  # noqa: E402
from label_party.party import LabelParty  # noqa: E402
from splitlearning import codec, models  # noqa: E402
from splitlearning.batch_order import BatchOrder  # noqa: E402
from splitlearning.compiled import Compiled  # noqa: E402
from splitlearning.contract import Spec  # noqa: E402
from splitlearning.training.vertical import FuseTrainer  # noqa: E402
from splitlearning.v1 import split_learning_pb2 as pb  # noqa: E402

OPTIMIZER = "adam"
ALIGNED = re.compile(r"aligned (\d+) of its (\d+) ids with the label party's (\d+) in ([0-9.]+) s")
_START_TIMEOUT = 240.0
FLOOR_PASSES = 3  # the floors are cheap: their median pass, against the bursts of a shared machine


@dataclass(frozen=True)
class Setup:
    rows: int
    features: int
    classes: int
    hidden: int
    cut_width: int
    learning_rate: float
    seed: int
    timed_steps: int

    def order(self, batch: int) -> BatchOrder:
        """The run's batches: one untimed epoch, then enough epochs for `timed_steps` timed steps."""
        per_epoch = math.ceil(self.rows / batch)
        return BatchOrder(self.rows, 0, batch, 1 + math.ceil(self.timed_steps / per_epoch), self.seed)

    def bottom(self, index: int) -> keras.Model:
        """Feature party `index`'s bottom, as `split-feature-party --name party_<index> --init-seed <index>`."""
        return models.dense_bottom(self.features, self.cut_width, self.hidden, index, f"party_{index}")

    def top(self) -> keras.Model:
        """The label party's top, as `split-label-party --seed <seed>` builds it."""
        return models.dense_top(self.hidden, self.classes, self.seed + 200)

    def loss(self) -> keras.losses.Loss:
        return keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def optimizer(self) -> keras.optimizers.Optimizer:
        return models.make_optimizer(OPTIMIZER, self.learning_rate)


@dataclass(frozen=True)
class Table:
    """The joined table in the aligned order (row r is id r at every party) and each party's own file."""

    xs: list[np.ndarray]
    y: np.ndarray
    label_ids: np.ndarray  # the label party's rows: its own order of the ids
    files: list[Path]  # feature party i's .npz (ids, x), its rows in an order of its own


def make_table(setup: Setup, parties: int, folder: Path) -> Table:
    rng = np.random.default_rng(setup.seed)
    xs = [rng.normal(size=(setup.rows, setup.features)).astype(np.float32) for _ in range(parties)]
    mix = rng.normal(size=(parties * setup.features, setup.classes)).astype(np.float32)
    y = np.argmax(np.concatenate(xs, axis=1) @ mix, axis=1).astype(np.int64)
    files = []
    for index, x in enumerate(xs):
        order = rng.permutation(setup.rows)
        path = folder / f"party_{index}.npz"
        np.savez(path, ids=order.astype(np.int64), x=x[order])
        files.append(path)
    return Table(xs, y, rng.permutation(setup.rows).astype(np.int64), files)


def timed_steps(order: BatchOrder, step: Callable[[np.ndarray], object], passes: int = FLOOR_PASSES) -> float:
    """Run epoch 1 of `order` untimed, then its other steps `passes` times over (each step given its rows, all
    derived before the clock starts); the median over the passes of the seconds per step."""
    batches = [order.train_rows_of(s) for s in range(order.total_steps)]
    for rows in batches[: order.steps_per_epoch]:
        step(rows)
    timed = batches[order.steps_per_epoch :]
    seconds = []
    for _ in range(passes):
        started = time.perf_counter()
        for rows in timed:
            step(rows)
        seconds.append((time.perf_counter() - started) / len(timed))
    return statistics.median(seconds)


# -- the floors, in this process --------------------------------------------------------------------------


def uncut_seconds(setup: Setup, table: Table, parties: int, order: BatchOrder) -> float:
    """Seconds per step of the uncut functional model, one compiled custom step per batch."""
    inputs = [keras.Input((setup.features,), name=f"x_{i}") for i in range(parties)]
    parts = [setup.bottom(i)(x) for i, x in enumerate(inputs)]
    fused = parts[0] if parties == 1 else keras.layers.Concatenate(axis=-1, name="fuse")(parts)
    model = keras.Model(inputs, setup.top()(fused), name="uncut")
    loss_fn, optimizer = setup.loss(), setup.optimizer()
    accuracy = keras.metrics.SparseCategoricalAccuracy()
    weights = model.trainable_variables
    optimizer.build(weights)

    def train_step(*tensors: tf.Tensor) -> tf.Tensor:
        *xs, labels = tensors
        with tf.GradientTape() as tape:
            logits = model(list(xs), training=True)
            loss = loss_fn(labels, logits)
        optimizer.apply(tape.gradient(loss, weights), weights)
        accuracy.update_state(labels, logits)
        return loss

    signature = [tf.TensorSpec([None, setup.features], tf.float32)] * parties + [tf.TensorSpec([None], tf.int64)]
    compiled = Compiled(train_step, input_signature=signature)
    xs = table.xs[:parties]

    def step(rows: np.ndarray) -> object:
        return compiled(*[x[rows] for x in xs], table.y[rows])

    return timed_steps(order, step)


class InProcessParts:
    """k feature parties' steps in one compiled call, exchanging with a `FuseTrainer` through numpy: each
    party's forward under its own tape, the IVs out through `tf.numpy_function`, dLoss/dIV back,
    `tape.gradient(iv, weights, output_gradients=g)` and each party's own optimizer (ClientTrainer's step, k
    at once: one process cannot run k `ClientTrainer`s that wait for each other)."""

    def __init__(self, setup: Setup, parties: int) -> None:
        self.bottoms = [setup.bottom(i) for i in range(parties)]
        self.optimizers = [setup.optimizer() for _ in range(parties)]
        for bottom, optimizer in zip(self.bottoms, self.optimizers, strict=True):
            optimizer.build(bottom.trainable_variables)
        spec = Spec((setup.cut_width,), np.dtype("float32"))
        self.label_party = FuseTrainer(
            setup.top(), setup.loss(), setup.optimizer(), ["accuracy"], iv_specs=[spec] * parties
        )
        self._labels = np.zeros((0,), np.int64)
        signature = [tf.TensorSpec([None, setup.features], tf.float32)] * parties
        self._step = Compiled(self._train_step, input_signature=signature)

    def train(self, xs: Sequence[np.ndarray], labels: np.ndarray) -> None:
        self._labels = labels
        self._step(*xs)

    def _exchange(self, *ivs: np.ndarray) -> list[np.ndarray]:
        grads, _ = self.label_party.train(list(ivs), self._labels)
        return grads

    def _train_step(self, *xs: tf.Tensor) -> None:
        tapes, ivs = [], []
        for bottom, x in zip(self.bottoms, xs, strict=True):
            with tf.GradientTape() as tape:
                ivs.append(bottom(x, training=True))
            tapes.append(tape)
        grads_iv = tf.numpy_function(self._exchange, ivs, Tout=[iv.dtype for iv in ivs], stateful=True)
        for tape, bottom, optimizer, iv, grad in zip(tapes, self.bottoms, self.optimizers, ivs, grads_iv, strict=True):
            weights = bottom.trainable_variables
            optimizer.apply(tape.gradient(iv, weights, output_gradients=tf.ensure_shape(grad, iv.shape)), weights)


def in_process_seconds(setup: Setup, table: Table, parties: int, order: BatchOrder) -> float:
    joined = InProcessParts(setup, parties)
    xs = table.xs[:parties]

    def step(rows: np.ndarray) -> None:
        joined.train([x[rows] for x in xs], table.y[rows])

    seconds = timed_steps(order, step)
    joined.label_party.settle()
    return seconds


# -- the split, over gRPC ---------------------------------------------------------------------------------


@dataclass
class SplitRun:
    seconds_per_step: float
    # The alignment's time, where this run aligned (None: it resumed an earlier run's alignment).
    blinding: float | None  # the label party's own ids, before it serves
    aligning: float | None  # the slowest feature party's align(): its hashing, the exchange, the wait for the others
    timers: LabelTimers
    cpu: dict[str, float] | None  # cores busy during the timed steps: this run's processes, others; idle


@dataclass(frozen=True)
class CpuSample:
    """The machine's CPU time (Linux /proc/stat: busy and idle, all cores) and that of some processes, in clock
    ticks, at one moment: two samples say how many cores this run's processes kept busy between them, how many
    other work did, and how many idled (steal, time the hypervisor gave to other machines, counts as neither)."""

    wall: float
    busy: int
    idle: int
    ours: int

    @classmethod
    def take(cls, pids: Sequence[int]) -> CpuSample | None:
        try:
            fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
            ours = 0
            for pid in pids:
                after_name = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                ours += int(after_name[11]) + int(after_name[12])  # utime, stime
        except (OSError, ValueError, IndexError):
            return None  # not Linux, or a process gone
        user, nice, system, idle, iowait, irq, softirq = fields
        return cls(time.perf_counter(), user + nice + system + irq + softirq, idle + iowait, ours)

    @staticmethod
    def usage(samples: Sequence[CpuSample | None]) -> dict[str, float] | None:
        first, last = samples if len(samples) == 2 else (None, None)
        if first is None or last is None:
            return None
        seconds = (last.wall - first.wall) * os.sysconf("SC_CLK_TCK")
        ours = (last.ours - first.ours) / seconds
        return {
            "ours": ours,
            "others": max(0.0, (last.busy - first.busy) / seconds - ours),
            "idle": (last.idle - first.idle) / seconds,
        }


@dataclass
class LabelTimers:
    """The label party's steps timed from outside (as benchmarks/roles.py times the server): when each IV of a
    step arrives (before the coordinator's lock), how long the step's own computation takes (under it), of which
    the previous step's deferred update, and when each step's gradients were ready."""

    arrivals: dict[int, list[float]] = field(default_factory=lambda: defaultdict(list))
    compute: dict[int, float] = field(default_factory=dict)
    ready: dict[int, float] = field(default_factory=dict)
    updates: list[float] = field(default_factory=list)

    def install(self, label: LabelParty) -> None:
        coordinator = label.coordinator
        step, run_step, make_trainer = coordinator.step, coordinator._run_step, coordinator._make_trainer
        lock = threading.Lock()

        def timed_step(ticket: str, number: int, iv: np.ndarray) -> np.ndarray:
            arrived = time.perf_counter()
            with lock:
                self.arrivals[number].append(arrived)
            return step(ticket, number, iv)

        def timed_run_step(meeting: Any, order: BatchOrder) -> None:
            started = time.perf_counter()
            try:
                run_step(meeting, order)
            finally:
                self.ready[meeting.key] = ended = time.perf_counter()
                self.compute[meeting.key] = ended - started

        def timed_trainer(specs: list[Spec]) -> FuseTrainer:
            trainer = make_trainer(specs)
            settle = trainer.settle

            def timed_settle() -> bool:
                started = time.perf_counter()
                applied = settle()
                if applied:
                    self.updates.append(time.perf_counter() - started)
                return applied

            setattr(trainer, "settle", timed_settle)  # noqa: B010 - an instance's method, replaced from outside
            return trainer

        setattr(coordinator, "step", timed_step)  # noqa: B010
        setattr(coordinator, "_run_step", timed_run_step)  # noqa: B010
        setattr(coordinator, "_make_trainer", timed_trainer)  # noqa: B010

    def breakdown(self, order: BatchOrder) -> dict[str, float]:
        """Medians over the timed steps, in ms: the label party's compute and its update, the spread of the IVs'
        arrivals (first to last: the meeting's wait for the slowest party), and how much longer a step that
        starts an epoch takes than the others (every party derives the epoch's batch order then)."""
        timed = range(order.steps_per_epoch, order.total_steps)
        gaps = {s: self.ready[s] - self.ready[s - 1] for s in timed}
        firsts = [gaps[s] for s in timed if s % order.steps_per_epoch == 0]
        others = [gaps[s] for s in timed if s % order.steps_per_epoch]
        return {
            "compute": 1e3 * statistics.median(self.compute[s] for s in timed),
            "update": 1e3 * statistics.median(self.updates[order.steps_per_epoch :]),
            "spread": 1e3 * statistics.median(max(self.arrivals[s]) - min(self.arrivals[s]) for s in timed),
            "epoch_start": 1e3 * (statistics.median(firsts) - statistics.median(others)) if firsts else math.nan,
        }


def split_run(
    setup: Setup, table: Table, parties: int, order: BatchOrder, folder: Path, alignments: dict[int, Path]
) -> SplitRun:
    """One split run. Every party keeps its state under a folder of this run's own (--state-dir, no checkpoints
    but the first and the last); the first run of `parties` aligns by PSI and leaves its folder in `alignments`,
    later runs of as many parties start from its alignment files (as a restarted party resumes), skipping it."""
    names = [f"party_{i}" for i in range(parties)]
    state = folder / f"state-{parties}-{order.batch_size}"
    aligned = alignments.get(parties)
    for name in ["label", *names]:
        (state / name).mkdir(parents=True)
        if aligned is not None:
            shutil.copyfile(aligned / name / ALIGNMENT_FILE, state / name / ALIGNMENT_FILE)
    epoch_ends: list[float] = []
    processes: list[subprocess.Popen[bytes]] = []
    cpu: list[CpuSample | None] = []

    def on_epoch(record: EpochRecord) -> None:
        epoch_ends.append(time.perf_counter())
        if record.epoch in (0, order.epochs - 1):
            cpu.append(CpuSample.take([os.getpid(), *(p.pid for p in processes)]))

    label = LabelParty(
        setup.top,
        setup.loss(),
        setup.optimizer(),
        ["accuracy"],
        parties=names,
        ids=table.label_ids.tolist(),
        y=table.y[table.label_ids],
        batch_size=order.batch_size,
        epochs=order.epochs,
        seed=setup.seed,
        test_fraction=0.0,
        deadline=120.0,
        state_dir=state / "label",
        on_epoch=on_epoch,
    )
    timers = LabelTimers()
    timers.install(label)
    started = time.perf_counter()
    port = label.start()
    blinding = time.perf_counter() - started
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    logs = [folder / f"{name}-{parties}-{order.batch_size}.log" for name in names]
    try:
        for index, name in enumerate(names):
            command = [
                *(sys.executable, "-m", "feature_party", "--name", name, "--data", str(table.files[index])),
                *("--server", f"127.0.0.1:{port}", "--hidden", str(setup.hidden), "--cut-width", str(setup.cut_width)),
                *("--init-seed", str(index), "--optimizer", OPTIMIZER, "--learning-rate", str(setup.learning_rate)),
                *("--state-dir", str(state / name), "--checkpoint-every", "0"),
            ]
            with logs[index].open("w") as log_file:
                processes.append(subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + _START_TIMEOUT + order.total_steps
        while not label.wait(1.0):
            failed = [p for p in processes if p.poll() not in (None, 0)]
            if failed or time.monotonic() > deadline:
                tails = "\n".join(path.read_text()[-2000:] for path in logs)
                raise SystemExit(f"the split run with {parties} parties did not finish:\n{tails}")
        for process in processes:
            process.wait(timeout=60)
    finally:
        label.stop()
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    seconds = (epoch_ends[-1] - epoch_ends[0]) / (order.total_steps - order.steps_per_epoch)
    if aligned is not None:
        return SplitRun(seconds, None, None, timers, CpuSample.usage(cpu))
    aligning = [float(m.group(4)) for path in logs for m in ALIGNED.finditer(path.read_text())]
    if len(aligning) != parties:
        raise SystemExit(f"expected {parties} alignment log lines, found {len(aligning)}: see {folder}")
    alignments[parties] = state
    return SplitRun(seconds, blinding, max(aligning), timers, CpuSample.usage(cpu))


def wire_bytes(setup: Setup, batch: int) -> int:
    """One feature party's Step call at `batch`: the request (ticket, step, IV) and the reply (the gradient),
    as protobuf bytes."""
    values = np.zeros((batch, setup.cut_width), np.float32)
    request = pb.VerticalStepRequest(ticket="0" * 32, step=100, iv=codec.to_proto(values))
    reply = pb.VerticalStepResponse(step=100, gradient=codec.to_proto(values))
    return request.ByteSize() + reply.ByteSize()


def _cores(cpu: dict[str, float] | None) -> str:
    return "" if cpu is None else f"{cpu['ours']:.2f} / {cpu['others']:.2f}, {cpu['idle']:.2f}"


def _rate(batch: int, seconds: float | None) -> str:
    return "" if seconds is None else f"{batch / seconds:,.0f}"


def _ms(seconds: float | None) -> str:
    return "" if seconds is None else f"{1e3 * seconds:.2f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parties", type=int, nargs="+", default=[1, 2, 4], help="feature party counts")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 64])
    parser.add_argument("--rows", type=int, default=8192, help="aligned rows (every party holds every id)")
    parser.add_argument("--features", type=int, default=16, help="columns per feature party")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--hidden", type=int, default=32, help="the bottoms' and the top's hidden width")
    parser.add_argument("--cut-width", type=int, default=16, help="each feature party's IV width")
    parser.add_argument("--timed-steps", type=int, default=256, help="at least this many steps timed per run")
    parser.add_argument("--no-in-process", action="store_true", help="skip the in-process parts' floor")
    args = parser.parse_args()
    setup = Setup(
        args.rows, args.features, args.classes, args.hidden, args.cut_width, 3e-3, 0, max(1, args.timed_steps)
    )
    began = time.perf_counter()
    print(
        f"{platform.machine()}, {os.cpu_count()} cores, TensorFlow {tf.__version__}; load average at start "
        f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}"
    )
    print(
        f"{setup.rows:,} aligned rows; each feature party {setup.features} columns -> Dense({setup.hidden}) -> IV "
        f"of {setup.cut_width}; top Dense({setup.hidden}) -> {setup.classes} classes; {OPTIMIZER}\n"
    )
    rows, steps, notes = [], [], []
    with tempfile.TemporaryDirectory(prefix="vertical-bench-") as name:
        folder = Path(name)
        table = make_table(setup, max(args.parties), folder)
        alignments: dict[int, Path] = {}
        for batch in args.batch_sizes:
            order = setup.order(batch)
            for parties in args.parties:
                uncut = uncut_seconds(setup, table, parties, order)
                inproc = None if args.no_in_process else in_process_seconds(setup, table, parties, order)
                split = split_run(setup, table, parties, order, folder, alignments)
                wire = wire_bytes(setup, batch)
                each = split.seconds_per_step
                rows.append(
                    f"| {parties} | {batch} | {batch / uncut:,.0f} | {_rate(batch, inproc)} | {batch / each:,.0f} "
                    f"| {uncut / each:.2f} | {1e3 * uncut:.2f} | {_ms(inproc)} | {1e3 * each:.2f} "
                    f"| {wire:,} ({parties * wire:,}) |"
                )
                parts = split.timers.breakdown(order)
                rest = 1e3 * each - parts["compute"] - parts["spread"]
                steps.append(
                    f"| {parties} | {batch} | {1e3 * each:.2f} | {parts['compute']:.2f} | {parts['update']:.2f} "
                    f"| {parts['spread']:.2f} | {rest:.2f} | {parts['epoch_start']:.1f} | {_cores(split.cpu)} "
                    f"| {order.total_steps - order.steps_per_epoch} |"
                )
                if split.blinding is not None and split.aligning is not None:
                    notes.append(f"| {parties} | {split.blinding:.1f} | {split.aligning:.1f} |")
                print(rows[-1], flush=True)
    print(
        "\n| parties | batch | uncut samples/s | in-process parts samples/s | split samples/s | split / uncut "
        "| uncut ms/step | in-process ms/step | split ms/step | wire bytes/step per party (all parties) |\n"
        f"|{' --- |' * 10}"
    )
    print("\n".join(rows))
    print(
        "\nWhere a split step goes, at the label party (medians, ms): its compute under the coordinator's lock (the "
        "previous step's deferred update included), the spread of the k IVs' arrivals, the rest (the feature "
        "parties' own steps and the round trip), and the extra time of a step that starts an epoch; then the cores "
        "this run's processes kept busy during the timed steps, those other work on the machine did, and those "
        "that idled (of os.cpu_count()).\n\n"
        "| parties | batch | split ms/step | label party compute | of which the update | IV arrival spread "
        f"| rest | epoch start extra | cores busy: ours / others, idle | timed steps |\n|{' --- |' * 10}"
    )
    print("\n".join(steps))
    print(
        f"\nAlignment of {setup.rows:,} ids, by the first run of each party count (the later ones resume it; every "
        "party holds every id; benchmarks/psi.py measures it alone):\n\n"
        f"| parties | label party blinding s (before serving) | slowest feature party's align() s |\n|{' --- |' * 3}"
    )
    print("\n".join(notes))
    print(
        f"\nload average at end {' '.join(f'{v:.2f}' for v in os.getloadavg())}; "
        f"whole run {time.perf_counter() - began:.0f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
