"""Refused requests over a raw stub: the exact status, a message naming expected vs. got, and no state change."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import grpc
import keras
import numpy as np
import pytest

from server_part import SplitServer
from splitlearning import codec
from splitlearning.protocol import PROTOCOL_VERSION
from splitlearning.v1 import split_learning_pb2 as pb
from splitlearning.v1 import split_learning_pb2_grpc as pb_grpc
from tests import raw_support as raw
from tests.conftest import (
    CUT_DIM,
    NUM_CLASSES,
    StartServer,
    assert_same_snapshot,
    build_top,
    make_loss,
    server_snapshot,
)
from tests.raw_support import UNDECODABLE, connect, cut_contract, handshake, send_raw

MAX_BATCH = 8
TIMEOUT = 20.0
Code = grpc.StatusCode

# Every Train stream here: its requests on one stream, every reply, within TIMEOUT.
train = partial(raw.train, timeout=TIMEOUT)


def ivs(n: int, seed: int = 0, dtype: str = "float32") -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, CUT_DIM)).astype(dtype)


def labels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, NUM_CLASSES, size=n).astype("int64")


@dataclass
class Served:
    server: SplitServer
    stub: pb_grpc.SplitLearningServiceStub
    session: str
    replies: list[pb.TrainResponse]
    requests: list[pb.TrainRequest]
    channel: grpc.Channel

    @property
    def next_step(self) -> int:
        return len(self.replies)

    def train_request(self, iv: Any = None, y: Any = None, **fields: Any) -> pb.TrainRequest:
        """A request for the next step, valid unless told otherwise; it also asks to reset the metrics."""
        fields.setdefault("session_id", self.session)
        fields.setdefault("step", self.next_step)
        fields.setdefault("reset_metrics", True)
        return pb.TrainRequest(
            iv=iv if isinstance(iv, pb.Tensor) else codec.to_proto(ivs(4) if iv is None else iv),
            labels=y if isinstance(y, pb.Tensor) else codec.to_proto(labels(4) if y is None else y),
            **fields,
        )

    def refused(self, call: Callable[[], object], code: grpc.StatusCode, *fragments: str) -> str:
        """`call` fails with `code`, its details name every fragment, and the server state is untouched."""
        before = server_snapshot(self.server)
        with pytest.raises(grpc.RpcError) as info:
            call()
        error: Any = info.value
        assert error.code() == code, error.details()
        details = error.details()
        for fragment in fragments:
            assert fragment in details, f"{fragment!r} not in {details!r}"
        assert_same_snapshot(before, server_snapshot(self.server))
        return details


def open_session(port: int) -> tuple[grpc.Channel, pb_grpc.SplitLearningServiceStub, str]:
    """A channel to the server on `port`, a stub, and the id of a new session opened there."""
    channel, stub = connect(f"127.0.0.1:{port}")
    return channel, stub, handshake(stub, contract=cut_contract(), max_batch_size=MAX_BATCH, timeout=TIMEOUT).session_id


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    """One server (Adam, BatchNormalization) that has applied steps 0 and 1; every test leaves it so."""
    server = SplitServer(
        build_top("batchnorm", 0), make_loss(), keras.optimizers.Adam(0.01), ["accuracy"], max_batch_size=MAX_BATCH
    )
    channel, stub, session = open_session(server.start("127.0.0.1:0"))
    requests = [
        pb.TrainRequest(
            session_id=session,
            step=step,
            iv=codec.to_proto(ivs(4, seed=step)),
            labels=codec.to_proto(labels(4, seed=step)),
            reset_metrics=step == 0,
        )
        for step in (0, 1)
    ]
    replies = train(stub, *requests)
    assert [r.step for r in replies] == [0, 1]
    assert server.trainer.iterations == 2
    # Non-zero optimizer slots and metrics, so "unchanged" means something.
    assert any(np.any(v.numpy() != 0) for v in server.trainer.optimizer.variables[2:])
    yield Served(server, stub, session, replies, requests, channel)
    channel.close()
    server.stop(grace=1.0)


# -- Handshake ---------------------------------------------------------------------------------------------


def handshake_call(served: Served, **fields: Any) -> Callable[[], object]:
    """A call of `handshake` on the served stub for `Served.refused`: the full contract (label included; None: no
    contract) and this server's batch limit unless `fields` say otherwise."""
    fields.setdefault("contract", cut_contract())
    fields.setdefault("max_batch_size", MAX_BATCH)
    return lambda: handshake(served.stub, timeout=TIMEOUT, **fields)


