"""Pinning a process to the device (and, optionally, the CPU cores) it is given."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable

log = logging.getLogger(__name__)


def parse_cpus(spec: str) -> set[int]:
    """'0', '0,2', '0-3' or '0-1,4' -> a set of core numbers."""
    cores: set[int] = set()
    for part in filter(None, (p.strip() for p in spec.split(","))):
        lo, _, hi = part.partition("-")
        try:
            first, last = int(lo), int(hi or lo)
        except ValueError:
            raise ValueError(f"--cpus: expected core numbers like '0' or '0-3,6', got {spec!r}") from None
        if first < 0 or last < first:
            raise ValueError(f"--cpus: bad core range {part!r} in {spec!r}")
        cores.update(range(first, last + 1))
    if not cores:
        raise ValueError(f"--cpus: no cores in {spec!r}")
    return cores


def pin_cpus(cores: set[int]) -> None:
    """Restrict this process (and the threads it starts later) to `cores`."""
    available = os.sched_getaffinity(0)
    missing = sorted(cores - available)
    if missing:
        raise ValueError(f"--cpus: cores {missing} are not available to this process; available: {sorted(available)}")
    os.sched_setaffinity(0, cores)
    log.info("pinned to CPU cores %s", sorted(cores))


def configure_threads(intra_op: int | None, inter_op: int | None) -> None:
    """Set TensorFlow's thread pools; must run before TensorFlow executes anything."""
    import tensorflow as tf

    if intra_op:
        tf.config.threading.set_intra_op_parallelism_threads(intra_op)
    if inter_op:
        tf.config.threading.set_inter_op_parallelism_threads(inter_op)


def resolve_device(name: str) -> str:
    """Check that `name` ('/CPU:0', '/GPU:1', 'gpu:0') names a device of this process; return its canonical name.

    A device that does not exist is an error, never a silent fallback to another one.
    """
    import tensorflow as tf

    wanted = name.strip().lstrip("/").upper().replace("DEVICE:", "")
    kind, _, index = wanted.partition(":")
    canonical = f"/device:{kind}:{index or '0'}"
    present = [d.name for d in tf.config.list_logical_devices()]
    if canonical not in present:
        raise ValueError(f"device {name!r} does not exist in this process; available: {present or ['none']}")
    return canonical


def describe_placement(variables: Iterable[object]) -> str:
    """'device: count' for the devices the given variables live on."""
    counts: dict[str, int] = {}
    for v in variables:
        device = getattr(v, "device", "") or "unplaced"
        counts[device] = counts.get(device, 0) + 1
    return ", ".join(f"{d}: {n} variables" for d, n in sorted(counts.items())) or "no variables"


def setup_process(cpus: str | None, threads: int | None) -> None:
    """Core pinning and thread pools: must run before TensorFlow executes anything."""
    if cpus:
        pin_cpus(parse_cpus(cpus))
    if threads:
        configure_threads(threads, threads)  # inter-op 1 would serialise independent ops: about 2x slower steps
