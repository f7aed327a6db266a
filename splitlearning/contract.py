"""The contract of the cut: what one sample looks like on each side of it, and the protocol version."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from splitlearning import codec
from splitlearning.errors import InvalidRequest
from splitlearning.v1 import split_learning_pb2 as pb

PROTOCOL_VERSION = 1


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


@dataclass(frozen=True)
class CutContract:
    """The interface at the cut: one sample's IV and one sample's label."""

    iv: Spec
    label: Spec

    def __str__(self) -> str:
        return f"iv {self.iv}, label {self.label}"


@dataclass(frozen=True)
class Agreement:
    """What a handshake settled: the session, where it stands, and the limits both sides keep."""

    session_id: str
    next_step: int
    contract: CutContract
    max_batch_size: int
    metric_names: list[str]


def spec_to_proto(spec: Spec) -> pb.TensorSpec:
    return pb.TensorSpec(shape=spec.shape, dtype=codec.dtype_to_proto(spec.dtype))


def spec_from_proto(message: pb.TensorSpec, field: str) -> Spec:
    if message.dtype == pb.DTYPE_UNSPECIFIED:
        raise InvalidRequest(f"{field}: dtype is missing")
    if any(d <= 0 for d in message.shape):
        raise InvalidRequest(f"{field}: every dimension must be positive, got {list(message.shape)}")
    return Spec(tuple(int(d) for d in message.shape), codec.dtype_from_proto(message.dtype))


def contract_to_proto(contract: CutContract) -> pb.CutContract:
    return pb.CutContract(iv=spec_to_proto(contract.iv), label=spec_to_proto(contract.label))


def contract_from_proto(message: pb.CutContract) -> CutContract:
    if not message.HasField("iv") or not message.HasField("label"):
        raise InvalidRequest("contract: both the iv and the label spec are required")
    return CutContract(spec_from_proto(message.iv, "contract.iv"), spec_from_proto(message.label, "contract.label"))
