"""The running metrics as docs/protocol.md states them: training and evaluation keep separate accumulators."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import keras
import numpy as np
import pytest

from server_part import SplitServer
from splitlearning import codec
from splitlearning.protocol import PROTOCOL_VERSION
from splitlearning.v1 import split_learning_pb2 as pb
from splitlearning.v1 import split_learning_pb2_grpc as pb_grpc
from tests.conftest import CUT_DIM, NUM_CLASSES, build_top, make_loss

TIMEOUT = 20.0


def batch(n: int, seed: int) -> tuple[pb.Tensor, pb.Tensor]:
    rng = np.random.default_rng(seed)
    iv = rng.normal(size=(n, CUT_DIM)).astype("float32")
    labels = rng.integers(0, NUM_CLASSES, size=n).astype("int64")
    return codec.to_proto(iv), codec.to_proto(labels)


@pytest.fixture
def stub() -> Iterator[pb_grpc.SplitLearningServiceStub]:
    server = SplitServer(build_top("plain", 0), make_loss(), keras.optimizers.SGD(0.1), ["accuracy"], max_batch_size=16)
    port = server.start("127.0.0.1:0")
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield pb_grpc.SplitLearningServiceStub(channel)
    channel.close()
    server.stop(grace=1.0)


def open_session(stub: pb_grpc.SplitLearningServiceStub) -> str:
    contract = pb.CutContract(iv=pb.TensorSpec(shape=[CUT_DIM], dtype=pb.DTYPE_FLOAT32))
    request = pb.HandshakeRequest(protocol_version=PROTOCOL_VERSION, contract=contract, max_batch_size=16)
    return str(stub.Handshake(request, timeout=TIMEOUT).session_id)


def step(stub: pb_grpc.SplitLearningServiceStub, session: str, number: int, n: int) -> list[float]:
    iv, labels = batch(n, seed=number)
    request = pb.TrainRequest(session_id=session, step=number, iv=iv, labels=labels, reset_metrics=number == 0)
    (reply,) = list(stub.Train(iter([request]), timeout=TIMEOUT))
    return list(reply.metrics)


def evaluate(stub: pb_grpc.SplitLearningServiceStub, session: str, n: int, seed: int, reset: bool) -> list[float]:
    iv, labels = batch(n, seed)
    request = pb.EvaluateRequest(session_id=session, iv=iv, labels=labels, reset_metrics=reset)
    return list(stub.Evaluate(request, timeout=TIMEOUT).metrics)


def test_evaluate_between_steps_leaves_the_training_metrics_alone(stub: pb_grpc.SplitLearningServiceStub) -> None:
    """Train step, Evaluate, train step: the second step's running values equal those of the two steps alone
    (two sessions start from the same initial weights). Batches of 5, 3 and 7 make a shared accumulator show."""
    alone, interrupted = open_session(stub), open_session(stub)
    expected = [step(stub, alone, 0, 5), step(stub, alone, 1, 3)]
    first = step(stub, interrupted, 0, 5)
    evaluate(stub, interrupted, 7, seed=99, reset=True)
    second = step(stub, interrupted, 1, 3)
    assert [first, second] == expected


def test_evaluate_running_values_hold_only_evaluated_batches(stub: pb_grpc.SplitLearningServiceStub) -> None:
    """Evaluate (reset), train step, Evaluate (no reset): the running values are the evaluated batches' alone,
    weighted by batch size; the training step's batch is not in them."""
    session, reference = open_session(stub), open_session(stub)
    step(stub, session, 0, 5)
    step(stub, reference, 0, 5)
    first = evaluate(stub, session, 7, seed=99, reset=True)
    step(stub, session, 1, 3)
    step(stub, reference, 1, 3)
    running = evaluate(stub, session, 3, seed=98, reset=False)
    second = evaluate(stub, reference, 3, seed=98, reset=True)  # the second batch alone, same weights
    expected = [(7 * a + 3 * b) / 10 for a, b in zip(first, second, strict=True)]
    np.testing.assert_allclose(running, expected, rtol=1e-6)
