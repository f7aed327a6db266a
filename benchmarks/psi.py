"""Benchmark: the private set intersection of sample ids (splitlearning/psi.py), in one process.

For each size n and each number of feature parties k: a label party and k feature parties of n ids each, a
fraction `--overlap` of them held by every party (the rest each party's own), integers drawn at random. Prints
one row per run: the seconds each party computes (the label party's; the busiest feature party's), the sum of
them (the run's wall time in one process; parties on their own machines work partly in parallel), and the
bytes on the wire (payloads only: 32 per blinded point, 4 per position), in all and per feature party.

    PYTHONPATH=. python benchmarks/psi.py [--sizes 10000 100000] [--feature-parties 1 2] [--overlap 0.5]
"""

from __future__ import annotations

import argparse
import random
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

from splitlearning import psi


def datasets(size: int, parties: int, overlap: float, seed: int = 0) -> list[list[int]]:
    """`parties` shuffled sets of `size` ids, `overlap * size` of them in every set, the others in one only."""
    rng = random.Random(seed)
    common = int(size * overlap)
    pool = rng.sample(range(10**12), common + parties * (size - common))
    shared, rest = pool[:common], pool[common:]
    sets = []
    for party in range(parties):
        ids = shared + rest[party * (size - common) : (party + 1) * (size - common)]
        rng.shuffle(ids)
        sets.append(ids)
    return sets


def measure(size: int, feature_parties: int, overlap: float) -> dict[str, float]:
    """One run, step by step, each step's time charged to the party that computes it."""
    seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def computing(party: str) -> Iterator[None]:
        started = time.perf_counter()
        yield
        seconds[party] += time.perf_counter() - started

    label_ids, *feature_ids = datasets(size, 1 + feature_parties, overlap)
    names = [f"feature-{number}" for number in range(1, feature_parties + 1)]
    with computing(psi.LABEL):
        hub: psi.Hub[int] = psi.Hub(label_ids, names)
    members: list[psi.Member[int]] = []
    for name, ids in zip(names, feature_ids, strict=True):
        with computing(name):
            members.append(psi.Member(ids, name))
    wire: dict[str, int] = defaultdict(int)
    for member in members:
        request, offer = member.request(), hub.offer()
        with computing(member.name):
            reblinded = member.reblind(offer)
        with computing(psi.LABEL):
            hub.match(member.name, request, reblinded)
        wire[member.name] += request.nbytes + offer.nbytes + reblinded.nbytes
    with computing(psi.LABEL):
        common = hub.intersection()
    for member in members:
        with computing(psi.LABEL):
            positions = hub.result(member.name)
        with computing(member.name):
            mine = member.intersection(positions)
        assert mine == common
        wire[member.name] += positions.nbytes
    assert len(common) == int(size * overlap)
    return {
        "label": seconds[psi.LABEL],
        "feature": max(seconds[name] for name in names),
        "total": sum(seconds.values()),
        "wire": sum(wire.values()),
        "wire_each": wire[names[0]],
        "common": len(common),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000], help="ids per party")
    parser.add_argument("--feature-parties", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--overlap", type=float, default=0.5, help="the fraction of ids every party holds")
    args = parser.parse_args()
    print(
        f"| ids per party | parties | common ids | label party s | a feature party s | total s "
        f"| wire MB | wire MB per feature party |\n|{'---|' * 8}"
    )
    for size in args.sizes:
        for feature_parties in args.feature_parties:
            row = measure(size, feature_parties, args.overlap)
            print(
                f"| {size:,} | {1 + feature_parties} | {row['common']:,.0f} | {row['label']:.1f} "
                f"| {row['feature']:.1f} | {row['total']:.1f} | {row['wire'] / 1e6:.2f} "
                f"| {row['wire_each'] / 1e6:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
