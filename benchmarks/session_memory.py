"""Memory per session: the server's resident set size as sessions are added, each having trained a few steps.

    PYTHONPATH=. python benchmarks/session_memory.py                  # digits-cnn and mnist-cnn (the cnn pair)
    PYTHONPATH=. python benchmarks/session_memory.py --models digits-cnn --sessions 8

Each session holds its own copy of the second part, its optimizer's slots, its compiled steps and its retry
cache (the last step's request and reply). Sessions are opened through the server's registry in this process
and each trains `--steps` steps of batch `--batch-size` (random IVs and labels), so everything a training
session allocates is allocated. RSS is read from /proc after each session; the figure is the mean increase
per session after the first (which also pays for TensorFlow's one-off allocations).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mib() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * PAGE / 2**20


def measure(model: str, sessions: int, steps: int, batch: int) -> list[float]:
    from server_part import SplitServer
    from splitlearning import encodings
    from splitlearning.models import BUILTIN

    pair = BUILTIN[model]
    server = SplitServer(pair.server(0), pair.loss, "adam", list(pair.metrics), max_batch_size=batch)
    contract = server.trainer.contract
    assert contract.label is not None
    rng = np.random.default_rng(0)
    iv = rng.normal(size=(batch, *contract.iv.shape)).astype(contract.iv.dtype)
    labels = rng.integers(0, 10, size=(batch, *contract.label.shape)).astype(contract.label.dtype)
    readings = [rss_mib()]
    for index in range(sessions):
        session = server.sessions.open("")
        session.join(f"client-{index}", encodings.RAW)
        for step in range(steps):
            session.train(f"client-{index}", step, iv, labels, step == 0)
            session.settle()
        readings.append(rss_mib())
    return readings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="session_memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="digits-cnn,mnist-cnn")
    parser.add_argument("--sessions", type=int, default=6)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args(argv)
    print("| model | RSS before (MiB) | after 1st session | each further session (mean, MiB) |")
    print("| --- | --- | --- | --- |")
    for model in args.models.split(","):
        readings = measure(model, args.sessions, args.steps, args.batch_size)
        further = np.diff(readings[1:])
        print(f"| {model} | {readings[0]:.0f} | +{readings[1] - readings[0]:.1f} | {further.mean():.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
