"""Both parts must train with the same optimizer: the handshake carries the client's, and the server refuses
another one with FAILED_PRECONDITION naming each difference, client vs server (docs/protocol.md, Handshake)."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import keras
import pytest

from server_part import SplitServer
from splitlearning.optimizers import OptimizerSettings
from splitlearning.v1 import split_learning_pb2 as pb
from splitlearning.v1 import split_learning_pb2_grpc as pb_grpc
from tests.conftest import CUT_DIM, build_top, make_loss


def settings(optimizer: keras.optimizers.Optimizer) -> pb.OptimizerSettings:
    return OptimizerSettings.of(optimizer).to_proto()


def test_the_same_settings_agree_and_every_difference_is_named() -> None:
    adam = OptimizerSettings.of(keras.optimizers.Adam(3e-3))
    assert adam.differences(OptimizerSettings.from_proto(adam.to_proto())) == []
    assert adam.differences(OptimizerSettings.of(keras.optimizers.SGD(3e-3))) == ["optimizer: client adam, server sgd"]
    other = OptimizerSettings.of(keras.optimizers.Adam(1e-2, beta_1=0.8))
    assert adam.differences(other) == ["beta_1: client 0.9, server 0.8", "learning_rate: client 0.003, server 0.01"]
    # float32 is what the optimizer holds: a value that rounds to the same float32 is the same setting
    assert adam.differences(OptimizerSettings("adam", {**adam.config, "learning_rate": 0.003000000001})) == []
    # keys that only one side states (another Keras version's) are not compared
    assert adam.differences(OptimizerSettings("adam", {"learning_rate": adam.config["learning_rate"]})) == []


@pytest.fixture
def stub() -> Iterator[pb_grpc.SplitLearningServiceStub]:
    server = SplitServer(build_top(), make_loss(), keras.optimizers.Adam(3e-3), ["accuracy"])
    with server, grpc.insecure_channel(f"127.0.0.1:{server.start('127.0.0.1:0')}") as channel:
        yield pb_grpc.SplitLearningServiceStub(channel)


def handshake(stub: pb_grpc.SplitLearningServiceStub, optimizer: pb.OptimizerSettings | None) -> pb.HandshakeResponse:
    request = pb.HandshakeRequest(
        protocol_version=1, contract=pb.CutContract(iv=pb.TensorSpec(shape=[CUT_DIM], dtype=pb.DTYPE_FLOAT32))
    )
    if optimizer is not None:
        request.optimizer.CopyFrom(optimizer)
    reply: pb.HandshakeResponse = stub.Handshake(request, timeout=10)
    return reply


def test_a_client_with_another_learning_rate_is_refused_naming_both(stub: pb_grpc.SplitLearningServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        handshake(stub, settings(keras.optimizers.Adam(1e-2)))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = refused.value.details() or ""
    assert details.startswith("optimizer mismatch: learning_rate: client 0.01, server 0.003;")
    assert "--optimizer and --learning-rate" in details


def test_another_optimizer_is_refused_and_the_same_one_is_accepted(stub: pb_grpc.SplitLearningServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        handshake(stub, settings(keras.optimizers.SGD(3e-3)))
    assert "optimizer: client sgd, server adam" in (refused.value.details() or "")
    assert handshake(stub, settings(keras.optimizers.Adam(3e-3))).session_id
    assert handshake(stub, None).session_id  # not stated: not checked


def test_a_config_that_is_no_json_object_is_invalid(stub: pb_grpc.SplitLearningServiceStub) -> None:
    for config in ("[1]", "{", "x" * 20_000):
        with pytest.raises(grpc.RpcError) as refused:
            handshake(stub, pb.OptimizerSettings(name="adam", config_json=config))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, config
        assert (refused.value.details() or "").startswith("optimizer.config_json: ")
