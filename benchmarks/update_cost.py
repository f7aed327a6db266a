"""The cost of `exact` (`split-server --exact`): one optimizer update as a plain graph against XLA-compiled.

One process, no gRPC. Each case builds two trainers of the same seeded part, one with `exact=True`, and times
the update alone (`settle` after each step's reply; the U-shape middle's `_apply_fn` after its backward):
`--rounds` rounds of `--per-round` updates each, the two alternating (which goes first alternates too). Prints
per case the medians of the rounds' medians, their range, and the difference's median and range, in ms.

    PYTHONPATH=. python benchmarks/update_cost.py [--rounds 7] [--per-round 60]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import tensorflow as tf

from server_part.middle_trainer import MiddleTrainer
from splitlearning.models import BUILTIN, make_optimizer
from splitlearning.training.loss_trainer import LossTrainer

Case = tuple[dict[bool, Any], Callable[[Any], float]]  # trainers by `exact`, one timed update (seconds)


def loss_case(model: str, part: str, batch: int, optimizer: str, micro_batches: int = 1) -> Case:
    """The server's part (or a U-shape's head): a step's reply, then its update timed."""
    pair = BUILTIN[model]
    trainers = {
        exact: LossTrainer(
            getattr(pair, part)(0), pair.loss, make_optimizer(optimizer, 1e-3), ["accuracy"], exact=exact
        )
        for exact in (False, True)
    }
    iv = np.random.default_rng(1).standard_normal((batch, *trainers[True].contract.iv.shape)).astype(np.float32)
    labels = np.random.default_rng(2).integers(0, 10, batch).astype(np.int64)

    def one(trainer: LossTrainer) -> float:
        if micro_batches == 1:
            trainer.train(iv, labels, reset_metrics=False)
        else:
            size = batch // micro_batches
            for k in range(micro_batches):
                part_iv, part_labels = iv[k * size : (k + 1) * size], labels[k * size : (k + 1) * size]
                last = k == micro_batches - 1
                trainer.train_micro(part_iv, part_labels, 1 / micro_batches, last, False, first=k == 0)
        started = time.perf_counter()
        trainer.settle()
        return time.perf_counter() - started

    return trainers, one


def middle_case(model: str, batch: int, optimizer: str) -> Case:
    """The U-shape's middle: forward and back-propagation of a fixed gradient, then its update timed."""
    pair = BUILTIN[model]
    assert pair.middle is not None
    trainers = {
        exact: MiddleTrainer(pair.middle(0), make_optimizer(optimizer, 1e-3), exact=exact) for exact in (False, True)
    }
    iv = np.random.default_rng(1).standard_normal((batch, *trainers[True].contract.iv.shape)).astype(np.float32)

    def one(trainer: MiddleTrainer) -> float:
        outputs, pending = trainer.forward(iv)
        weights = trainer.model.trainable_variables
        gradient = tf.constant(1e-3, outputs.dtype, outputs.shape)
        *grads, _ = pending.tape.gradient(pending.outputs, [*weights, pending.iv], output_gradients=gradient)
        started = time.perf_counter()
        trainer._apply_fn(*grads)
        return time.perf_counter() - started

    return trainers, one


def compare(label: str, case: Case, rounds: int, per_round: int) -> None:
    trainers, one = case
    for exact in (False, True):
        for _ in range(15):  # traces, then warms
            one(trainers[exact])
    medians: dict[bool, list[float]] = {False: [], True: []}
    for index in range(rounds):
        for exact in (False, True) if index % 2 == 0 else (True, False):
            medians[exact].append(1e3 * statistics.median(one(trainers[exact]) for _ in range(per_round)))
    xla, plain = medians[False], medians[True]
    extra = [p - x for x, p in zip(xla, plain, strict=True)]
    print(
        f"{label:40s} xla {statistics.median(xla):.3f} [{min(xla):.3f}-{max(xla):.3f}]  "
        f"plain {statistics.median(plain):.3f} [{min(plain):.3f}-{max(plain):.3f}]  "
        f"plain-xla {statistics.median(extra):+.3f} [{min(extra):+.3f},{max(extra):+.3f}] ms",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--per-round", type=int, default=60)
    args = parser.parse_args()
    for optimizer in ("adam", "sgd"):
        cases: list[tuple[str, Case]] = [
            ("mnist-cnn server b128", loss_case("mnist-cnn", "server", 128, optimizer)),
            ("mnist-cnn server b128, 4 micro-batches", loss_case("mnist-cnn", "server", 128, optimizer, 4)),
        ]
        for model in ("digits-mlp", "digits-cnn"):
            cases += [
                (f"{model} server b32", loss_case(model, "server", 32, optimizer)),
                (f"{model} U-shape middle b32", middle_case(model, 32, optimizer)),
                (f"{model} U-shape head b32", loss_case(model, "head", 32, optimizer)),
            ]
        for label, case in cases:
            compare(f"{label} {optimizer}", case, args.rounds, args.per_round)


if __name__ == "__main__":
    main()
