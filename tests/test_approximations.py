"""Beyond the exact split: the handshake's agreement on approximations, the sparse wire, and top-k with error
feedback at both ends (stale gradients and the local loss have tests of their own)."""

from __future__ import annotations

import math
import re
from functools import partial
from typing import Any

import grpc
import keras
import numpy as np
import pytest

from client_part.client import SplitClient
from splitlearning import approximations, codec
from splitlearning.approximations import Approximations
from splitlearning.errors import InvalidRequest
from splitlearning.top_k import ErrorFeedback, keep_count, sparsify
from splitlearning.v1 import split_learning_pb2 as pb
from tests import raw_support as raw
from tests.conftest import CUT_DIM, Split, StartServer, make_data

Code = grpc.StatusCode


# -- the agreement -------------------------------------------------------------------------------------------


def test_names_and_problems() -> None:
    assert Approximations().exact and Approximations().describe() == "none (exact)"
    both = Approximations(stale_gradients=True, top_k=0.25)
    assert both.names == ("stale-gradients", "top-k") and both.describe() == "stale-gradients, top-k 0.25"
    assert both.in_flight == 2 and Approximations(local_loss=True).in_flight == 1
    for bad in (1.0, -0.1, math.nan, 1.5):
        with pytest.raises(ValueError, match="fraction in"):
            Approximations(top_k=bad)
    with pytest.raises(ValueError, match="do not go together"):
        Approximations(stale_gradients=True, local_loss=True)
    assert approximations.parse_allowed("top-k, stale_gradients,") == {"top-k", "stale-gradients"}
    assert approximations.parse_allowed("all") == set(approximations.NAMES)
    with pytest.raises(ValueError, match="unknown approximation 'topk'"):
        approximations.parse_allowed("topk")


def test_from_proto_keeps_the_fraction_the_client_was_given() -> None:
    # 0.1 travels as float32 (0.100000001...): read back as 0.1, both ends size k alike.
    back = Approximations.from_proto(Approximations(top_k=0.1).to_proto())
    assert back.top_k == 0.1 and keep_count(back.top_k, 1280) == 128
    with pytest.raises(InvalidRequest, match=r"approximations: .*do not go together"):
        Approximations.from_proto(pb.Approximations(stale_gradients=True, local_loss=True))


def contract_handshake(split: Split, **fields: Any) -> pb.HandshakeResponse:
    channel, stub = raw.connect(split.target)
    with channel:
        return raw.handshake(stub, contract=raw.cut_contract(), **fields)


def test_a_server_allows_none_unless_its_operator_opts_in(split_pair: StartServer) -> None:
    split = split_pair()
    for asked, name in ((pb.Approximations(top_k=0.1), "top-k"), (pb.Approximations(local_loss=True), "local-loss")):
        code, details = raw.refused(partial(contract_handshake, split, approximations=asked))
        assert code == Code.FAILED_PRECONDITION
        assert f"asks for {name}, which this server does not allow (it allows none)" in details
        assert f"--allow-approximations {name}" in details
    # Exact handshakes are untouched: no approximations in the reply.
    reply = contract_handshake(split)
    assert not reply.HasField("approximations") and reply.encoding == pb.ENCODING_RAW


def test_the_reply_states_what_the_session_applies(split_pair: StartServer) -> None:
    split = split_pair(allow_approximations="top-k,stale-gradients")
    asked = pb.Approximations(stale_gradients=True, top_k=0.25)
    reply = contract_handshake(split, approximations=asked, encodings=[pb.ENCODING_INT8])
    assert reply.approximations == asked and reply.encoding == pb.ENCODING_SPARSE  # top-k travels sparse
    code, details = raw.refused(lambda: contract_handshake(split, approximations=pb.Approximations(local_loss=True)))
    assert code == Code.FAILED_PRECONDITION and "it allows stale-gradients, top-k" in details
    code, details = raw.refused(lambda: contract_handshake(split, approximations=pb.Approximations(top_k=1.5)))
    assert code == Code.INVALID_ARGUMENT and "top-k must be a fraction in (0, 1)" in details


def test_a_u_shaped_server_refuses_them() -> None:
    from server_part import SplitServer

    keras.utils.set_random_seed(0)
    middle = keras.Sequential([keras.Input((CUT_DIM,)), keras.layers.Dense(4)])
    server = SplitServer(middle, optimizer="sgd", cut="ushape", allow_approximations="all")
    port = server.start("127.0.0.1:0")
    try:
        channel, stub = raw.connect(f"127.0.0.1:{port}")
        with channel:
            code, details = raw.refused(
                lambda: raw.handshake(stub, mode=pb.CUT_MODE_USHAPE, approximations=pb.Approximations(top_k=0.5))
            )
        assert code == Code.FAILED_PRECONDITION and "are for the standard cut" in details
    finally:
        server.stop(grace=1.0)