def test_good_handshake_reports_the_session(served: Served) -> None:
    before = server_snapshot(served.server)
    reply = handshake_call(served, session_id=served.session, max_batch_size=4)()
    assert isinstance(reply, pb.HandshakeResponse)
    assert reply.protocol_version == PROTOCOL_VERSION
    assert reply.session_id == served.session
    assert reply.next_step == 2
    assert reply.max_batch_size == MAX_BATCH
    assert reply.metric_names[0] == "loss"
    assert "accuracy" in reply.metric_names
    expected = cut_contract()  # what the client states, plus the output the server states for Predict
    expected.output.CopyFrom(pb.TensorSpec(shape=[*served.server.model.outputs[0].shape[1:]], dtype=pb.DTYPE_FLOAT32))
    assert reply.contract == expected
    assert_same_snapshot(before, server_snapshot(served.server))


@pytest.mark.parametrize("version", [0, PROTOCOL_VERSION + 1, 99])
def test_handshake_wrong_protocol_version(served: Served, version: int) -> None:
    served.refused(
        handshake_call(served, protocol_version=version),
        Code.FAILED_PRECONDITION,
        f"protocol version {version}",
        f"expected {PROTOCOL_VERSION}",
    )


@pytest.mark.parametrize(
    ("shape", "dtype", "got"),
    [
        ((CUT_DIM + 1,), pb.DTYPE_FLOAT32, f"[batch, {CUT_DIM + 1}] float32"),
        ((CUT_DIM, 1), pb.DTYPE_FLOAT32, f"[batch, {CUT_DIM}, 1] float32"),
        ((CUT_DIM,), pb.DTYPE_FLOAT64, f"[batch, {CUT_DIM}] float64"),
        ((CUT_DIM,), pb.DTYPE_FLOAT16, f"[batch, {CUT_DIM}] float16"),
    ],
)
def test_handshake_wrong_cut_contract(served: Served, shape: tuple[int, ...], dtype: Any, got: str) -> None:
    served.refused(
        handshake_call(served, contract=cut_contract(shape, dtype)),
        Code.FAILED_PRECONDITION,
        f"expects iv [batch, {CUT_DIM}] float32",
        f"sends {got}",
    )


def test_handshake_wrong_label_contract(served: Served) -> None:
    contract = cut_contract()
    contract.label.dtype = pb.DTYPE_INT32
    served.refused(
        handshake_call(served, contract=contract),
        Code.FAILED_PRECONDITION,
        "expects label [batch] int64",
        "sends [batch] int32",
    )


def test_handshake_without_label_spec_is_accepted(served: Served) -> None:
    reply: Any = handshake_call(served, contract=pb.CutContract(iv=cut_contract().iv))()
    assert reply.contract.label == pb.TensorSpec(shape=[], dtype=pb.DTYPE_INT64)


@pytest.mark.parametrize(
    "request_fields",
    [
        {},
        {"contract": pb.CutContract(label=cut_contract().label)},
        {"contract": pb.CutContract(iv=pb.TensorSpec())},
        {"contract": pb.CutContract(), "encodings": [pb.ENCODING_INT8], "max_batch_size": 10**6},
    ],
    ids=["no-contract", "no-iv", "empty-iv", "any-batch"],
)
def test_handshake_without_iv_spec_answers_the_contract_and_opens_no_session(
    served: Served, request_fields: dict[str, Any]
) -> None:
    """An inquiry: the server's contract (both specs) and limits, no session (docs/protocol.md)."""
    before = server_snapshot(served.server)
    request = pb.HandshakeRequest(protocol_version=PROTOCOL_VERSION, **request_fields)
    reply = served.stub.Handshake(request, timeout=TIMEOUT)
    expected = cut_contract()
    expected.output.CopyFrom(pb.TensorSpec(shape=[NUM_CLASSES], dtype=pb.DTYPE_FLOAT32))
    assert reply.contract == expected
    assert (reply.session_id, reply.next_step) == ("", 0)
    assert reply.protocol_version == PROTOCOL_VERSION
    assert reply.max_batch_size == MAX_BATCH
    assert reply.mode == pb.CUT_MODE_STANDARD
    assert reply.encoding == pb.ENCODING_RAW
    assert list(reply.metric_names) == ["loss", "accuracy"]
    assert_same_snapshot(before, server_snapshot(served.server))


