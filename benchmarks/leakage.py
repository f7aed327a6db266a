"""Leakage meters and defences, measured (issue 25): what a U-shaped run's server could tell of the labels from
the gradients it gets, and of the inputs from the IVs, with each label defence, NoPeek and IV noise, and what
each costs in test AUC and accuracy.

    PYTHONPATH=. python benchmarks/leakage.py                  # what docs/security.md shows (~2-3 min, 2 cores)
    PYTHONPATH=. python benchmarks/leakage.py --epochs 2 --timing-rounds 1 --plot ''   # a quick check
    PYTHONPATH=. python benchmarks/leakage.py --parts cost    # the meters' cost alone

The task: scikit-learn's bundled digits (no download), flattened to 64 values in [0, 1], as a binary and
imbalanced task, "is it a 0" (about 10% positives), split into train and test by `--seed` (stratified). The
geometry: the U-shaped cut, the client holding the labels and the head: bottom Dense(32, relu) | the server's
middle Dense(16, relu) | head Dense(1) (a logit), BinaryCrossentropy(from_logits=True), Adam 3e-3 on both sides,
batch 64. A real `SplitServer(cut="ushape")` and `SplitClient(head=...)` in this process over 127.0.0.1, as
tests/test_privacy.py runs them; a fresh server and seeded parts per run.

Each run's figures come from the client's own history (its meters on the gradients it sends the server:
`leak_norm_auc`, `leak_direction_auc`; on sampled batches' inputs and the IVs sent: `input_dcor`) and from
`client.predict` on the test set (test AUC with scikit-learn's `roc_auc_score`, accuracy at logit 0). Beside the
input meter (`leakage.unbiased_distance_correlation`, the bias-corrected R*): R* of the whole test set's inputs and
the IVs the trained bottom would send for them; the sample (biased) distance correlation of the same, averaged over
the test set's batches of 64 (the statistic NoPeek's loss uses, for comparison with its paper); and all three for
an IV independent of the input (R* about 0; the sample statistic well above 0 at a batch of 64). The meter cost:
the same undefended run with `leakage_meters` on and off, alternating, timed per step (the intervals between
`on_train_batch_end`, first epoch left out); the meters' own methods clocked in those runs; and the same work
timed alone.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from splitlearning import leakage  # noqa: E402
from splitlearning.label_defences import Kind, LabelDefence  # noqa: E402

INPUTS, CUT, MIDDLE = 64, 32, 16
BATCH = 64


@dataclass(frozen=True)
class Task:
    x_train: np.ndarray
    y_train: np.ndarray  # float32 (n, 1): 1.0 for a "0"
    x_test: np.ndarray
    y_test: np.ndarray


def load_task(seed: int, test_fraction: float = 0.25) -> Task:
    """The bundled digits as "is it a 0": flattened images in [0, 1], one float label per example."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32)
    y = (bunch.target == 0).astype(np.float32)[:, None]
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
    return Task(x_train, y_train, x_test, y_test)


def parts(seed: int) -> tuple[Any, Any, Any]:
    """(bottom, middle, head), built from `seed` alone."""
    import keras

    keras.utils.set_random_seed(seed)
    bottom = keras.Sequential([keras.Input((INPUTS,)), keras.layers.Dense(CUT, activation="relu")], name="bottom")
    middle = keras.Sequential([keras.Input((CUT,)), keras.layers.Dense(MIDDLE, activation="relu")], name="middle")
    head = keras.Sequential([keras.Input((MIDDLE,)), keras.layers.Dense(1)], name="head")
    return bottom, middle, head


@dataclass
class Case:
    """One run: a name for the tables, and what the client is given."""

    name: str
    label_defence: LabelDefence | None = None
    nopeek_alpha: float = 0.0
    noise: Any = None  # client_part.privacy.GaussianNoise
    leakage_meters: bool = True


@dataclass
class Result:
    case: Case
    history: dict[str, list[float]]
    test_auc: float
    test_accuracy: float
    test_dcor: float = float("nan")  # R*, the whole test set's inputs against the IVs it would send
    test_sample_dcor: float = float("nan")  # the sample (biased) dCor of the same, mean over batches of 64
    step_ms: list[float] = field(default_factory=list)  # intervals between steps, first epoch left out
    seconds: float = 0.0

    def last(self, key: str) -> float:
        values = self.history.get(key, [])
        return float(values[-1]) if values else float("nan")

    def mean(self, key: str) -> float:
        values = self.history.get(key, [])
        return float(np.mean(values)) if values else float("nan")


