"""In the U-shape the labels never leave the client: every message it sends is recorded and searched."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf.message import Message

import client_part.transport as transport_module
from client_part import SplitClient
from server_part import SplitServer
from splitlearning.v1 import split_learning_pb2 as pb
from tests.conftest import build_bottom, build_top, make_data, make_loss
from tests.ushape_support import build_head, build_middle

BATCH = 16


class Recorder(grpc.UnaryUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Keeps every request message the client sends, on unary calls and on the training stream."""

    def __init__(self) -> None:
        self.sent: list[Message] = []

    def intercept_unary_unary(self, continuation: Callable[..., Any], details: Any, request: Message) -> Any:
        self.sent.append(request)
        return continuation(details, request)

    def intercept_stream_stream(self, continuation: Callable[..., Any], details: Any, requests: Iterator[Any]) -> Any:
        def recorded() -> Iterator[Any]:
            for request in requests:  # a framing.Outgoing: kept as the message its bytes on the wire are
                self.sent.append(pb.TrainRequest.FromString(request.serialize()))
                yield request

        return continuation(details, recorded())


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    """Every channel the client's transport opens in this test goes through a `Recorder`."""
    recorder = Recorder()
    plain = grpc.insecure_channel
    monkeypatch.setattr(
        transport_module.grpc, "insecure_channel", lambda *a, **k: grpc.intercept_channel(plain(*a, **k), recorder)
    )
    return recorder


def label_byte_patterns(y: np.ndarray) -> list[bytes]:
    """The label batches as they could be encoded on the wire, in any plausible dtype."""
    patterns = []
    for start in range(0, len(y), BATCH):
        batch = y[start : start + BATCH]
        for dtype in ("<i8", "<i4", "<f4", "<f8", "u1"):
            patterns.append(np.ascontiguousarray(batch, dtype=dtype).tobytes())
    return patterns


def labels_found(sent: list[Message], y: np.ndarray) -> list[str]:
    found = []
    patterns = label_byte_patterns(y)
    for message in sent:
        if "labels" in message.DESCRIPTOR.fields_by_name and message.HasField("labels"):
            found.append(f"{type(message).__name__}.labels")
        wire = message.SerializeToString()
        found += [f"label bytes in {type(message).__name__}" for p in patterns if len(p) >= 16 and p in wire]
    return found


def run_client(target: str, x: np.ndarray, y: np.ndarray, **kwargs: Any) -> None:
    with SplitClient(build_bottom(seed=3), "sgd", target=target, connect_timeout=10, **kwargs) as client:
        client.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
        client.evaluate(x, y, batch_size=BATCH)
        client.predict(x, batch_size=BATCH)


def test_ushape_labels_never_appear_in_any_message(recorder: Recorder) -> None:
    x, y = make_data(n=48)
    server = SplitServer(build_middle(seed=3), optimizer="sgd", cut="ushape")
    target = f"127.0.0.1:{server.start('127.0.0.1:0')}"
    try:
        run_client(target, x, y, head=build_head(seed=3), loss=make_loss(), metrics=["accuracy"])
    finally:
        server.stop(grace=1.0)
    kinds = {type(m).__name__ for m in recorder.sent}
    assert {"HandshakeRequest", "TrainRequest", "PredictRequest"} <= kinds  # training, evaluating, predicting
    assert "EvaluateRequest" not in kinds  # the U-shape evaluates on the client
    assert sum(type(m).__name__ == "TrainRequest" for m in recorder.sent) == 2 * 3  # two exchanges per step
    assert not labels_found(recorder.sent, y)


def test_the_search_finds_labels_in_the_standard_cut(recorder: Recorder) -> None:
    """Guards the test above: the same recorder and search do see the labels when the cut sends them."""
    x, y = make_data(n=48)
    server = SplitServer(build_top(seed=3), make_loss(), "sgd", ["accuracy"])
    target = f"127.0.0.1:{server.start('127.0.0.1:0')}"
    try:
        run_client(target, x, y)
    finally:
        server.stop(grace=1.0)
    found = labels_found(recorder.sent, y)
    assert "TrainRequest.labels" in found and "EvaluateRequest.labels" in found
    assert any(f.startswith("label bytes") for f in found)