def test_inquiry_checks_the_protocol_version(served: Served) -> None:
    served.refused(handshake_call(served, protocol_version=9, contract=None), Code.FAILED_PRECONDITION, "version 9")


def test_inquiry_naming_a_session_is_refused(served: Served) -> None:
    served.refused(
        handshake_call(served, contract=None, session_id=served.session),
        Code.INVALID_ARGUMENT,
        "contract.iv is required to join a session",
    )


@pytest.mark.parametrize(
    ("shape", "dtype", "fragment"),
    [
        ((CUT_DIM,), pb.DTYPE_UNSPECIFIED, "dtype is missing"),
        ((CUT_DIM,), 77, "unknown or unspecified dtype 77"),
        ((0,), pb.DTYPE_FLOAT32, "must be positive, got [0]"),
        ((-5,), pb.DTYPE_FLOAT32, "must be positive, got [-5]"),
    ],
)
def test_handshake_malformed_iv_spec(served: Served, shape: tuple[int, ...], dtype: Any, fragment: str) -> None:
    served.refused(handshake_call(served, contract=cut_contract(shape, dtype)), Code.INVALID_ARGUMENT, fragment)


def test_handshake_batch_over_max(served: Served) -> None:
    served.refused(
        handshake_call(served, max_batch_size=MAX_BATCH + 1),
        Code.FAILED_PRECONDITION,
        f"batch size {MAX_BATCH + 1}",
        f"limit of {MAX_BATCH}",
    )


def test_handshake_unknown_session(served: Served) -> None:
    details = served.refused(handshake_call(served, session_id="nope"), Code.NOT_FOUND, "'nope'", "open a new session")
    assert served.session not in details, "the refusal names the held session: that id lets a client in"


# -- Train -------------------------------------------------------------------------------------------------


def refused_train(served: Served, request: pb.TrainRequest, code: grpc.StatusCode, *fragments: str) -> str:
    return served.refused(lambda: train(served.stub, request), code, *fragments)


@pytest.mark.parametrize(
    ("shape", "got"), [((4, CUT_DIM + 1), "[4, 6]"), ((4, CUT_DIM, 1), "[4, 5, 1]"), ((CUT_DIM,), "[5]")]
)
def test_train_wrong_iv_shape(served: Served, shape: tuple[int, ...], got: str) -> None:
    iv = np.zeros(shape, "float32")
    refused_train(served, served.train_request(iv), Code.INVALID_ARGUMENT, f"shape {got}", f"[batch, {CUT_DIM}]")


@pytest.mark.parametrize("dtype", ["float64", "float16", "int32"])
def test_train_wrong_iv_dtype(served: Served, dtype: str) -> None:
    iv = np.zeros((4, CUT_DIM), dtype)
    refused_train(served, served.train_request(iv), Code.INVALID_ARGUMENT, f"dtype {dtype}", "float32")


def test_train_iv_content_length_mismatch(served: Served) -> None:
    iv = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[4, CUT_DIM], content=bytes(4 * CUT_DIM * 4 - 4))
    refused_train(served, served.train_request(iv), Code.INVALID_ARGUMENT, "iv:", "needs 80 bytes", "got 76")


def test_train_labels_content_length_mismatch(served: Served) -> None:
    y = pb.Tensor(dtype=pb.DTYPE_INT64, shape=[4], content=bytes(33))
    refused_train(served, served.train_request(y=y), Code.INVALID_ARGUMENT, "labels:", "needs 32 bytes", "got 33")


def test_train_malformed_iv_dtype(served: Served) -> None:
    iv = pb.Tensor(dtype=pb.DTYPE_UNSPECIFIED, shape=[4, CUT_DIM], content=bytes(80))
    refused_train(served, served.train_request(iv), Code.INVALID_ARGUMENT, "iv:", "unspecified dtype")


def test_train_empty_batch(served: Served) -> None:
    request = served.train_request(np.zeros((0, CUT_DIM), "float32"), np.zeros((0,), "int64"))
    refused_train(served, request, Code.INVALID_ARGUMENT, "empty")


def test_train_batch_over_max(served: Served) -> None:
    n = MAX_BATCH + 1
    refused_train(
        served, served.train_request(ivs(n), labels(n)), Code.RESOURCE_EXHAUSTED, f"{n} samples", f"{MAX_BATCH}"
    )


