"""docs/protocol.md's status table against live servers: every row's status produced by a real request.

The table is parsed from the document; each row's name must have a case here and each case a row, so a row
added without a case, a case whose row is gone, or a status that changes fails this test.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import keras
import numpy as np
import pytest

from server_part import SplitServer
from splitlearning import codec
from splitlearning.contract import CLIENT_ID_METADATA_KEY
from splitlearning.v1 import split_learning_pb2 as pb
from splitlearning.v1 import split_learning_pb2_grpc as pb_grpc
from tests.conftest import CUT_DIM, NUM_CLASSES, build_top, make_loss
from tests.raw_support import SERVICE, UNDECODABLE
from tests.ushape_support import build_middle

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"
TOKEN = "doc-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
LIMIT = 8
TIMEOUT = 20.0


def status_table() -> dict[str, str]:
    """Row name -> status, from the table under '## Statuses'."""
    text = DOC.read_text(encoding="utf-8").split("## Statuses", 1)[1]
    rows = re.findall(r"^\| `([a-z0-9-]+)` \| [^|]+ \| `([A-Z_]+)` \|", text, re.MULTILINE)
    table = dict(rows)
    assert len(table) == len(rows), "a row name appears twice"
    return table


@dataclass
class Peer:
    """A raw stub on a live server, sending the token when the server wants one."""

    server: SplitServer
    channel: grpc.Channel
    stub: pb_grpc.SplitLearningServiceStub
    metadata: tuple[tuple[str, Any], ...] = AUTH
    streams: list[Any] = field(default_factory=list)

    def handshake(self, **fields: Any) -> pb.HandshakeResponse:
        fields.setdefault("protocol_version", 1)
        fields.setdefault("contract", pb.CutContract(iv=pb.TensorSpec(shape=[CUT_DIM], dtype=pb.DTYPE_FLOAT32)))
        reply: pb.HandshakeResponse = self.stub.Handshake(
            pb.HandshakeRequest(**fields), timeout=TIMEOUT, metadata=self.metadata
        )
        return reply

    def train(self, *requests: pb.TrainRequest, client: str | None = None) -> list[pb.TrainResponse]:
        return list(self.stub.Train(iter(requests), timeout=TIMEOUT, metadata=self._with(client)))

    def open_stream(self, first: pb.TrainRequest, client: str | None = None) -> Callable[[], None]:
        """A Train stream that stays open after its first reply; the returned call ends it."""
        done = threading.Event()

        def requests() -> Iterator[pb.TrainRequest]:
            yield first
            done.wait(TIMEOUT)

        replies = self.stub.Train(requests(), timeout=TIMEOUT, metadata=self._with(client))
        next(replies)

        def end() -> None:
            done.set()
            list(replies)

        return end

    def evaluate(self, **fields: Any) -> pb.EvaluateResponse:
        reply: pb.EvaluateResponse = self.stub.Evaluate(
            pb.EvaluateRequest(**fields), timeout=TIMEOUT, metadata=self.metadata
        )
        return reply

    def predict(self, **fields: Any) -> pb.PredictResponse:
        reply: pb.PredictResponse = self.stub.Predict(
            pb.PredictRequest(**fields), timeout=TIMEOUT, metadata=self.metadata
        )
        return reply

    def close(self, **fields: Any) -> pb.CloseSessionResponse:
        reply: pb.CloseSessionResponse = self.stub.CloseSession(
            pb.CloseSessionRequest(**fields), timeout=TIMEOUT, metadata=self.metadata
        )
        return reply

    def _with(self, client: str | None) -> tuple[tuple[str, Any], ...]:
        return self.metadata + (((CLIENT_ID_METADATA_KEY, client.encode()),) if client is not None else ())


def iv(n: int = 4, seed: int = 0, value: float | None = None) -> pb.Tensor:
    array = np.random.default_rng(seed).normal(size=(n, CUT_DIM)).astype("float32")
    return codec.to_proto(array if value is None else np.full_like(array, value))


def labels(n: int = 4) -> pb.Tensor:
    return codec.to_proto(np.arange(n, dtype="int64") % NUM_CLASSES)


def step(session: str, number: int, n: int = 4, **fields: Any) -> pb.TrainRequest:
    fields.setdefault("iv", iv(n, seed=number))
    fields.setdefault("labels", labels(n))
    return pb.TrainRequest(session_id=session, step=number, **fields)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Peer]]:
    servers: list[SplitServer] = []
    channels: list[grpc.Channel] = []

    def start(cut: str = "standard", top: keras.Model | None = None, **kwargs: Any) -> Peer:
        kwargs.setdefault("max_batch_size", LIMIT)
        kwargs.setdefault("auth_token", TOKEN)
        if cut == "ushape":
            server = SplitServer(build_middle(), optimizer="sgd", cut="ushape", **kwargs)
        else:
            kwargs.setdefault("checkpoint_dir", tmp_path / f"ckpt{len(servers)}")
            server = SplitServer(top or build_top(), make_loss(), keras.optimizers.SGD(0.1), ["accuracy"], **kwargs)
        servers.append(server)
        channel = grpc.insecure_channel(f"127.0.0.1:{server.start('127.0.0.1:0')}")
        channels.append(channel)
        return Peer(server, channel, pb_grpc.SplitLearningServiceStub(channel))

    yield start
    for channel in channels:
        channel.close()
    for server in servers:
        server.stop(grace=1.0)


# -- one case per row: each makes its row's status happen (the call that must fail is the last one) ------------


def case_token(peer: Peer) -> None:
    peer.metadata = ()
    peer.handshake()


def case_undecodable(peer: Peer) -> None:
    identity = lambda data: data  # noqa: E731 (bytes on the wire as they are)
    predict = peer.channel.unary_unary(SERVICE + "Predict", request_serializer=identity, response_deserializer=identity)
    predict(UNDECODABLE, timeout=TIMEOUT, metadata=AUTH)


def case_too_big(peer: Peer) -> None:
    session = peer.handshake().session_id
    peer.predict(session_id=session, iv=iv(LIMIT * 1000))


def case_busy(peer: Peer) -> None:
    session = peer.handshake().session_id
    end = peer.open_stream(step(session, 0))  # the server's one slot, its request received
    try:
        peer.handshake()
    finally:
        end()


def case_stopping(peer: Peer) -> None:
    peer.server.sessions.stop()
    peer.handshake()


def case_bug(peer: Peer) -> None:
    session = peer.handshake().session_id

    def broken(*_: Any) -> None:
        raise ZeroDivisionError("a bug")

    peer.server.session(session).trainer.predict = broken  # type: ignore[method-assign, assignment]
    peer.predict(session_id=session, iv=iv())


def case_version(peer: Peer) -> None:
    peer.handshake(protocol_version=2)


def case_mode(peer: Peer) -> None:
    peer.handshake(mode=pb.CUT_MODE_USHAPE)


def case_contract(peer: Peer) -> None:
    peer.handshake(contract=pb.CutContract(iv=pb.TensorSpec(shape=[CUT_DIM + 1], dtype=pb.DTYPE_FLOAT32)))


def case_spec(peer: Peer) -> None:
    peer.handshake(contract=pb.CutContract(iv=pb.TensorSpec(shape=[CUT_DIM], dtype=77)))  # type: ignore[arg-type]


def case_batch_limit(peer: Peer) -> None:
    peer.handshake(max_batch_size=LIMIT + 1)


def case_inquiry_session(peer: Peer) -> None:
    session = peer.handshake().session_id
    peer.handshake(contract=pb.CutContract(), session_id=session)


def case_in_use(peer: Peer) -> None:
    session = peer.handshake(client_id="holder").session_id
    end = peer.open_stream(step(session, 0), client="holder")
    try:
        peer.handshake(client_id="other", session_id=session)
    finally:
        end()


def case_full(peer: Peer) -> None:
    peer.handshake()
    peer.handshake()


def case_id(peer: Peer) -> None:
    peer.handshake(session_id="../etc")


def case_no_session(peer: Peer) -> None:
    peer.predict(iv=iv())


def case_unknown_session(peer: Peer) -> None:
    peer.predict(session_id="nosuchsession", iv=iv())


def case_unloaded(peer: Peer) -> None:
    session = peer.handshake().session_id
    assert peer.close(session_id=session).checkpointed
    peer.predict(session_id=session, iv=iv())


def case_tensor(peer: Peer) -> None:
    session = peer.handshake().session_id
    peer.train(step(session, 0, iv=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[4, CUT_DIM], content=bytes(7))))


def case_encoding(peer: Peer) -> None:
    session = peer.handshake().session_id  # raw agreed (the server allows nothing else)
    peer.predict(session_id=session, iv=codec.to_proto(np.ones((2, CUT_DIM), "float32"), pb.ENCODING_INT8))


def case_batch(peer: Peer) -> None:
    session = peer.handshake().session_id
    peer.train(step(session, 0, n=LIMIT + 1, labels=labels(LIMIT + 1)))


def case_two_sessions(peer: Peer) -> None:
    first, second = peer.handshake().session_id, peer.handshake().session_id
    peer.train(step(first, 0), step(second, 0))


def case_not_holder(peer: Peer) -> None:
    session = peer.handshake(client_id="holder").session_id
    peer.train(step(session, 0), client="stranger")


def case_order(peer: Peer) -> None:
    session = peer.handshake().session_id
    peer.train(step(session, 1))


def case_resend(peer: Peer) -> None:
    session = peer.handshake().session_id
    peer.train(step(session, 0))
    peer.train(step(session, 0, iv=iv(seed=5)))  # step 0 again, with another IV


def case_micro_plan(peer: Peer) -> None:
    session = peer.handshake().session_id
    peer.train(step(session, 0, n=2, labels=labels(2), micro_batches=2, micro_batch=1, step_samples=4))


def case_micro_fields(peer: Peer) -> None:
    session = peer.handshake().session_id
    peer.train(step(session, 0, n=2, labels=labels(2), micro_batches=2, micro_batch=0, step_samples=0))


def case_diverged(peer: Peer) -> None:
    session = peer.handshake(encodings=[pb.ENCODING_INT8]).session_id
    huge = codec.to_proto(np.full((4, CUT_DIM), 1e30, "float32"), pb.ENCODING_INT8)
    peer.train(step(session, 0, iv=huge))


def case_ushape_labels(peer: Peer) -> None:
    session = peer.handshake(mode=pb.CUT_MODE_USHAPE).session_id
    peer.train(step(session, 0))


def case_in_flight(peer: Peer) -> None:
    session = peer.handshake(mode=pb.CUT_MODE_USHAPE).session_id
    forward = pb.TrainRequest(session_id=session, step=0, iv=iv())
    end = peer.open_stream(forward)  # its forward ran; its backward is awaited
    try:
        peer.train(forward)
    finally:
        end()


def case_ushape_evaluate(peer: Peer) -> None:
    session = peer.handshake(mode=pb.CUT_MODE_USHAPE).session_id
    peer.evaluate(session_id=session, iv=iv(), labels=labels())


def case_partner_step(peer: Peer) -> None:
    session = peer.handshake().session_id
    peer.evaluate(session_id=session, iv=iv(), labels=labels(), step=5)


def case_lost_reply(peer: Peer) -> None:
    session = peer.handshake().session_id
    peer.train(step(session, 0))
    peer.predict(session_id=session, iv=iv(), step=0)  # the server is at step 1; 0 was applied


def case_close_in_use(peer: Peer) -> None:
    session = peer.handshake(client_id="holder").session_id
    end = peer.open_stream(step(session, 0), client="holder")
    try:
        peer.close(session_id=session, client_id="other")
    finally:
        end()


def _diverging_top() -> keras.Model:
    """A top whose outputs overflow float32 on large IVs, so its gradients are NaN."""
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [keras.Input((CUT_DIM,)), keras.layers.Dense(NUM_CLASSES, kernel_initializer=keras.initializers.Constant(1e30))]
    )


# Row -> (its case, the server it needs).
CASES: dict[str, tuple[Callable[[Peer], None], dict[str, Any]]] = {
    "token": (case_token, {}),
    "undecodable": (case_undecodable, {}),
    "too-big": (case_too_big, {}),
    "busy": (case_busy, {"max_workers": 1}),
    "stopping": (case_stopping, {}),
    "bug": (case_bug, {}),
    "version": (case_version, {}),
    "mode": (case_mode, {}),
    "contract": (case_contract, {}),
    "spec": (case_spec, {}),
    "batch-limit": (case_batch_limit, {}),
    "inquiry-session": (case_inquiry_session, {}),
    "in-use": (case_in_use, {}),
    "full": (case_full, {"max_sessions": 1}),
    "id": (case_id, {}),
    "no-session": (case_no_session, {}),
    "unknown-session": (case_unknown_session, {}),
    "unloaded": (case_unloaded, {}),
    "tensor": (case_tensor, {}),
    "encoding": (case_encoding, {}),
    "batch": (case_batch, {}),
    "two-sessions": (case_two_sessions, {}),
    "not-holder": (case_not_holder, {}),
    "order": (case_order, {}),
    "resend": (case_resend, {}),
    "micro-plan": (case_micro_plan, {}),
    "micro-fields": (case_micro_fields, {}),
    "diverged": (case_diverged, {"top": "diverging", "wire_encodings": ("raw", "int8")}),
    "ushape-labels": (case_ushape_labels, {"cut": "ushape"}),
    "in-flight": (case_in_flight, {"cut": "ushape"}),
    "ushape-evaluate": (case_ushape_evaluate, {"cut": "ushape"}),
    "partner-step": (case_partner_step, {}),
    "lost-reply": (case_lost_reply, {}),
    "close-in-use": (case_close_in_use, {}),
}


def test_every_row_has_a_case_and_every_case_a_row() -> None:
    table = status_table()
    assert len(table) >= 30, "the status table was not found or lost rows"
    assert sorted(table) == sorted(CASES)


@pytest.mark.parametrize("row", sorted(CASES))
def test_row_status_is_what_the_server_answers(row: str, serve: Callable[..., Peer]) -> None:
    expected = status_table().get(row)
    assert expected is not None, f"row {row!r} is not in docs/protocol.md's status table"
    case, needs = CASES[row]
    options = dict(needs)
    if options.get("top") == "diverging":
        options["top"] = _diverging_top()
    peer = serve(**options)
    with pytest.raises(grpc.RpcError) as refused:
        case(peer)
    error: Any = refused.value
    assert error.code().name == expected, f"{row}: {error.code().name} ({error.details()}), documented {expected}"
