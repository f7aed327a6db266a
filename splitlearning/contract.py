"""The contract of the cut: what one sample looks like on each side of it (constants: splitlearning/protocol.py)."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import numpy as np

from splitlearning import codec
from splitlearning.approximations import NONE, Approximations
from splitlearning.errors import InvalidRequest
from splitlearning.v1 import split_learning_pb2 as pb


@dataclass(frozen=True)
class Spec:
    """Shape (without the batch dimension) and dtype of one sample of a tensor."""

    shape: tuple[int, ...]
    dtype: np.dtype

    def __str__(self) -> str:
        return f"[batch, {', '.join(map(str, self.shape))}] {self.dtype.name}".replace("[batch, ]", "[batch]")

    @property
    def sample_bytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def check_batch(self, array: np.ndarray, field: str) -> int:
        """Check a decoded batch against this spec; return its batch size."""
        if array.dtype != self.dtype:
            raise InvalidRequest(f"{field}: dtype {array.dtype.name} does not match the cut contract {self}")
        if array.ndim != len(self.shape) + 1 or tuple(array.shape[1:]) != self.shape:
            raise InvalidRequest(f"{field}: shape {list(array.shape)} does not match the cut contract {self}")
        return int(array.shape[0])


class CutMode(enum.Enum):
    """Which part the server holds: the second part and the loss, or (U-shape) only the middle."""

    STANDARD = "standard"
    USHAPE = "ushape"

    def describe(self) -> str:
        if self is CutMode.USHAPE:
            return "the middle of a U-shaped cut (the client holds the head, the loss and the labels)"
        return "the top of a standard cut (the server holds the loss and receives labels)"


@dataclass(frozen=True)
class CutContract:
    """The interface at the cut: one sample's IV and one sample's label.

    In the U-shape the server sees no label (`label` is None on its side) and `output` is one sample of what
    the middle returns (the second cut, which the client's head takes).
    """

    iv: Spec
    label: Spec | None
    output: Spec | None = None

    def __str__(self) -> str:
        text = f"iv {self.iv}"
        text += f", label {self.label}" if self.label is not None else ""
        return text + (f", output {self.output}" if self.output is not None else "")


@dataclass(frozen=True)
class Agreement:
    """What a handshake settled: the session, where it stands, and the limits both sides keep."""

    session_id: str
    next_step: int
    contract: CutContract
    max_batch_size: int
    metric_names: list[str]
    mode: CutMode = CutMode.STANDARD
    # Wire encoding of the IV and its gradient (an `Encoding` value); raw unless both sides opted in.
    encoding: int = pb.ENCODING_RAW
    # Beyond the exact split: what the session trains with (none unless both sides opted in).
    approximations: Approximations = NONE


def spec_to_proto(spec: Spec) -> pb.TensorSpec:
    return pb.TensorSpec(shape=spec.shape, dtype=codec.dtype_to_proto(spec.dtype))


def spec_from_proto(message: pb.TensorSpec, field: str) -> Spec:
    if message.dtype == pb.DTYPE_UNSPECIFIED:
        raise InvalidRequest(f"{field}: dtype is missing")
    if any(d <= 0 for d in message.shape):
        raise InvalidRequest(f"{field}: every dimension must be positive, got {list(message.shape)}")
    return Spec(tuple(int(d) for d in message.shape), codec.dtype_from_proto(message.dtype))


def contract_to_proto(contract: CutContract) -> pb.CutContract:
    message = pb.CutContract(iv=spec_to_proto(contract.iv))
    if contract.label is not None:
        message.label.CopyFrom(spec_to_proto(contract.label))
    if contract.output is not None:
        message.output.CopyFrom(spec_to_proto(contract.output))
    return message


def contract_from_proto(message: pb.CutContract, mode: CutMode = CutMode.STANDARD) -> CutContract:
    if mode is CutMode.USHAPE:
        if not message.HasField("iv") or not message.HasField("output"):
            raise InvalidRequest("contract: a U-shaped cut needs both the iv and the middle's output spec")
        return CutContract(
            spec_from_proto(message.iv, "contract.iv"), None, spec_from_proto(message.output, "contract.output")
        )
    if not message.HasField("iv") or not message.HasField("label"):
        raise InvalidRequest("contract: both the iv and the label spec are required")
    output = spec_from_proto(message.output, "contract.output") if message.HasField("output") else None
    return CutContract(
        spec_from_proto(message.iv, "contract.iv"), spec_from_proto(message.label, "contract.label"), output
    )


_MODES: dict[CutMode, pb.CutMode.ValueType] = {
    CutMode.STANDARD: pb.CUT_MODE_STANDARD,
    CutMode.USHAPE: pb.CUT_MODE_USHAPE,
}


def mode_to_proto(mode: CutMode) -> pb.CutMode.ValueType:
    return _MODES[mode]


def mode_from_proto(code: pb.CutMode.ValueType) -> CutMode:
    """CUT_MODE_UNSPECIFIED (a sender that predates the field) is the standard cut."""
    if code == pb.CUT_MODE_UNSPECIFIED:
        return CutMode.STANDARD
    for mode, value in _MODES.items():
        if value == code:
            return mode
    raise InvalidRequest(f"unknown cut mode {code}; expected one of {[m.value for m in CutMode]}")