@pytest.mark.parametrize("count", [3, 5, 0])
def test_train_labels_count_mismatch(served: Served, count: int) -> None:
    refused_train(
        served, served.train_request(y=labels(count)), Code.INVALID_ARGUMENT, f"{count} labels", "batch of 4 samples"
    )


@pytest.mark.parametrize(
    ("values", "fragment"), [([0, 1, 2, NUM_CLASSES], f"max {NUM_CLASSES}"), ([0, -1, 2, 1], "min -1")]
)
def test_train_labels_out_of_range(served: Served, values: list[int], fragment: str) -> None:
    y = np.array(values, "int64")
    refused_train(served, served.train_request(y=y), Code.INVALID_ARGUMENT, f"[0, {NUM_CLASSES})", fragment)


def test_train_labels_wrong_dtype(served: Served) -> None:
    y = labels(4).astype("int32")
    refused_train(served, served.train_request(y=y), Code.INVALID_ARGUMENT, "labels: dtype int32", "int64")


def test_train_labels_wrong_shape(served: Served) -> None:
    y = labels(4)[:, None]
    refused_train(served, served.train_request(y=y), Code.INVALID_ARGUMENT, "labels: shape [4, 1]", "[batch] int64")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_train_non_finite_iv(served: Served, bad: float) -> None:
    iv = ivs(4)
    iv[2, 3] = bad
    refused_train(served, served.train_request(iv), Code.INVALID_ARGUMENT, "NaN or Inf")


@pytest.mark.parametrize("field", ["iv", "labels"])
def test_train_missing_field(served: Served, field: Any) -> None:
    request = served.train_request()
    request.ClearField(field)
    refused_train(served, request, Code.INVALID_ARGUMENT, f"{field} is required")


def test_train_unknown_session(served: Served) -> None:
    details = refused_train(served, served.train_request(session_id="stale"), Code.NOT_FOUND, "'stale'")
    assert served.session not in details, "the refusal names the held session: that id lets a client in"


def test_train_without_session(served: Served) -> None:
    refused_train(served, served.train_request(session_id=""), Code.INVALID_ARGUMENT, "session_id is required")


@pytest.mark.parametrize("step", [3, 7, 2**40])
def test_train_step_gap(served: Served, step: int) -> None:
    refused_train(
        served, served.train_request(step=step), Code.FAILED_PRECONDITION, f"step {step}", "expects step 2", "gap"
    )


def test_train_step_from_the_past(served: Served) -> None:
    refused_train(
        served, served.train_request(step=0), Code.FAILED_PRECONDITION, "step 0", "expects step 2", "already applied"
    )


def test_train_retry_gets_the_same_reply_without_a_second_update(served: Served) -> None:
    before = server_snapshot(served.server)
    replies = train(served.stub, served.requests[1], served.requests[1])
    assert_same_snapshot(before, server_snapshot(served.server))
    original = served.replies[1]
    for reply in replies:
        assert reply.step == 1
        assert reply.iv_gradient.content == original.iv_gradient.content
        np.testing.assert_array_equal(codec.from_proto(reply.iv_gradient), codec.from_proto(original.iv_gradient))
        assert list(reply.metrics) == list(original.metrics)


def test_refused_step_ends_the_stream_after_earlier_replies(served: Served) -> None:
    """On one stream: a retry is answered, then a bad request aborts the stream with its status."""
    before = server_snapshot(served.server)
    bad = served.train_request(ivs(4) * np.nan)
    stream = served.stub.Train(iter([served.requests[1], bad]), timeout=TIMEOUT)
    assert next(stream).step == 1
    with pytest.raises(grpc.RpcError) as info:
        next(stream)
    assert info.value.code() == Code.INVALID_ARGUMENT
    assert_same_snapshot(before, server_snapshot(served.server))


# -- Evaluate and Predict ----------------------------------------------------------------------------------


def evaluate(served: Served, iv: Any = None, y: Any = None, **fields: Any) -> Callable[[], object]:
    fields.setdefault("session_id", served.session)
    fields.setdefault("reset_metrics", True)
    request = pb.EvaluateRequest(
        iv=iv if isinstance(iv, pb.Tensor) else codec.to_proto(ivs(4) if iv is None else iv),
        labels=y if isinstance(y, pb.Tensor) else codec.to_proto(labels(4) if y is None else y),
        **fields,
    )
    return lambda: served.stub.Evaluate(request, timeout=TIMEOUT)


