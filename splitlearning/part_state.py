"""A part's state as it moves between processes in multi-client training: its weights and, where the scheme
carries it (round-robin), its optimizer's variables. Numpy and protobuf only: the aggregator runs without
TensorFlow.

On the wire it is a `ModelState` of raw `Tensor`s; on disk an `.npz` of `w0, w1, ...` and `o0, o1, ...`,
written to a temporary name first and renamed, so a reader sees the old file or the new one.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from splitlearning import codec
from splitlearning.errors import InvalidRequest
from splitlearning.v1 import split_learning_pb2 as pb


@dataclass(frozen=True)
class PartState:
    """Weights in `model.get_weights()` order and optimizer variables in `optimizer.variables` order."""

    weights: list[np.ndarray] = field(default_factory=list)
    optimizer: list[np.ndarray] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.weights and not self.optimizer

    def check_finite(self, what: str) -> None:
        """Raise InvalidRequest if a floating tensor holds NaN or Inf (one diverged member would spoil an average)."""
        for name, arrays in (("weights", self.weights), ("optimizer", self.optimizer)):
            for index, array in enumerate(arrays):
                if not _finite(array):
                    raise InvalidRequest(f"{what}.{name}[{index}]: holds NaN or Inf (the training diverged)")

    def check_like(self, other: PartState, what: str) -> None:
        """Raise InvalidRequest unless `self` has the same weights (count, shapes, dtypes) as `other`."""
        if len(self.weights) != len(other.weights):
            raise InvalidRequest(f"{what}: {len(self.weights)} weight tensors, expected {len(other.weights)}")
        for index, (mine, theirs) in enumerate(zip(self.weights, other.weights, strict=True)):
            if mine.shape != theirs.shape or mine.dtype != theirs.dtype:
                raise InvalidRequest(
                    f"{what}: weight {index} is {mine.dtype.name}{list(mine.shape)}, "
                    f"expected {theirs.dtype.name}{list(theirs.shape)}"
                )


def _finite(array: np.ndarray) -> bool:
    return not np.issubdtype(array.dtype, np.floating) or bool(np.isfinite(array).all())


def capture(model: Any, optimizer: Any = None) -> PartState:
    """The state of a Keras model (and its optimizer, when given), as numpy copies."""
    return capture_parts([(model, optimizer)])


def capture_parts(parts: Sequence[tuple[Any, Any]]) -> PartState:
    """The state of several (model, optimizer) pairs one after the other (a U-shaped client's bottom and head);
    a None optimizer contributes no variables."""
    weights = [np.array(w) for model, _ in parts for w in model.get_weights()]
    variables = [np.array(v.numpy()) for _, opt in parts if opt is not None for v in opt.variables]
    return PartState(weights, variables)


def apply(state: PartState, model: Any, optimizer: Any = None) -> None:
    """Load `state` into a Keras model (and its optimizer's variables, when the state carries them)."""
    apply_parts(state, [(model, optimizer)])


def apply_parts(state: PartState, parts: Sequence[tuple[Any, Any]]) -> None:
    """Load what `capture_parts` captured from pairs like these; optimizers get variables when the state has
    some (a None optimizer is skipped)."""
    counts = [len(model.get_weights()) for model, _ in parts]
    if sum(counts) != len(state.weights):
        raise ValueError(f"the state has {len(state.weights)} weight tensors, this part {sum(counts)}")
    optimizers = [list(opt.variables) for _, opt in parts if opt is not None]
    if state.optimizer and sum(map(len, optimizers)) != len(state.optimizer):
        raise ValueError(
            f"the optimizer state has {len(state.optimizer)} variables, this part's optimizer "
            f"{sum(map(len, optimizers))}: every member must use the same --optimizer"
        )
    offset = 0
    for (model, _), count in zip(parts, counts, strict=True):
        model.set_weights(state.weights[offset : offset + count])
        offset += count
    if state.optimizer:
        for variable, value in zip([v for vs in optimizers for v in vs], state.optimizer, strict=True):
            variable.assign(value)


def to_proto(state: PartState, message: pb.ModelState | None = None) -> pb.ModelState:
    message = message if message is not None else pb.ModelState()
    for array in state.weights:
        codec.write(array, message.weights.add())
    for array in state.optimizer:
        codec.write(array, message.optimizer.add())
    return message


def from_proto(message: pb.ModelState, what: str = "state") -> PartState:
    """Decode a `ModelState` (copies: the arrays outlive the message); malformed tensors are InvalidRequest."""
    weights = [np.array(codec.from_proto(t, f"{what}.weights[{i}]")) for i, t in enumerate(message.weights)]
    optimizer = [np.array(codec.from_proto(t, f"{what}.optimizer[{i}]")) for i, t in enumerate(message.optimizer)]
    return PartState(weights, optimizer)


def save(path: Path, state: PartState, **extra: int) -> None:
    """Write `state` (and integer scalars `extra`) to `path` atomically."""
    arrays: dict[str, np.ndarray] = {f"w{i}": w for i, w in enumerate(state.weights)}
    arrays.update({f"o{i}": o for i, o in enumerate(state.optimizer)})
    arrays.update({f"extra_{k}": np.asarray(v, np.int64) for k, v in extra.items()})
    temporary = path.with_name(f".{path.name}.tmp.npz")
    with open(temporary, "wb") as file:
        np.savez(file, **arrays)  # type: ignore[arg-type]
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


def load(path: Path) -> tuple[PartState, dict[str, int]]:
    """Read what `save` wrote: the state and its integer scalars."""
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: not a saved part state (.npz)")
    with np.load(path, allow_pickle=False) as archive:
        names = set(archive.files)
        weights = [archive[f"w{i}"] for i in range(_count(names, "w"))]
        optimizer = [archive[f"o{i}"] for i in range(_count(names, "o"))]
        extra = {n.removeprefix("extra_"): int(archive[n]) for n in names if n.startswith("extra_")}
    return PartState(weights, optimizer), extra


def _count(names: set[str], prefix: str) -> int:
    count = 0
    while f"{prefix}{count}" in names:
        count += 1
    return count


def average(states: Sequence[PartState], samples: Sequence[int]) -> PartState:
    """FedAvg: the sample-weighted mean of the states' weights, sum_k (n_k / N) w_k with N = sum_k n_k.

    Floating weights are summed in float64 in the order given (so the result is a fixed function of its
    inputs, bit for bit) and cast back to their dtype; other weights (integer counters) are the first state's.
    The optimizer state is not averaged: the result carries none.
    """
    if not states or len(states) != len(samples):
        raise ValueError(f"averaging needs one sample count per state, got {len(states)} states, {len(samples)} counts")
    if any(n <= 0 for n in samples):
        raise ValueError(f"sample counts must be positive, got {list(samples)}")
    for state in states[1:]:
        state.check_like(states[0], "a part to average")
    total = float(sum(samples))
    averaged: list[np.ndarray] = []
    for index, first in enumerate(states[0].weights):
        if not np.issubdtype(first.dtype, np.floating):
            averaged.append(np.array(first))
            continue
        accumulator = np.zeros(first.shape, np.float64)
        for state, n in zip(states, samples, strict=True):
            accumulator += (n / total) * state.weights[index].astype(np.float64)
        averaged.append(accumulator.astype(first.dtype))
    return PartState(averaged, [])
