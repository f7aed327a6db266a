"""Beyond exact, measured: what each approximation costs in accuracy against the exact split on the same data.

    PYTHONPATH=. python benchmarks/approximations.py             # what docs/performance.md shows (~3-4 min)
    PYTHONPATH=. python benchmarks/approximations.py --epochs 2 --seeds 0 --plot ''   # a quick check

The task: scikit-learn's bundled digits (no download), 10 classes, flattened to 64 values in [0, 1], split into
train and test (25%, stratified) by the seed. The model: bottom Dense(64, relu) -> Dense(32, relu) (the cut) |
the server's Dense(32, relu) -> Dense(10) (logits), SparseCategoricalCrossentropy(from_logits=True), Adam 1e-3
on both sides, batch 32. Each configuration trains a real `SplitServer` and `SplitClient` in this process over
127.0.0.1 from the same seeded weights and batch order as the exact run; the test set is scored after every
epoch (`validation_data`, the split model through the server, as `fit` does it).

Configurations: exact; stale gradients; the local loss (its default head: Flatten + Dense(10)); top-k 0.25 and
0.1 (the IV plain, the gradient with error feedback). Per configuration and seed: the final test accuracy and loss, the
bytes per step each way (the client's meter), and ms per step on loopback (these 2 cores; noisy, and loopback is
where the approximations help least: see benchmarks/wan.py for a link). The table gives the mean over seeds and
the difference from the exact run's; the plot (`--plot`) the test accuracy per epoch, mean over seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from splitlearning.approximations import Approximations  # noqa: E402

CONFIGS: dict[str, Approximations] = {
    "exact": Approximations(),
    "stale gradients": Approximations(stale_gradients=True),
    "local loss": Approximations(local_loss=True),
    "top-k 0.25": Approximations(top_k=0.25),
    "top-k 0.1": Approximations(top_k=0.1),
}


@dataclass(frozen=True)
class Task:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_task(seed: int) -> Task:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32)
    y = bunch.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
    return Task(x_train, y_train, x_test, y_test)


def parts(seed: int) -> tuple[Any, Any]:
    import keras

    keras.utils.set_random_seed(seed)
    bottom = keras.Sequential(
        [keras.Input((64,)), keras.layers.Dense(64, activation="relu"), keras.layers.Dense(32, activation="relu")],
        name="bottom",
    )
    top = keras.Sequential(
        [keras.Input((32,)), keras.layers.Dense(32, activation="relu"), keras.layers.Dense(10)], name="top"
    )
    return bottom, top


def run(name: str, asked: Approximations, task: Task, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    import keras

    from client_part.client import SplitClient
    from server_part import SplitServer

    bottom, top = parts(seed)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    server = SplitServer(top, loss, keras.optimizers.Adam(args.learning_rate), ["accuracy"], allow_approximations="all")
    port = server.start("127.0.0.1:0")
    try:
        with SplitClient(
            bottom,
            keras.optimizers.Adam(args.learning_rate),
            f"127.0.0.1:{port}",
            approximations=asked,
            leakage_meters=False,
        ) as client:
            started = time.perf_counter()
            history = client.fit(
                task.x_train,
                task.y_train,
                batch_size=args.batch,
                epochs=args.epochs,
                validation_data=(task.x_test, task.y_test),
                seed=seed,
                verbose=0,
            )
            seconds = time.perf_counter() - started
            totals = client.meter.snapshot()
            steps = client.step
    finally:
        server.stop(grace=1.0)
    logs = history.history
    return {
        "config": name,
        "seed": seed,
        "val_accuracy": [float(v) for v in logs["val_accuracy"]],
        "val_loss": [float(v) for v in logs["val_loss"]],
        "steps": steps,
        "seconds": seconds,
        "ms_per_step": 1000 * totals.seconds / max(totals.steps, 1),
        "up_bytes": totals.bytes_sent / max(totals.steps, 1),
        "down_bytes": totals.bytes_received / max(totals.steps, 1),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    names = [n.strip() for n in args.configs.split(",")] if args.configs else list(CONFIGS)
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
    results: list[dict[str, Any]] = []
    for seed in seeds:
        task = load_task(seed)
        for name in names:
            result = run(name, CONFIGS[name], task, seed, args)
            results.append(result)
            print(
                f"seed {seed} {name:>16}: test accuracy {result['val_accuracy'][-1]:.4f}, "
                f"loss {result['val_loss'][-1]:.4f}, {result['ms_per_step']:.1f} ms/step, "
                f"{result['up_bytes'] / 1024:.1f} KiB up, {result['down_bytes'] / 1024:.1f} KiB down per step",
                flush=True,
            )
    print()
    print(table(results, names))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if args.plot:
        plot(results, names, Path(args.plot))
        print(f"\nplot: {args.plot}")
    return 0


def table(results: list[dict[str, Any]], names: list[str]) -> str:
    def final(name: str, key: str) -> list[float]:
        return [r[key][-1] for r in results if r["config"] == name]

    exact_acc = statistics.mean(final("exact", "val_accuracy")) if "exact" in names else float("nan")
    rows = [
        "| approximation | test accuracy | vs exact | range over seeds | test loss | KiB up / down per step "
        "| ms per step (loopback) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in names:
        acc, loss = final(name, "val_accuracy"), final(name, "val_loss")
        mine = [r for r in results if r["config"] == name]
        up = statistics.mean(r["up_bytes"] for r in mine) / 1024
        down = statistics.mean(r["down_bytes"] for r in mine) / 1024
        ms = statistics.median(r["ms_per_step"] for r in mine)
        rows.append(
            f"| {name} | {statistics.mean(acc):.4f} | {statistics.mean(acc) - exact_acc:+.4f} | "
            f"{min(acc):.4f}-{max(acc):.4f} | {statistics.mean(loss):.4f} | {up:.1f} / {down:.1f} | {ms:.1f} |"
        )
    return "\n".join(rows)


def plot(results: list[dict[str, Any]], names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 4.0))
    for name in names:
        curves = np.array([r["val_accuracy"] for r in results if r["config"] == name])
        epochs = np.arange(1, curves.shape[1] + 1)
        axis.plot(epochs, curves.mean(axis=0), marker="o", markersize=3, label=name)
    axis.set_xlabel("epoch")
    axis.set_ylabel("test accuracy (mean over seeds)")
    axis.set_title("digits, split over gRPC: each approximation against the exact split")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (data split and weights)")
    parser.add_argument("--configs", default="", help=f"comma-separated, of: {', '.join(CONFIGS)} (default: all)")
    parser.add_argument("--plot", default="docs/approximations.png", help="'' for none")
    parser.add_argument("--json", type=Path, default=None)
    return parser.parse_args(argv)


if __name__ == "__main__":
    raise SystemExit(main())
