"""Robust averaging for SplitFed: the group's test accuracy on the bundled digits with four honest members, and
with one of the four hostile (its first part's weights sent x100, or sign-flipped), under each `--aggregation`
rule; and honest members on non-IID shards (cut by label), where the robust rules pay for discarding members.

    PYTHONPATH=. python benchmarks/robust_aggregation.py                  # what docs/performance.md shows (~2 min)
    PYTHONPATH=. python benchmarks/robust_aggregation.py --rounds 1       # a quick check

In process, without gRPC: a SplitFed v1 round equals N uncut Keras models, each trained from the round's start
with a fresh optimizer on its shard, then each part combined over the members (tests/test_group_exactness.py
pins this for FedAvg; docs/multi_client.md). So each round here trains `keras.Sequential([first, second])` of
the seeded digits-mlp pair once per member (adam 0.003, batch 32, one local epoch in the order a split client
draws), then combines the first parts as the aggregator does and the second parts as the server does, both with
`splitlearning.aggregation` (norm-bounded measures each part's updates from that part's start). The hostile
member trains honestly (so its second part, which the server trains from its IVs, is honest) and then sends
`100 w` (scaled) or `-w` (sign-flipped) as its first part: the threat of issue 25, one member sending finite but
hostile first-part weights. Figures: the group's test accuracy after the last round, and the distance of the
final first part from the one the honest run's rule reached (how far the hostile member moved it).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from splitlearning.aggregation import DEFAULT_TRIM, Aggregation, Rule  # noqa: E402
from splitlearning.part_state import PartState  # noqa: E402

RULES = {
    "fedavg": Aggregation(),
    "median": Aggregation(Rule.MEDIAN),
    f"trimmed-mean (beta {DEFAULT_TRIM:g})": Aggregation(Rule.TRIMMED_MEAN, DEFAULT_TRIM),
    "norm-bounded (median norm)": Aggregation(Rule.NORM_BOUNDED),
}
SCENARIOS = ("honest", "scaled x100", "sign-flipped", "honest, non-IID")


def hostile(weights: list[np.ndarray], scenario: str) -> list[np.ndarray]:
    if scenario == "scaled x100":
        return [w * np.asarray(100, w.dtype) for w in weights]
    if scenario == "sign-flipped":
        return [-w for w in weights]
    return weights


def run(rule: Aggregation, scenario: str, args: argparse.Namespace) -> tuple[float, list[np.ndarray]]:
    """The group's test accuracy after `args.rounds` rounds, and its final first part."""
    import keras

    from client_part.batches import epoch_order
    from splitlearning import data, models, shards
    from splitlearning.models import BUILTIN

    pair = BUILTIN["digits-mlp"]
    dataset = data.load("digits", seed=args.seed)
    by = "label" if "non-IID" in scenario else "random"
    parts = [
        shards.take(dataset.x_train, dataset.y_train, shards.Shard(k, args.members), by, args.seed)
        for k in range(1, args.members + 1)
    ]
    first, second = pair.client(args.seed), pair.server(args.seed)
    model = keras.Sequential([first, second])
    optimizer = models.make_optimizer("adam", 3e-3)
    model.compile(optimizer=optimizer, loss=pair.loss, metrics=["accuracy"], jit_compile=False)
    optimizer.build(model.trainable_variables)
    fresh = [np.array(v.numpy()) for v in optimizer.variables]
    cut = len(first.get_weights())
    start = [np.array(w) for w in model.get_weights()]
    hostile_member = args.members if scenario in ("scaled x100", "sign-flipped") else 0
    for round_ in range(args.rounds):
        firsts, seconds, samples = [], [], []
        for k, (x, y) in enumerate(parts, start=1):
            model.set_weights(start)
            for variable, value in zip(optimizer.variables, fresh, strict=True):
                variable.assign(value)  # each member's round starts with a fresh optimizer
            order = epoch_order(len(x), args.seed, round_, shuffle=True)
            model.fit(x[order], y[order], batch_size=args.batch_size, epochs=1, shuffle=False, verbose=0)
            weights = [np.array(w) for w in model.get_weights()]
            firsts.append(PartState(hostile(weights[:cut], scenario) if k == hostile_member else weights[:cut]))
            seconds.append(PartState(weights[cut:]))
            samples.append(len(x))
        combined_first = rule.combine(firsts, samples, PartState(start[:cut]))
        combined_second = rule.combine(seconds, samples, PartState(start[cut:]))
        start = [*combined_first.weights, *combined_second.weights]
    model.set_weights(start)
    result = model.evaluate(dataset.x_test, dataset.y_test, batch_size=256, return_dict=True, verbose=0)
    return float(result["accuracy"]), start[:cut]


def distance(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return float(np.sqrt(sum(np.sum((x.astype(np.float64) - y) ** 2) for x, y in zip(a, b, strict=True))))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="SplitFed rounds of one local epoch")
    parser.add_argument("--members", type=int, default=4, help="members; the last is the hostile one")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from splitlearning import tensorflow_setup

    tensorflow_setup.load(verbose=False)
    started = time.perf_counter()
    table: dict[str, dict[str, tuple[float, float]]] = {}
    for name, rule in RULES.items():
        honest_first: list[np.ndarray] = []
        table[name] = {}
        for scenario in SCENARIOS:
            accuracy, final_first = run(rule, scenario, args)
            if scenario == "honest":
                honest_first = final_first
            moved = distance(final_first, honest_first) if "non-IID" not in scenario else float("nan")
            table[name][scenario] = (accuracy, moved)
            print(f"{name:28} {scenario:16} accuracy {accuracy:.4f}  moved {moved:.3g}", file=sys.stderr)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(
        f"{platform.processor() or platform.machine()}, {cores} cores; digits-mlp, {args.members} members "
        f"(IID unless named), {args.rounds} rounds of 1 local epoch; {time.perf_counter() - started:.0f} s\n"
    )
    print("| rule | " + " | ".join(SCENARIOS) + " |")
    print("| --- | " + " | ".join("---:" for _ in SCENARIOS) + " |")
    for name, row in table.items():
        cells = []
        for scenario in SCENARIOS:
            accuracy, moved = row[scenario]
            moved_text = "" if scenario.startswith("honest") else f" (moved {moved:.3g})"
            cells.append(f"{accuracy:.3f}{moved_text}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