def run(case: Case, task: Task, args: argparse.Namespace) -> Result:
    """Train `case` for `args.epochs` over a real server on loopback; score the test set."""
    import keras
    from sklearn.metrics import roc_auc_score

    from client_part.client import SplitClient
    from server_part import SplitServer
    from splitlearning.models import make_optimizer

    bottom, middle, head = parts(args.seed)
    steps_per_epoch = -(-len(task.x_train) // BATCH)
    stamps: list[float] = []

    class StepClock(keras.callbacks.Callback):
        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            stamps.append(time.perf_counter())

    server = SplitServer(middle, optimizer=make_optimizer("adam", args.learning_rate), cut="ushape")
    target = f"127.0.0.1:{server.start('127.0.0.1:0')}"
    started = time.perf_counter()
    try:
        with SplitClient(
            bottom,
            make_optimizer("adam", args.learning_rate),
            target=target,
            connect_timeout=30,
            head=head,
            loss=keras.losses.BinaryCrossentropy(from_logits=True),
            label_defence=case.label_defence,
            nopeek_alpha=case.nopeek_alpha,
            noise=case.noise,
            leakage_meters=case.leakage_meters,
            leakage_samples=args.leakage_samples,
        ) as client:
            history = client.fit(
                task.x_train,
                task.y_train,
                batch_size=BATCH,
                epochs=args.epochs,
                shuffle=True,
                seed=args.seed,
                verbose=0,
                callbacks=[StepClock()],
            )
            logits = client.predict(task.x_test, batch_size=256).reshape(-1)
            iv = sent_iv(np.asarray(client.model(task.x_test)), case.noise, args.seed)
    finally:
        server.stop(grace=1.0)
    seconds = time.perf_counter() - started
    truth = task.y_test.reshape(-1)
    test_dcor, test_sample_dcor = test_set_dcor(task.x_test, iv)
    steady = np.diff(stamps[steps_per_epoch:]) * 1e3 if len(stamps) > steps_per_epoch + 1 else np.zeros(0)
    return Result(
        case,
        {key: [float(v) for v in values] for key, values in history.history.items()},
        float(roc_auc_score(truth, logits)),
        float(np.mean((logits > 0) == (truth > 0.5))),
        test_dcor,
        test_sample_dcor,
        [float(v) for v in steady],
        seconds,
    )


def sent_iv(iv: np.ndarray, noise: Any, seed: int) -> np.ndarray:
    """The IVs as a client with `noise` would send them (clipped and noised, as `NoisyLink` does)."""
    if noise is None:
        return iv
    from client_part.privacy import clip

    return clip(iv, noise.clip_norm) + np.random.default_rng(seed + 1).normal(0.0, noise.stddev, size=iv.shape)


def test_set_dcor(x: np.ndarray, iv: np.ndarray) -> tuple[float, float]:
    """R* (the meter's statistic) of all the rows of `x` and `iv`; and their sample (biased) distance correlation,
    the mean over consecutive batches of `BATCH` rows (a shorter last one left out)."""
    batches = range(0, len(x) - BATCH + 1, BATCH)
    sample = [leakage.distance_correlation(x[i : i + BATCH], iv[i : i + BATCH]) for i in batches]
    return leakage.unbiased_distance_correlation(x, iv), float(np.mean(sample))


def label_cases(seed: int) -> list[Case]:
    def defence(kind: Kind, strength: float = 0.0) -> LabelDefence:
        return LabelDefence(kind, strength, positive=1, seed=seed)

    return [
        Case("none"),
        *(Case(f"gaussian {s:g}", defence(Kind.GAUSSIAN, s)) for s in (1.0, 3.0, 10.0)),
        Case("max-norm", defence(Kind.MAX_NORM)),
        *(Case(f"marvell {s:g}", defence(Kind.MARVELL, s)) for s in (0.25, 1.0, 4.0)),
    ]


def input_cases(seed: int, clip_norm: float) -> list[Case]:
    from client_part.privacy import GaussianNoise

    return [
        *(Case(f"nopeek {alpha:g}", nopeek_alpha=alpha) for alpha in (0.0, 0.1, 0.5, 1.0, 3.0)),
        *(Case(f"IV noise C={clip_norm:.2g} s={s:g}", noise=GaussianNoise(clip_norm, s, seed)) for s in (0.05, 0.2)),
    ]


def typical_iv_norm(task: Task, seed: int) -> float:
    """The median per-example L2 norm of the untrained bottom's IV on the training set: the clipping norm."""
    bottom, _, _ = parts(seed)
    iv = np.asarray(bottom(task.x_train[:512]))
    return float(np.median(np.linalg.norm(iv, axis=1)))


@dataclass(frozen=True)
class Independent:
    """The input figures for an IV independent of the input (Gaussian, the cut's width)."""

    meter: float  # R*, the mean over as many training batches of 64 as the meter samples in a run
    test_dcor: float  # R* of the whole test set
    test_sample_dcor: float  # the sample (biased) dCor, mean over the test set's batches of 64


def independent_iv(task: Task, samples: int, seed: int) -> Independent:
    """What the input figures read for an IV that tells nothing of the input."""
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(samples):
        rows = rng.choice(len(task.x_train), BATCH, replace=False)
        values.append(leakage.unbiased_distance_correlation(task.x_train[rows], rng.normal(size=(BATCH, CUT))))
    test_dcor, test_sample_dcor = test_set_dcor(task.x_test, rng.normal(size=(len(task.x_test), CUT)))
    return Independent(float(np.mean(values)), test_dcor, test_sample_dcor)


# The meters' methods timed inside the runs (name in the table: class, method, per what).
CLOCKED = (
    ("label meter: norms and cosines of the gradients sent", leakage.LabelLeakMeter, "add", "step"),
    ("input meter: R* of a sampled batch", leakage.InputLeakMeter, "add", "step"),
    ("label meter: the epoch's two AUCs", leakage.LabelLeakMeter, "result", "epoch"),
)


@contextlib.contextmanager
def meter_clock(spent: dict[str, float]) -> Iterator[None]:
    """While open, the time spent in each of `CLOCKED`'s methods adds up in `spent` (seconds, by name)."""
    originals = [(cls, method, getattr(cls, method)) for _, cls, method, _ in CLOCKED]

    def clocked(name: str, original: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - start

        return call

    for (name, cls, method, _), (_, _, original) in zip(CLOCKED, originals, strict=True):
        setattr(cls, method, clocked(name, original))
    try:
        yield
    finally:
        for cls, method, original in originals:
            setattr(cls, method, original)


def meter_micro(seed: int, rows: int, repeats: int = 200) -> dict[str, float]:
    """The same work alone, in µs (median of `repeats`): one batch of this workload's shapes; the AUCs of an epoch
    of `rows` examples."""
    rng = np.random.default_rng(seed)
    gradients = rng.normal(size=(BATCH, MIDDLE)).astype(np.float32)
    labels = (rng.random((BATCH, 1)) < 0.1).astype(np.float32)
    labels[0] = 1.0
    inputs = rng.random((BATCH, INPUTS)).astype(np.float32)
    iv = rng.random((BATCH, CUT)).astype(np.float32)

    def timed(work: Any, repeats: int = repeats) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            work()
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e6

    label = leakage.LabelLeakMeter()
    input_meter = leakage.InputLeakMeter(samples=repeats)
    steps = -(-rows // BATCH)
    epoch = leakage.LabelLeakMeter()
    for _ in range(steps):
        epoch.add(rng.normal(size=(BATCH, MIDDLE)), (rng.random((BATCH, 1)) < 0.1).astype(np.float32))
    return dict(
        zip(
            [name for name, *_ in CLOCKED],
            [
                timed(lambda: label.add(gradients, labels)),
                timed(lambda: input_meter.add(inputs, iv)),
                timed(epoch.result, max(repeats // 10, 1)),
            ],
            strict=True,
        )
    )


def row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def label_table(results: list[Result]) -> list[str]:
    lines = [
        row(
            [
                "label defence",
                "norm AUC (last)",
                "direction AUC (last)",
                "norm AUC (mean)",
                "direction AUC (mean)",
                "test AUC",
                "test accuracy",
            ]
        ),
        row(["---", *["---:"] * 6]),
    ]
    for r in results:
        lines.append(
            row(
                [
                    r.case.name,
                    f"{r.last(leakage.NORM):.3f}",
                    f"{r.last(leakage.DIRECTION):.3f}",
                    f"{r.mean(leakage.NORM):.3f}",
                    f"{r.mean(leakage.DIRECTION):.3f}",
                    f"{r.test_auc:.4f}",
                    f"{r.test_accuracy:.3f}",
                ]
            )
        )
    return lines


def input_table(results: list[Result], independent: Independent) -> list[str]:
    lines = [
        row(
            [
                "input defence",
                "input_dcor, R* (last)",
                "input_dcor, R* (mean)",
                "test set, R*",
                "test set, sample dCor (biased)",
                "test AUC",
                "test accuracy",
            ]
        ),
        row(["---", *["---:"] * 6]),
    ]
    for r in results:
        lines.append(
            row(
                [
                    r.case.name,
                    f"{r.last(leakage.DCOR):.3f}",
                    f"{r.mean(leakage.DCOR):.3f}",
                    f"{r.test_dcor:.3f}",
                    f"{r.test_sample_dcor:.3f}",
                    f"{r.test_auc:.4f}",
                    f"{r.test_accuracy:.3f}",
                ]
            )
        )
    lines.append(
        row(
            [
                "(an IV independent of the input, Gaussian, 32 wide)",
                "",
                f"{independent.meter:.3f}",
                f"{independent.test_dcor:.3f}",
                f"{independent.test_sample_dcor:.3f}",
                "",
                "",
            ]
        )
    )
    return lines


def cost_table(
    on: list[Result], off: list[Result], spent: dict[str, float], micro: dict[str, float], epochs: int, steps: int
) -> list[str]:
    def ms(results: list[Result]) -> float:
        return statistics.median([v for r in results for v in r.step_ms])

    lines = [
        row(["meters", "rounds", "ms/step (median of each round)", "ms/step (median, all)"]),
        row(["---", "---:", "---", "---:"]),
    ]
    for name, results in (("on", on), ("off", off)):
        per_round = ", ".join(f"{statistics.median(r.step_ms):.2f}" for r in results)
        lines.append(row([name, str(len(results)), per_round, f"{ms(results):.2f}"]))
    lines.append(row(["difference (on - off)", "", "", f"{ms(on) - ms(off):+.2f}"]))
    lines += [
        "",
        row(["the meters' numpy work, batch 64", "alone, µs a call", "in the runs with meters on, ms"]),
        row(["---", "---:", "---:"]),
    ]
    for name, _, _, per in CLOCKED:
        count = epochs if per == "epoch" else steps
        lines.append(row([name, f"{micro[name]:.0f}", f"{spent.get(name, 0.0) * 1e3 / count:.3f} per {per}"]))
    return lines


def panel(
    axes: Any, names: list[str], bars: dict[str, tuple[list[float], str]], lines: dict[str, tuple[list[float], str]]
) -> Any:
    """Grouped bars per case on `axes` (name: values, colour), and `lines` on a twin axis; the twin returned."""
    positions = np.arange(len(names))
    width = 0.8 / len(bars)
    for k, (name, (values, colour)) in enumerate(bars.items()):
        axes.bar(positions + (k - (len(bars) - 1) / 2) * width, values, width, color=colour, alpha=0.75, label=name)
    axes.set_xticks(positions, names, rotation=30, ha="right", fontsize=7)
    lowest = min(v for values, _ in bars.values() for v in values)
    axes.set_ylim(min(0.0, lowest - 0.05), 1.05)  # R* may come out slightly negative
    twin = axes.twinx()
    for name, (values, colour) in lines.items():
        twin.plot(positions, values, "o-", color=colour, label=name, ms=4)
    low = min(v for values, _ in lines.values() for v in values)
    twin.set_ylim(min(0.98, low - 0.01), 1.001)
    return twin


def legend(axes: Any, twin: Any) -> None:
    handles = axes.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    axes.legend(
        handles, [h.get_label() for h in handles], fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=3
    )


def plot(label: list[Result], inputs: list[Result], independent: Independent, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.6), dpi=90)
    twin = panel(
        left,
        [r.case.name for r in label],
        {
            "norm attack AUC": ([r.last(leakage.NORM) for r in label], "tab:blue"),
            "direction attack AUC": ([r.last(leakage.DIRECTION) for r in label], "tab:red"),
        },
        {
            "test AUC": ([r.test_auc for r in label], "black"),
            "test accuracy": ([r.test_accuracy for r in label], "tab:green"),
        },
    )
    left.axhline(0.5, color="grey", lw=0.8, ls=":")
    left.set_ylabel("leak AUC, last epoch (0.5: a coin)")
    twin.set_ylabel("test AUC, test accuracy")
    left.set_title("Label leakage (U-shape): label defences", fontsize=10)
    legend(left, twin)

    twin = panel(
        right,
        [r.case.name.replace("IV noise ", "IV ") for r in inputs],
        {
            "input_dcor, R* (the meter, last epoch)": ([r.last(leakage.DCOR) for r in inputs], "tab:purple"),
            "R*, test set": ([r.test_dcor for r in inputs], "tab:orange"),
            "sample dCor (biased), test set": ([r.test_sample_dcor for r in inputs], "silver"),
        },
        {
            "test AUC": ([r.test_auc for r in inputs], "black"),
            "test accuracy": ([r.test_accuracy for r in inputs], "tab:green"),
        },
    )
    right.axhline(0.0, color="black", lw=0.6)
    right.axhline(independent.test_sample_dcor, color="grey", lw=0.8, ls=":", label="sample dCor of an independent IV")
    right.set_ylabel("distance correlation (input, IV)")
    twin.set_ylabel("test AUC, test accuracy")
    right.set_title("Input leakage: NoPeek alpha, IV noise", fontsize=10)
    legend(right, twin)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--leakage-samples", type=int, default=4, help="batches per epoch that give input_dcor")
    parser.add_argument("--timing-rounds", type=int, default=5, help="runs with the meters on and off, alternating")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--parts", default="label,input,cost", help="which of label, input, cost to run")
    parser.add_argument(
        "--plot", default=str(ROOT / "docs" / "leakage.png"), help="the PNG, with label and input ('' for none)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from splitlearning import tensorflow_setup

    tensorflow_setup.load(verbose=False)
    started = time.perf_counter()
    load_before = os.getloadavg()
    task = load_task(args.seed)

    def done(result: Result) -> Result:
        h = result.history
        print(
            f"{result.case.name:24} norm {h.get(leakage.NORM, [])}  direction {h.get(leakage.DIRECTION, [])}  "
            f"dcor {h.get(leakage.DCOR, [])}  test R* {result.test_dcor:.3f}  sample dcor "
            f"{result.test_sample_dcor:.3f}  test AUC {result.test_auc:.4f} "
            f"acc {result.test_accuracy:.3f} "
            f"({result.seconds:.0f} s)",
            file=sys.stderr,
        )
        return result

    parts = set(args.parts.split(","))
    label = [done(run(case, task, args)) for case in label_cases(args.seed)] if "label" in parts else []
    clip_norm = typical_iv_norm(task, args.seed)
    inputs = [done(run(case, task, args)) for case in input_cases(args.seed, clip_norm)] if "input" in parts else []
    independent = independent_iv(task, args.leakage_samples * args.epochs, args.seed)
    on: list[Result] = []
    off: list[Result] = []
    spent: dict[str, float] = {}
    for _ in range(args.timing_rounds if "cost" in parts else 0):
        with meter_clock(spent):
            on.append(done(run(Case("meters on"), task, args)))
        off.append(done(run(Case("meters off", leakage_meters=False), task, args)))

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load_after = os.getloadavg()
    positives = float(task.y_train.mean())
    print(
        f"{platform.processor() or platform.machine()}, {cores} cores, load average {load_before[0]:.1f} before, "
        f"{load_after[0]:.1f} after; digits 'is it a 0' ({len(task.x_train)} train, {len(task.x_test)} test, "
        f"{positives:.1%} positives), U-shape 64 | Dense(32, relu) | Dense(16, relu) | Dense(1), adam "
        f"{args.learning_rate:g}, batch {BATCH}, {args.epochs} epochs, seed {args.seed}; "
        f"{time.perf_counter() - started:.0f} s\n"
    )
    if label:
        print("\n".join(label_table(label)) + "\n")
    if inputs:
        print("\n".join(input_table(inputs, independent)) + "\n")
    if on:
        timed_epochs = args.epochs * args.timing_rounds
        timed_steps = timed_epochs * -(-len(task.x_train) // BATCH)
        micro = meter_micro(args.seed, len(task.x_train))
        print("\n".join(cost_table(on, off, spent, micro, timed_epochs, timed_steps)))
    if args.plot and label and inputs:
        plot(label, inputs, independent, Path(args.plot))
        print(f"\nwrote {args.plot} ({Path(args.plot).stat().st_size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
