"""Attacker-sized strings (issue 16, item 3): ids echoed in logs and errors are clipped, handshake ids bounded."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest

from server_part import SplitServer
from splitlearning import codec, logs
from splitlearning.protocol import CLIENT_ID_METADATA_KEY, MAX_ID_LENGTH
from splitlearning.text import MESSAGE_LIMIT
from splitlearning.v1 import split_learning_pb2 as pb
from splitlearning.v1 import split_learning_pb2_grpc as pb_grpc
from tests.conftest import CUT_DIM, build_top, make_loss
from tests.raw_support import handshake

TIMEOUT = 20.0
HUGE = "S" * 50_000  # under this tiny model's message limit (64 KB)
# One line: a bound field, a peer, a method and a message clipped to text.MESSAGE_LIMIT.
LINE_LIMIT = 2_000


class Lines(logging.Handler):
    """The log lines as the text and JSON formats write them, bound fields included."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.addFilter(logs.ContextFilter())
        self.text: list[str] = []
        self.json: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.text.append(logs.TextFormatter().format(record))
        self.json.append(logs.JsonFormatter().format(record))


@pytest.fixture
def lines() -> Iterator[Lines]:
    handler = Lines()
    root = logging.getLogger()
    root.addHandler(handler)
    level = root.level
    root.setLevel(logging.DEBUG)
    yield handler
    root.removeHandler(handler)
    root.setLevel(level)


def assert_bounded(handler: Lines) -> None:
    assert handler.text, "nothing was logged"
    for line in handler.text + handler.json:
        assert len(line) < LINE_LIMIT, line[:300]
        assert HUGE[: MESSAGE_LIMIT + 1] not in line


def test_bound_fields_are_clipped_in_both_formats(lines: Lines) -> None:
    with logs.bind(session=HUGE, peer="ipv4:1.2.3.4\nforged INFO line"):
        logging.getLogger("split-test").warning("hello")
    assert_bounded(lines)
    assert "\n" not in lines.text[0]
    assert json.loads(lines.json[0])["session"].endswith("(49920 more characters)")


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[SplitServer, pb_grpc.SplitLearningServiceStub]]:
    split = SplitServer(build_top("plain", 0), make_loss(), "sgd", ["accuracy"], max_batch_size=8)
    port = split.start("127.0.0.1:0")
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield split, pb_grpc.SplitLearningServiceStub(channel)
    split.stop(grace=1.0)


def step_request(session_id: str) -> pb.TrainRequest:
    iv, labels = np.zeros((2, CUT_DIM), "float32"), np.zeros(2, "int64")
    return pb.TrainRequest(session_id=session_id, step=0, iv=codec.to_proto(iv), labels=codec.to_proto(labels))


@pytest.mark.parametrize("field", ["session_id", "client_id"])
def test_handshake_refuses_an_id_over_the_limit(
    server: tuple[SplitServer, pb_grpc.SplitLearningServiceStub], field: str
) -> None:
    _, stub = server
    too_long: dict[str, Any] = {field: "x" * (MAX_ID_LENGTH + 1)}
    with pytest.raises(grpc.RpcError) as info:
        handshake(stub, timeout=TIMEOUT, **too_long)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = info.value.details() or ""
    assert field in details and f"at most {MAX_ID_LENGTH}" in details and f"got {MAX_ID_LENGTH + 1}" in details
    assert len(details) < 300


def test_handshake_takes_an_id_at_the_limit(server: tuple[SplitServer, pb_grpc.SplitLearningServiceStub]) -> None:
    _, stub = server
    assert handshake(stub, client_id="c" * MAX_ID_LENGTH, timeout=TIMEOUT).session_id


def test_a_huge_session_id_is_clipped_in_the_refusal_and_the_logs(
    server: tuple[SplitServer, pb_grpc.SplitLearningServiceStub], lines: Lines
) -> None:
    _, stub = server
    with pytest.raises(grpc.RpcError) as info:
        stub.Predict(pb.PredictRequest(session_id=HUGE), timeout=TIMEOUT)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # the iv is missing: checked first
    with pytest.raises(grpc.RpcError) as info:
        stub.Train(iter([step_request(HUGE)]), timeout=TIMEOUT).next()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # no session has such an id
    assert "more characters" in (info.value.details() or "")
    assert len(info.value.details() or "") < LINE_LIMIT
    assert_bounded(lines)


def test_a_huge_client_id_in_metadata_is_refused(
    server: tuple[SplitServer, pb_grpc.SplitLearningServiceStub], lines: Lines
) -> None:
    _, stub = server
    metadata = [(CLIENT_ID_METADATA_KEY, b"c" * 4000)]
    with pytest.raises(grpc.RpcError) as info:
        stub.Train(iter([pb.TrainRequest(session_id="any", step=0)]), metadata=metadata, timeout=TIMEOUT).next()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = info.value.details() or ""
    assert CLIENT_ID_METADATA_KEY in details and f"at most {MAX_ID_LENGTH}" in details and "got 4000" in details
    assert_bounded(lines)