def predict(served: Served, iv: Any = None, **fields: Any) -> Callable[[], object]:
    fields.setdefault("session_id", served.session)
    request = pb.PredictRequest(iv=iv if isinstance(iv, pb.Tensor) else codec.to_proto(ivs(4) if iv is None else iv))
    request.session_id = fields["session_id"]
    if "step" in fields:
        request.step = fields["step"]
    return lambda: served.stub.Predict(request, timeout=TIMEOUT)


def nan_iv() -> np.ndarray:
    iv = ivs(4)
    iv[0, 0] = np.nan
    return iv


# The client's step, when it names one, must be the server's (2: `served` applied steps 0 and 1). Step 1 is the
# one whose reply the retry cache holds: the client lost it, and must finish that step before anything else.
STEP_CASES: list[tuple[str, dict[str, Any], grpc.StatusCode, tuple[str, ...]]] = [
    ("step-behind", {"step": 0}, Code.ABORTED, ("client is at step 0", "at step 2", "handshake again")),
    ("step-ahead", {"step": 5}, Code.ABORTED, ("client is at step 5", "at step 2", "handshake again")),
    ("step-reply-lost", {"step": 1}, Code.FAILED_PRECONDITION, ("at step 1", "did not get", "finish the step")),
]


EVALUATE_CASES: list[tuple[str, dict[str, Any], grpc.StatusCode, tuple[str, ...]]] = [
    ("wrong-shape", {"iv": np.zeros((4, CUT_DIM + 1), "float32")}, Code.INVALID_ARGUMENT, ("[4, 6]", "[batch, 5]")),
    ("wrong-dtype", {"iv": np.zeros((4, CUT_DIM), "float64")}, Code.INVALID_ARGUMENT, ("float64", "float32")),
    (
        "content-length",
        {"iv": pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[4, CUT_DIM], content=bytes(7))},
        Code.INVALID_ARGUMENT,
        ("needs 80 bytes", "got 7"),
    ),
    ("nan", {"iv": nan_iv()}, Code.INVALID_ARGUMENT, ("NaN or Inf",)),
    (
        "empty",
        {"iv": np.zeros((0, CUT_DIM), "float32"), "y": np.zeros(0, "int64")},
        Code.INVALID_ARGUMENT,
        ("empty",),
    ),
    (
        "over-max",
        {"iv": ivs(MAX_BATCH + 1), "y": labels(MAX_BATCH + 1)},
        Code.RESOURCE_EXHAUSTED,
        (f"{MAX_BATCH + 1} samples", f"{MAX_BATCH}"),
    ),
    ("label-count", {"y": labels(2)}, Code.INVALID_ARGUMENT, ("2 labels", "4 samples")),
    ("label-range", {"y": np.array([0, 1, 2, 9], "int64")}, Code.INVALID_ARGUMENT, ("[0, 3)", "max 9")),
    ("unknown-session", {"session_id": "gone"}, Code.NOT_FOUND, ("'gone'",)),
    *STEP_CASES,
]


@pytest.mark.parametrize(
    ("fields", "code", "fragments"), [c[1:] for c in EVALUATE_CASES], ids=[c[0] for c in EVALUATE_CASES]
)
def test_evaluate_refused(
    served: Served, fields: dict[str, Any], code: grpc.StatusCode, fragments: tuple[str, ...]
) -> None:
    served.refused(evaluate(served, **fields), code, *fragments)


@pytest.mark.parametrize("field", ["iv", "labels"])
def test_evaluate_missing_field(served: Served, field: Any) -> None:
    request = pb.EvaluateRequest(
        session_id=served.session, iv=codec.to_proto(ivs(4)), labels=codec.to_proto(labels(4)), reset_metrics=True
    )
    request.ClearField(field)
    served.refused(
        lambda: served.stub.Evaluate(request, timeout=TIMEOUT), Code.INVALID_ARGUMENT, f"{field} is required"
    )


