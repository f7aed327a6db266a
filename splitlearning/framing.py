"""Training messages on the wire without copying their tensors through protobuf.

On the wire a `TrainRequest` or `TrainResponse` is ordinary protobuf: any client or server generated from the
.proto reads and writes it. What differs is how this package builds and reads the big `Tensor.content` fields:

- sending (`Outgoing.serialize`): protobuf serialises the small parts (the message without its tensors, each
  tensor's header: dtype, shape, encoding, scale); the tensor bytes are joined behind them once, framed by
  hand as the `content` field of their `Tensor`. Setting `content` on a message, then serialising it, copies
  the payload twice more, at tens of microseconds per megabyte each (figures in docs/performance.md);
- receiving (`parse`): the received buffer is scanned field by field (a few varints); each tensor's content
  stays a view of that buffer and only the small parts go through protobuf. Anything this scanner does not
  expect (a tensor field twice, a content field twice, an unknown wire type) falls back to protobuf's own
  parser, so every valid encoding is read the same way protobuf reads it.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import numpy as np
from google.protobuf.descriptor import Descriptor
from google.protobuf.message import Message

from splitlearning.v1 import split_learning_pb2 as pb

M = TypeVar("M", bound=Message)

_LENGTH_DELIMITED = 2
_CONTENT_NUMBER = pb.Tensor.DESCRIPTOR.fields_by_name["content"].number


@dataclass(frozen=True)
class Payload:
    """A tensor ready to send: its header (no content) and its bytes, C-contiguous, viewed as uint8."""

    header: pb.Tensor
    data: np.ndarray

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)


def tensor_fields(message_type: type[Message]) -> dict[str, int]:
    """The fields of `message_type` that hold a `Tensor`: name -> field number."""
    return _tensor_fields(message_type.DESCRIPTOR)


@functools.cache
def _tensor_fields(descriptor: Descriptor) -> dict[str, int]:
    return {
        f.name: f.number
        for f in descriptor.fields
        if f.message_type is not None and f.message_type.full_name == pb.Tensor.DESCRIPTOR.full_name
    }


@dataclass
class Outgoing(Generic[M]):
    """A message to send: `message` holds every field but its tensors, which are in `tensors` by field name."""

    message: M
    tensors: dict[str, Payload] = field(default_factory=dict)
    _wire: bytes | None = field(default=None, init=False, repr=False)

    def has(self, name: str) -> bool:
        return name in self.tensors

    def serialize(self) -> bytes:
        """The protobuf encoding of the whole message; the tensor bytes are copied once, into it."""
        if self._wire is None:
            numbers = tensor_fields(type(self.message))
            doubled = [name for name in self.tensors if self.message.HasField(name)]
            if doubled:  # protobuf would merge the two: shapes appended, a wrong tensor
                raise ValueError(f"{doubled} set on the message and given as tensors: give each tensor once")
            parts: list[bytes | np.ndarray] = [self.message.SerializeToString()]
            for name, payload in self.tensors.items():
                head = payload.header.SerializeToString()
                content_key = _key(_CONTENT_NUMBER) + _varint(payload.nbytes)
                length = len(head) + len(content_key) + payload.nbytes
                parts += [_key(numbers[name]) + _varint(length) + head + content_key, payload.data]
            self._wire = b"".join(parts)  # type: ignore[arg-type]  # ndarrays are buffers
        return self._wire

    @property
    def wire_size(self) -> int:
        return len(self.serialize())


@dataclass(frozen=True)
class Incoming(Generic[M]):
    """A received message: `message` has every field (tensor headers included) but the tensors' content,
    which `payloads` holds as views of the received buffer, by field name."""

    message: M
    payloads: Mapping[str, memoryview]
    wire_size: int

    def has(self, name: str) -> bool:
        return self.message.HasField(name)

    def content(self, name: str) -> memoryview | bytes:
        """The content of tensor field `name` (empty if it has none)."""
        payload = self.payloads.get(name)
        return payload if payload is not None else getattr(self.message, name).content


def parse(message_type: type[M], data: bytes) -> Incoming[M]:
    """Read `data` as a `message_type`, leaving its tensors' content in place (see the module's notes)."""
    numbers = {number: name for name, number in tensor_fields(message_type).items()}
    try:
        scanned = _scan(memoryview(data), numbers)
    except (IndexError, ValueError):
        scanned = None
    if scanned is None:
        return Incoming(message_type.FromString(data), {}, len(data))
    rest, tensors = scanned
    message = message_type.FromString(b"".join(rest))
    payloads: dict[str, memoryview] = {}
    for number, (head, content) in tensors.items():
        name = numbers[number]
        tensor = getattr(message, name)
        tensor.SetInParent()
        tensor.MergeFromString(b"".join(head))
        if content is not None:
            payloads[name] = content
    return Incoming(message, payloads, len(data))


def _scan(
    view: memoryview, tensor_numbers: Mapping[int, str]
) -> tuple[list[memoryview], dict[int, tuple[list[memoryview], memoryview | None]]] | None:
    """Split a message into its non-tensor fields (verbatim) and, per tensor field, its header fields
    (verbatim) and its content (a view). None when the layout is not the plain one this reads."""
    rest: list[memoryview] = []
    tensors: dict[int, tuple[list[memoryview], memoryview | None]] = {}
    for start, number, wire, body, end in _fields(view, 0, len(view)):
        if number in tensor_numbers and wire == _LENGTH_DELIMITED:
            if number in tensors:  # repeated: protobuf would merge the two; let protobuf do it
                return None
            split = _split_tensor(view, body, end)
            if split is None:
                return None
            tensors[number] = split
        else:
            rest.append(view[start:end])
    return rest, tensors


def _split_tensor(view: memoryview, start: int, end: int) -> tuple[list[memoryview], memoryview | None] | None:
    head: list[memoryview] = []
    content: memoryview | None = None
    for field_start, number, wire, body, field_end in _fields(view, start, end):
        if number == _CONTENT_NUMBER:
            if content is not None or wire != _LENGTH_DELIMITED:
                return None
            content = view[body:field_end]
        else:
            head.append(view[field_start:field_end])
    return head, content


def _fields(view: memoryview, pos: int, end: int) -> list[tuple[int, int, int, int, int]]:
    """(start, number, wire type, body start, end) of each field in view[pos:end]."""
    fields = []
    while pos < end:
        start = pos
        key, pos = _read_varint(view, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, pos_end = _read_varint(view, pos)
        elif wire == 1:
            pos_end = pos + 8
        elif wire == _LENGTH_DELIMITED:
            length, pos = _read_varint(view, pos)
            pos_end = pos + length
        elif wire == 5:
            pos_end = pos + 4
        else:  # groups (3, 4) and invalid types: protobuf decides
            raise ValueError(f"wire type {wire}")
        if number == 0 or pos_end > end:
            raise ValueError("truncated or invalid field")
        fields.append((start, number, wire, pos, pos_end))
        pos = pos_end
    return fields


def _read_varint(view: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = view[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _key(number: int) -> bytes:
    return _varint((number << 3) | _LENGTH_DELIMITED)
