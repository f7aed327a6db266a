"""Requests over a raw stub, past `SplitClient` (for refusals, sessions and groups as the server sees them), and as
raw bytes on the wire, past the generated stubs' serializers (for hostile and broken input)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import grpc
import numpy as np
import pytest

from splitlearning import codec
from splitlearning.protocol import PROTOCOL_VERSION
from splitlearning.v1 import split_learning_pb2 as pb
from splitlearning.v1 import split_learning_pb2_grpc as pb_grpc
from tests.conftest import CUT_DIM, NUM_CLASSES

SERVICE = "/splitlearning.v1.SplitLearningService/"
# No protobuf message: a string field (session_id) that claims 16 bytes where 1 follows.
UNDECODABLE = b"\x0a\x10x"
TIMEOUT = 10.0
BATCH = 4  # samples in a request of `train_requests`


def send_raw(channel: grpc.Channel, method: str, payload: bytes, timeout: float = 10.0) -> None:
    """Send `payload` as it is to `method` (Train: as a stream's only message); a refusal raises grpc.RpcError."""
    identity = lambda data: data  # noqa: E731 (bytes on the wire as they are)
    if method == "Train":
        stream = channel.stream_stream(SERVICE + method, request_serializer=identity, response_deserializer=identity)
        list(stream(iter([payload]), timeout=timeout))
    else:
        unary = channel.unary_unary(SERVICE + method, request_serializer=identity, response_deserializer=identity)
        unary(payload, timeout=timeout)


def connect(target: str) -> tuple[grpc.Channel, pb_grpc.SplitLearningServiceStub]:
    """An insecure channel to `target` and a stub on it (close the channel, or use it as a context manager)."""
    channel = grpc.insecure_channel(target)
    return channel, pb_grpc.SplitLearningServiceStub(channel)


def cut_contract(
    shape: Sequence[int] = (CUT_DIM,), dtype: Any = pb.DTYPE_FLOAT32, label: bool = True
) -> pb.CutContract:
    """The contract a client of the conftest pairs states: an iv of `shape` and `dtype` per sample and, unless
    `label` is False, a scalar int64 label per sample."""
    contract = pb.CutContract(iv=pb.TensorSpec(shape=shape, dtype=dtype))
    if label:
        contract.label.CopyFrom(pb.TensorSpec(shape=[], dtype=pb.DTYPE_INT64))
    return contract


# What `handshake` states unless told otherwise (the request copies it: never changed).
IV_CONTRACT = cut_contract(label=False)


def handshake(
    stub: pb_grpc.SplitLearningServiceStub,
    session_id: str = "",
    *,
    contract: pb.CutContract | None = IV_CONTRACT,
    max_batch_size: int = 8,
    protocol_version: int = PROTOCOL_VERSION,
    timeout: float = TIMEOUT,
    **fields: Any,
) -> pb.HandshakeResponse:
    """One Handshake: this protocol version, the iv-only contract of the conftest pairs (None: no contract, an
    inquiry), batches of 8; `session_id` "" opens a new session. `fields` are the request's other fields
    (client_id, group, encodings, ...). A refusal raises grpc.RpcError."""
    if contract is not None:
        fields["contract"] = contract
    request = pb.HandshakeRequest(
        protocol_version=protocol_version, session_id=session_id, max_batch_size=max_batch_size, **fields
    )
    reply: pb.HandshakeResponse = stub.Handshake(request, timeout=timeout)
    return reply


def train_requests(
    session_id: str, first: int, count: int, seed: int = 0, encoding: Any = pb.ENCODING_RAW
) -> list[pb.TrainRequest]:
    """Requests for the `count` steps from step `first`, of 4 samples each (an iv of the conftest pairs' cut,
    labels of their classes), drawn one after another from one generator seeded with `seed`; the iv in
    `encoding`."""
    rng = np.random.default_rng(seed)
    requests = []
    for step in range(first, first + count):
        iv = rng.normal(size=(BATCH, CUT_DIM)).astype("float32")
        labels = rng.integers(0, NUM_CLASSES, BATCH).astype("int64")
        requests.append(
            pb.TrainRequest(
                session_id=session_id, step=step, iv=codec.to_proto(iv, encoding), labels=codec.to_proto(labels)
            )
        )
    return requests


def train_request(session_id: str, step: int, seed: int = 0, encoding: Any = pb.ENCODING_RAW) -> pb.TrainRequest:
    """The request for `step` alone: its data is the first that `seed` draws (see `train_requests`)."""
    (request,) = train_requests(session_id, step, 1, seed, encoding)
    return request


def train(
    stub: pb_grpc.SplitLearningServiceStub, *requests: pb.TrainRequest, timeout: float = TIMEOUT
) -> list[pb.TrainResponse]:
    """Send `requests` on one Train stream and read it to its end: every reply. A refusal raises grpc.RpcError."""
    return list(stub.Train(iter(requests), timeout=timeout))


def train_steps(
    stub: pb_grpc.SplitLearningServiceStub,
    session_id: str,
    first: int,
    count: int,
    seed: int,
    timeout: float = TIMEOUT,
) -> None:
    """Train the `count` steps of `train_requests(session_id, first, count, seed)` on one stream; assert that each
    was answered, in order."""
    replies = train(stub, *train_requests(session_id, first, count, seed), timeout=timeout)
    assert [r.step for r in replies] == list(range(first, first + count))


def send_once(
    stub: pb_grpc.SplitLearningServiceStub, request: pb.TrainRequest, timeout: float = TIMEOUT
) -> pb.TrainResponse:
    """`request` on a fresh stream (as a client does after losing a reply): its first reply, not waiting for the
    stream's end."""
    reply: pb.TrainResponse = next(iter(stub.Train(iter([request]), timeout=timeout)))
    return reply


def model_state(arrays: Sequence[np.ndarray]) -> pb.ModelState:
    """`arrays` as a ModelState's weights, in order, each as `codec.write` encodes it (raw)."""
    message = pb.ModelState()
    for array in arrays:
        codec.write(array, message.weights.add())
    return message


def refused(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    """Run `call`, which must fail with grpc.RpcError: its (status code, details)."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    error: Any = info.value
    return error.code(), error.details() or ""


@contextmanager
def training(stub: pb_grpc.SplitLearningServiceStub, session: str, first: int = 0) -> Iterator[None]:
    """A Train stream open in `session` for the block (its step `first` applied): the session is in use, so a
    full server evicts it for no other (docs/sessions.md, "A full server")."""
    done = threading.Event()

    def requests() -> Iterator[pb.TrainRequest]:
        yield train_request(session, first)
        done.wait(TIMEOUT)

    replies = stub.Train(requests(), timeout=TIMEOUT)
    assert next(replies).step == first
    try:
        yield
    finally:
        done.set()
        list(replies)