PREDICT_CASES: list[tuple[str, dict[str, Any], grpc.StatusCode, tuple[str, ...]]] = [
    ("wrong-shape", {"iv": np.zeros((4, 2), "float32")}, Code.INVALID_ARGUMENT, ("[4, 2]", "[batch, 5]")),
    ("wrong-dtype", {"iv": np.zeros((4, CUT_DIM), "int64")}, Code.INVALID_ARGUMENT, ("int64", "float32")),
    (
        "content-length",
        {"iv": pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[4, CUT_DIM], content=bytes(84))},
        Code.INVALID_ARGUMENT,
        ("needs 80 bytes", "got 84"),
    ),
    ("nan", {"iv": nan_iv()}, Code.INVALID_ARGUMENT, ("NaN or Inf",)),
    ("empty", {"iv": np.zeros((0, CUT_DIM), "float32")}, Code.INVALID_ARGUMENT, ("empty",)),
    (
        "over-max",
        {"iv": ivs(MAX_BATCH + 1)},
        Code.RESOURCE_EXHAUSTED,
        (f"{MAX_BATCH + 1} samples", f"{MAX_BATCH}"),
    ),
    ("unknown-session", {"session_id": "gone"}, Code.NOT_FOUND, ("'gone'",)),
    *STEP_CASES,
]


@pytest.mark.parametrize(
    ("fields", "code", "fragments"), [c[1:] for c in PREDICT_CASES], ids=[c[0] for c in PREDICT_CASES]
)
def test_predict_refused(
    served: Served, fields: dict[str, Any], code: grpc.StatusCode, fragments: tuple[str, ...]
) -> None:
    served.refused(predict(served, **fields), code, *fragments)


def test_predict_missing_iv(served: Served) -> None:
    request = pb.PredictRequest(session_id=served.session)
    served.refused(lambda: served.stub.Predict(request, timeout=TIMEOUT), Code.INVALID_ARGUMENT, "iv is required")


@pytest.mark.parametrize("step", [None, 2], ids=["no-step", "the-servers-step"])
def test_good_evaluate_and_predict_change_no_weight(served: Served, step: int | None) -> None:
    fields = {} if step is None else {"step": step}
    before = server_snapshot(served.server)
    reply: Any = evaluate(served, **fields)()
    assert len(reply.metrics) == len(served.server.trainer.metric_names)
    outputs: Any = predict(served, **fields)()
    assert list(outputs.outputs.shape) == [4, NUM_CLASSES]
    after = server_snapshot(served.server)
    after["metrics"] = before["metrics"]  # evaluate accumulates metrics; nothing else may move
    assert_same_snapshot(before, after)


# -- bytes that are no message ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "type_name"),
    [
        ("Handshake", "HandshakeRequest"),
        ("Evaluate", "EvaluateRequest"),
        ("Predict", "PredictRequest"),
        ("Train", "TrainRequest"),
    ],
)
def test_undecodable_request_is_invalid_argument(served: Served, method: str, type_name: str) -> None:
    """Not gRPC's own INTERNAL ("Exception deserializing request!"): the request is at fault, not the server."""
    served.refused(
        lambda: send_raw(served.channel, method, UNDECODABLE, TIMEOUT),
        Code.INVALID_ARGUMENT,
        f"not a valid {type_name}",
        f"({len(UNDECODABLE)} bytes)",
    )


# -- a fresh server: refusals do not break the session -----------------------------------------------------


def test_session_goes_on_after_refusals(split_pair: StartServer) -> None:
    split = split_pair("plain", 0, optimizer=keras.optimizers.SGD(0.1), max_batch_size=MAX_BATCH)
    with grpc.insecure_channel(split.target) as channel:
        stub = pb_grpc.SplitLearningServiceStub(channel)
        session = handshake(stub, contract=cut_contract(), max_batch_size=MAX_BATCH, timeout=TIMEOUT).session_id

        def request(step: int, iv: np.ndarray | None = None) -> pb.TrainRequest:
            return pb.TrainRequest(
                session_id=session,
                step=step,
                iv=codec.to_proto(ivs(4, seed=step) if iv is None else iv),
                labels=codec.to_proto(labels(4, seed=step)),
            )

        with pytest.raises(grpc.RpcError) as info:
            train(stub, request(0, ivs(4) * np.inf))
        assert info.value.code() == Code.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as info:
            train(stub, request(1))
        assert info.value.code() == Code.FAILED_PRECONDITION
        assert split.server.trainer.iterations == 0

        # The refused attempts consumed nothing: step 0 is still the next one, on a new stream.
        replies = train(stub, request(0), request(1))
        assert [r.step for r in replies] == [0, 1]
        assert split.server.trainer.iterations == 2
        grad = codec.from_proto(replies[0].iv_gradient)
        assert grad.shape == (4, CUT_DIM) and grad.dtype == np.float32 and np.any(grad != 0)