def test_a_client_refuses_a_server_that_applies_other_approximations(
    split_pair: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from server_part.servicer import SplitLearningServicer

    split = split_pair(allow_approximations="top-k")
    # A server that predates the field answers without it: it would train exactly while the client thinks not.
    original = SplitLearningServicer._handshake

    def predating(self: SplitLearningServicer, request: pb.HandshakeRequest) -> pb.HandshakeResponse:
        reply = original(self, request)
        reply.ClearField("approximations")
        return reply

    monkeypatch.setattr(SplitLearningServicer, "_handshake", predating)
    client = SplitClient(split.bottom, "sgd", split.target, approximations=Approximations(top_k=0.5))
    mismatch = "approximations mismatch: this client asked for top-k 0.5, the server applies none"
    with pytest.raises(ValueError, match=re.escape(mismatch)), client:
        client.connect()


def test_client_refuses_what_does_not_fit(split_pair: StartServer) -> None:
    split = split_pair()
    with pytest.raises(ValueError, match="leave micro-batches at 1"):
        SplitClient(
            split.bottom, target=split.target, micro_batches=2, approximations=Approximations(stale_gradients=True)
        )
    with pytest.raises(ValueError, match="sparse encoding, not int8"):
        SplitClient(split.bottom, target=split.target, wire_encoding="int8", approximations=Approximations(top_k=0.5))


# -- top-k with error feedback -------------------------------------------------------------------------------


def test_error_feedback_sends_the_k_largest_and_keeps_the_rest_for_later() -> None:
    rng = np.random.default_rng(0)
    feedback = ErrorFeedback(0.25)
    tensors = [rng.normal(size=(4, 8)).astype("float32") for _ in range(6)]
    sent = []
    for tensor in tensors:
        out = feedback(tensor)
        assert [np.count_nonzero(row) for row in out] == [keep_count(0.25, 8)] * 4 == [2] * 4  # per sample
        sent.append(out)
    # Nothing is lost: what was sent plus what is still held back adds up to everything given.
    residual = feedback._residual
    assert residual is not None
    np.testing.assert_allclose(sum(sent) + residual, sum(tensors), rtol=1e-5, atol=1e-5)
    # Each row's k largest magnitudes of the first tensor are exactly what went out first.
    for row, out in zip(tensors[0], sent[0], strict=True):
        assert set(np.flatnonzero(out)) == set(np.argsort(-np.abs(row))[:2])
        assert np.array_equal(out[out != 0], row[out != 0])
    # Without feedback the same 5 entries would go every time; with it, held-back entries catch up.
    assert len({tuple(np.flatnonzero(s)) for s in sent}) > 1


def test_plain_top_k_keeps_each_rows_largest_and_remembers_nothing() -> None:
    rows = np.array([[0.5, -3.0, 2.0, 0.1], [4.0, 0.0, -0.2, 1.0]], np.float32)
    kept = sparsify(rows, 0.5)  # 2 of each row's 4
    assert np.array_equal(kept, np.array([[0, -3.0, 2.0, 0], [4.0, 0, 0, 1.0]], np.float32))
    assert np.array_equal(sparsify(rows, 0.5), kept)  # no state: the same input, the same output
    assert rows[0, 0] == 0.5  # the input is left alone
    assert sparsify(np.zeros((0, 4), np.float32), 0.5).shape == (0, 4)


def test_a_tensor_of_another_shape_neither_takes_nor_leaves_a_residual() -> None:
    feedback = ErrorFeedback(0.5)
    full = np.array([[4.0, 1.0], [3.0, 2.0]], np.float32)
    feedback(full)
    held = feedback._residual.copy()  # type: ignore[union-attr]
    short = np.array([[10.0, 0.5]], np.float32)
    assert np.array_equal(feedback(short), np.array([[10.0, 0.0]], np.float32))
    assert np.array_equal(feedback._residual, held)  # type: ignore[arg-type]


def fit_top_k(
    split_pair: StartServer, monkeypatch: pytest.MonkeyPatch, fraction: float
) -> tuple[SplitClient, list[np.ndarray], dict[str, list]]:
    """Two epochs with top-k `fraction` (0: exact): the client, both parts' weights, and every IV and gradient
    decoded in this process (the server's and the client's: field -> (encoding, bytes, array))."""
    split = split_pair("plain", 3, optimizer=keras.optimizers.SGD(0.1), allow_approximations="top-k")
    x, y = make_data(n=48)
    seen: dict[str, list] = {"iv": [], "iv_gradient": []}
    decode = codec.decode

    def recording(
        message: pb.Tensor, content: bytes | memoryview, field: str = "tensor", max_entries: int | None = None
    ) -> np.ndarray:
        array = decode(message, content, field, max_entries)
        if field in seen:
            seen[field].append((message.encoding, len(content), array))
        return array

    monkeypatch.setattr(codec, "decode", recording)
    approximations_ = Approximations(top_k=fraction) if fraction else Approximations()
    client = SplitClient(split.bottom, keras.optimizers.SGD(0.1), split.target, approximations=approximations_)
    with client:
        client.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
        seen["iv_evaluated"] = []
        seen["iv"], trained = seen["iv_evaluated"], seen["iv"]  # the server's decodes of evaluate's IVs apart
        client.evaluate(x, y, batch_size=16)
        seen["iv"] = trained
        seen["forward"] = [client.trainer.forward(x[:16])]
    return client, [*client.model.get_weights(), *split.server.trainer.model.get_weights()], seen


def test_top_k_sends_k_entries_each_way_and_still_trains(
    split_pair: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, exact, _ = fit_top_k(split_pair, monkeypatch, 0.0)
    monkeypatch.undo()
    client, sparse, seen = fit_top_k(split_pair, monkeypatch, 0.2)
    assert client.agreement.encoding == pb.ENCODING_SPARSE
    k = keep_count(0.2, CUT_DIM)  # 1 of each sample's 5 entries
    for field in ("iv", "iv_gradient", "iv_evaluated"):
        assert len(seen[field]) == (3 if field == "iv_evaluated" else 6)  # three steps an epoch, two epochs
        for encoding, size, array in seen[field]:
            assert encoding == pb.ENCODING_SPARSE
            assert all(np.count_nonzero(row) <= k for row in array) and size == np.count_nonzero(array) * 8
    # Evaluate sends each sample's largest entry, as training did (no feedback on an IV): the same numbers.
    np.testing.assert_array_equal(seen["iv_evaluated"][0][2], sparsify(seen["forward"][0], 0.2))
    # It trains another model than the exact split (it is an approximation), but not a wild one.
    assert any(not np.allclose(a, b) for a, b in zip(sparse, exact, strict=True))
    assert all(np.all(np.isfinite(w)) for w in sparse)


def test_a_sparse_iv_is_refused_past_a_full_batch_before_it_is_made_dense(split_pair: StartServer) -> None:
    split = split_pair(wire_encodings=("raw", "sparse"), max_batch_size=8)
    channel, stub = raw.connect(split.target)
    with channel:
        reply = raw.handshake(stub, contract=raw.cut_contract(), encodings=[pb.ENCODING_SPARSE])
        assert reply.encoding == pb.ENCODING_SPARSE
        huge = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[8, 10**8], encoding=pb.ENCODING_SPARSE)  # 3 GB dense
        request = raw.train_request(reply.session_id, 0)
        request.iv.CopyFrom(huge)
        code, details = raw.refused(lambda: raw.train(stub, request))
        assert code == Code.INVALID_ARGUMENT and "over the 40 expected here" in details  # 8 samples x 5
        predict = pb.PredictRequest(session_id=reply.session_id, iv=huge)
        code, details = raw.refused(lambda: stub.Predict(predict, timeout=20))
        assert code == Code.INVALID_ARGUMENT and "over the 40 expected here" in details
        # A sparse IV of the contract's size trains.
        request.iv.CopyFrom(codec.to_proto(np.eye(4, CUT_DIM, dtype=np.float32), pb.ENCODING_SPARSE))
        (answer,) = raw.train(stub, request)
        assert answer.iv_gradient.encoding == pb.ENCODING_SPARSE


def test_a_pipelined_step_started_over_sends_what_an_undisturbed_one_sends(split_pair: StartServer) -> None:
    """Top-k with micro-batches: a step left after its first micro-batch (the client rejoined) starts over with
    the residual from before it, so its gradients equal those of a session that never broke off."""
    split = split_pair(allow_approximations="top-k")
    rng = np.random.default_rng(5)
    parts = [(sparsify(rng.normal(size=(2, CUT_DIM)).astype("float32"), 0.4), rng.integers(0, 3, 2)) for _ in range(4)]

    def micro(session: str, step: int, index: int) -> pb.TrainRequest:
        iv, labels = parts[2 * step + index]
        return pb.TrainRequest(
            session_id=session, step=step, micro_batches=2, micro_batch=index, step_samples=4,
            iv=codec.to_proto(iv, pb.ENCODING_SPARSE), labels=codec.to_proto(labels.astype("int64")),
        )  # fmt: skip

    def gradients(replies: list[Any]) -> list[np.ndarray]:
        return [codec.from_proto(reply.iv_gradient) for reply in replies]

    channel, stub = raw.connect(split.target)
    with channel:
        asked = pb.Approximations(top_k=0.4)
        whole = raw.handshake(stub, approximations=asked, client_id="a").session_id
        undisturbed = gradients(raw.train(stub, *(micro(whole, s, i) for s in (0, 1) for i in (0, 1))))
        broken = raw.handshake(stub, approximations=asked, client_id="b").session_id
        raw.train(stub, micro(broken, 0, 0), micro(broken, 0, 1), micro(broken, 1, 0))  # step 1 left unfinished
        assert raw.handshake(stub, broken, approximations=asked, client_id="b").next_step == 1  # starts over
        again = gradients(raw.train(stub, micro(broken, 1, 0), micro(broken, 1, 1)))
    for got, expected in zip(again, undisturbed[2:], strict=True):
        np.testing.assert_array_equal(got, expected)
