"""docs/protocol.md's status table against live servers: every row's status produced by a real request.

The table is parsed from the document; each row's name must have a case here and each case a row, so a row
added without a case, a case whose row is gone, or a status that changes fails this test. The aggregator's rows
run against an `AggregatorServer` of its own, or an `Aggregator` mounted in a `SplitServer` (`mounted`); the
rows of every method are also produced on the aggregator's service.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import keras
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aggregator.server import Aggregator, AggregatorServer
from server_part import SplitServer
from splitlearning import codec
from splitlearning.protocol import CLIENT_ID_METADATA_KEY, REASON_METADATA_KEY, Reason
from splitlearning.v1 import split_learning_pb2 as pb
from splitlearning.v1 import split_learning_pb2_grpc as pb_grpc
from tests.conftest import CUT_DIM, NUM_CLASSES, build_top, make_loss
from tests.raw_support import UNDECODABLE
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


SERVICES = {"split": "/splitlearning.v1.SplitLearningService/", "aggregator": "/splitlearning.v1.AggregatorService/"}
GROUP = "doc-group"


@dataclass
class Peer:
    """Raw stubs on a live server (or aggregator), sending the token when the server wants one."""

    server: SplitServer | None
    channel: grpc.Channel
    stub: pb_grpc.SplitLearningServiceStub
    metadata: tuple[tuple[str, Any], ...] = AUTH
    streams: list[Any] = field(default_factory=list)
    aggregator: Aggregator | None = None

    @property
    def split(self) -> SplitServer:
        assert self.server is not None, "this case needs a split server"
        return self.server

    @property
    def rounds(self) -> pb_grpc.AggregatorServiceStub:
        return pb_grpc.AggregatorServiceStub(self.channel)

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

    def join(self, **fields: Any) -> pb.JoinRoundResponse:
        fields.setdefault("group", GROUP)
        fields.setdefault("member", 1)
        fields.setdefault("settings", settings())
        reply: pb.JoinRoundResponse = self.rounds.JoinRound(
            pb.JoinRoundRequest(**fields), timeout=TIMEOUT, metadata=self.metadata
        )
        return reply

    def submit(self, **fields: Any) -> pb.SubmitRoundResponse:
        fields.setdefault("group", GROUP)
        fields.setdefault("member", 1)
        fields.setdefault("samples", 4)
        reply: pb.SubmitRoundResponse = self.rounds.SubmitRound(
            pb.SubmitRoundRequest(**fields), timeout=TIMEOUT, metadata=self.metadata
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


def settings(scheme: Any = pb.SCHEME_SPLITFED, rounds: int = 2) -> pb.GroupSettings:
    return pb.GroupSettings(scheme=scheme, rounds=rounds, local_epochs=1)


def first_part(size: int = 3) -> pb.ModelState:
    """A member's first part, as the aggregator sees it (any weights do: it never runs them)."""
    return pb.ModelState(
        weights=[codec.to_proto(np.ones((2, size), "float32")), codec.to_proto(np.zeros(size, "float32"))]
    )


def group_round(start: list[pb.Contribution] | None = None, **fields: Any) -> pb.GroupRound:
    fields.setdefault("group", GROUP)
    fields.setdefault("member", 1)
    fields.setdefault("scheme", pb.SCHEME_SPLITFED)
    return pb.GroupRound(start=start or [], **fields)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Peer]]:
    servers: list[SplitServer] = []
    aggregators: list[AggregatorServer] = []
    channels: list[grpc.Channel] = []

    def start(
        cut: str = "standard",
        top: keras.Model | None = None,
        rounds: dict[str, Any] | None = None,
        mounted: bool = False,
        **kwargs: Any,
    ) -> Peer:
        kwargs.setdefault("auth_token", TOKEN)
        aggregator = Aggregator(**rounds) if rounds is not None else None
        if aggregator is not None and not mounted:  # an aggregator on a server of its own
            standalone = AggregatorServer(aggregator, **kwargs)
            aggregators.append(standalone)
            channel = grpc.insecure_channel(f"127.0.0.1:{standalone.start('127.0.0.1:0')}")
            channels.append(channel)
            return Peer(None, channel, pb_grpc.SplitLearningServiceStub(channel), aggregator=aggregator)
        kwargs.setdefault("max_batch_size", LIMIT)
        if aggregator is not None:
            kwargs["aggregator"] = aggregator
        if cut == "ushape":
            server = SplitServer(build_middle(), optimizer="sgd", cut="ushape", **kwargs)
        else:
            kwargs.setdefault("checkpoint_dir", tmp_path / f"ckpt{len(servers)}")
            server = SplitServer(top or build_top(), make_loss(), keras.optimizers.SGD(0.1), ["accuracy"], **kwargs)
        servers.append(server)
        channel = grpc.insecure_channel(f"127.0.0.1:{server.start('127.0.0.1:0')}")
        channels.append(channel)
        return Peer(server, channel, pb_grpc.SplitLearningServiceStub(channel), aggregator=aggregator)

    yield start
    for channel in channels:
        channel.close()
    for server in servers:
        server.stop(grace=1.0)
    for standalone in aggregators:
        standalone.stop(grace=1.0)


# -- one case per row: each makes its row's status happen (the call that must fail is the last one) ------------


def case_token(peer: Peer) -> None:
    peer.metadata = ()
    peer.handshake()


def case_undecodable(peer: Peer) -> None:
    identity = lambda data: data  # noqa: E731 (bytes on the wire as they are)
    service = SERVICES["split"]
    predict = peer.channel.unary_unary(service + "Predict", request_serializer=identity, response_deserializer=identity)
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


def case_probe_reply(peer: Peer) -> None:
    limit = LIMIT * CUT_DIM * 4  # the reply limit less 64 KiB: a batch of dLoss/dIV (wider than the outputs)
    peer.stub.Probe(pb.ProbeRequest(reply_bytes=limit), timeout=TIMEOUT, metadata=AUTH)  # the most it may ask
    peer.stub.Probe(pb.ProbeRequest(reply_bytes=limit + 1), timeout=TIMEOUT, metadata=AUTH)


def case_stopping(peer: Peer) -> None:
    peer.split.sessions.stop()
    peer.handshake()


def case_bug(peer: Peer) -> None:
    session = peer.handshake().session_id

    def broken(*_: Any) -> None:
        raise ZeroDivisionError("a bug")

    peer.split.session(session).trainer.predict = broken  # type: ignore[method-assign, assignment]
    peer.predict(session_id=session, iv=iv())


def case_version(peer: Peer) -> None:
    peer.handshake(protocol_version=2)


def case_mode(peer: Peer) -> None:
    peer.handshake(mode=pb.CUT_MODE_USHAPE)


def case_contract(peer: Peer) -> None:
    peer.handshake(contract=pb.CutContract(iv=pb.TensorSpec(shape=[CUT_DIM + 1], dtype=pb.DTYPE_FLOAT32)))


def case_optimizer(peer: Peer) -> None:
    peer.handshake(optimizer=pb.OptimizerSettings(name="sgd", config_json='{"learning_rate": 0.2}'))


def case_optimizer_config(peer: Peer) -> None:
    peer.handshake(optimizer=pb.OptimizerSettings(name="sgd", config_json="[0.1]"))


def case_serve_only(peer: Peer) -> None:
    session = peer.handshake().session_id
    assert peer.predict(session_id=session, iv=iv()).outputs.content  # predictions are served
    peer.train(step(session, 0))


def case_spec(peer: Peer) -> None:
    peer.handshake(contract=pb.CutContract(iv=pb.TensorSpec(shape=[CUT_DIM], dtype=77)))  # type: ignore[arg-type]


def case_approximations(peer: Peer) -> None:
    peer.handshake(approximations=pb.Approximations(stale_gradients=True))  # this server allows top-k only


def case_approximations_args(peer: Peer) -> None:
    peer.handshake(approximations=pb.Approximations(top_k=1.0))


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
    session = peer.handshake().session_id
    end = peer.open_stream(step(session, 0))  # in use: a full server evicts only idle sessions
    try:
        peer.handshake()
    finally:
        end()


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


def case_micro_approximations(peer: Peer) -> None:
    session = peer.handshake(approximations=pb.Approximations(local_loss=True)).session_id
    peer.train(step(session, 0, n=2, labels=labels(2), micro_batches=2, micro_batch=0, step_samples=4))


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


def case_group(peer: Peer) -> None:
    peer.handshake(group=group_round(member=0))


def case_group_start(peer: Peer) -> None:
    peer.handshake(group=group_round([pb.Contribution(round=0, member=2, samples=4)] * 2, round=1))


def case_no_contribution(peer: Peer) -> None:
    session = peer.handshake(group=group_round()).session_id
    peer.close(session_id=session, contribute_samples=4)  # member 1's contribution to round 0, with 4 samples
    peer.handshake(group=group_round([pb.Contribution(round=0, member=1, samples=5)], round=1))


def case_aggregation(peer: Peer) -> None:
    median = pb.Aggregation(rule=pb.AGGREGATION_RULE_MEDIAN)  # the aggregator's rule; the server's is FedAvg
    try:
        peer.handshake(group=group_round(aggregation=median))
    except grpc.RpcError as error:
        assert "median" in error.details() and "fedavg" in error.details(), error.details()  # naming both
        raise


def case_contribute_no_group(peer: Peer) -> None:
    session = peer.handshake().session_id
    peer.close(session_id=session, contribute_samples=4)


def case_contribute_unloaded(peer: Peer) -> None:
    session = peer.handshake().session_id  # no group: it keeps checkpoints
    assert peer.close(session_id=session).checkpointed
    peer.close(session_id=session, contribute_samples=4)


def case_group_name(peer: Peer) -> None:
    peer.join(initial=first_part())
    peer.join(member=3)  # the aggregator has 2 members


def case_settings_fields(peer: Peer) -> None:
    peer.join(settings=settings(scheme=pb.SCHEME_UNSPECIFIED), initial=first_part())


def case_no_initial(peer: Peer) -> None:
    peer.join()


def case_settings(peer: Peer) -> None:
    peer.join(initial=first_part())
    peer.join(member=2, settings=settings(rounds=3))


def case_state(peer: Peer) -> None:
    peer.join(initial=first_part())
    peer.submit(round=0, state=first_part(size=4))


def case_submit_samples(peer: Peer) -> None:
    peer.join(initial=first_part())
    peer.submit(round=0, state=first_part(), samples=0)


def case_no_group(peer: Peer) -> None:
    peer.submit(round=0, state=first_part())


def case_not_open(peer: Peer) -> None:
    peer.join(initial=first_part())
    peer.submit(round=1, state=first_part())


def case_not_turn(peer: Peer) -> None:
    peer.join(settings=settings(pb.SCHEME_ROUND_ROBIN), initial=first_part())
    peer.submit(member=2, round=0, state=first_part())  # turn 0 is member 1's


def case_closed_without(peer: Peer) -> None:
    assert peer.join(initial=first_part()).action == pb.JoinRoundResponse.ACTION_TRAIN
    assert peer.submit(round=0, state=first_part()).submitted == 1
    time.sleep(ROUND_DEADLINE + 0.2)  # round 0 closes at its deadline with member 1 alone
    peer.submit(member=2, round=0, state=first_part())


def _diverging_top() -> keras.Model:
    """A top whose outputs overflow float32 on large IVs, so its gradients are NaN."""
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [keras.Input((CUT_DIM,)), keras.layers.Dense(NUM_CLASSES, kernel_initializer=keras.initializers.Constant(1e30))]
    )


ROUND_DEADLINE = 0.3
ROUNDS = {"members": 2}

# Row -> (its case, the server it needs; `rounds`: an aggregator's arguments).
CASES: dict[str, tuple[Callable[[Peer], None], dict[str, Any]]] = {
    "token": (case_token, {}),
    "undecodable": (case_undecodable, {}),
    "too-big": (case_too_big, {}),
    "busy": (case_busy, {"max_workers": 1}),
    "stopping": (case_stopping, {}),
    "bug": (case_bug, {}),
    "probe-reply": (case_probe_reply, {}),
    "version": (case_version, {}),
    "mode": (case_mode, {}),
    "contract": (case_contract, {}),
    "optimizer": (case_optimizer, {}),
    "optimizer-config": (case_optimizer_config, {}),
    "spec": (case_spec, {}),
    "serve-only": (case_serve_only, {"serve_only": True}),
    "batch-limit": (case_batch_limit, {}),
    "approximations": (case_approximations, {"allow_approximations": "top-k"}),
    "approximations-args": (case_approximations_args, {"allow_approximations": "all"}),
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
    "micro-approximations": (case_micro_approximations, {"allow_approximations": "local-loss"}),
    "micro-fields": (case_micro_fields, {}),
    "diverged": (case_diverged, {"top": "diverging", "wire_encodings": ("raw", "int8")}),
    "ushape-labels": (case_ushape_labels, {"cut": "ushape"}),
    "in-flight": (case_in_flight, {"cut": "ushape"}),
    "ushape-evaluate": (case_ushape_evaluate, {"cut": "ushape"}),
    "partner-step": (case_partner_step, {}),
    "lost-reply": (case_lost_reply, {}),
    "close-in-use": (case_close_in_use, {}),
    "group": (case_group, {}),
    "group-start": (case_group_start, {}),
    "no-contribution": (case_no_contribution, {}),
    "aggregation": (case_aggregation, {}),
    "contribute-no-group": (case_contribute_no_group, {}),
    "contribute-unloaded": (case_contribute_unloaded, {}),
    "group-name": (case_group_name, {"rounds": ROUNDS}),
    "settings-fields": (case_settings_fields, {"rounds": ROUNDS}),
    "no-initial": (case_no_initial, {"rounds": ROUNDS}),
    "settings": (case_settings, {"rounds": ROUNDS, "mounted": True}),
    "state": (case_state, {"rounds": ROUNDS}),
    "submit-samples": (case_submit_samples, {"rounds": ROUNDS}),
    "no-group": (case_no_group, {"rounds": ROUNDS}),
    "not-open": (case_not_open, {"rounds": ROUNDS}),
    "not-turn": (case_not_turn, {"rounds": ROUNDS}),
    "closed-without": (case_closed_without, {"rounds": {**ROUNDS, "deadline": ROUND_DEADLINE}}),
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


# -- the rows of every method, on the aggregator's service -------------------------------------------------------


def agg_case_token(peer: Peer) -> None:
    peer.metadata = ()
    peer.join(initial=first_part())


def agg_case_undecodable(peer: Peer) -> None:
    identity = lambda data: data  # noqa: E731 (bytes on the wire as they are)
    join = peer.channel.unary_unary(
        SERVICES["aggregator"] + "JoinRound", request_serializer=identity, response_deserializer=identity
    )
    join(UNDECODABLE, timeout=TIMEOUT, metadata=AUTH)


def agg_case_too_big(peer: Peer) -> None:
    peer.join(initial=first_part(size=64 * 1024))  # 768 KiB of weights, over the 256 KiB limit


def agg_case_busy(peer: Peer) -> None:
    assert peer.aggregator is not None
    peer.join(settings=settings(pb.SCHEME_ROUND_ROBIN), initial=first_part())
    rounds, arrived = peer.aggregator.rounds, threading.Event()
    join = rounds.join

    def noted(*args: Any, **kwargs: Any) -> Any:
        arrived.set()
        return join(*args, **kwargs)

    rounds.join = noted  # type: ignore[method-assign]
    request = pb.JoinRoundRequest(group=GROUP, member=2, settings=settings(pb.SCHEME_ROUND_ROBIN), wait_ms=10_000)
    waiting = peer.rounds.JoinRound.future(request, timeout=TIMEOUT, metadata=AUTH)  # member 2 waits for its turn
    try:
        assert arrived.wait(TIMEOUT), "the waiting join never reached the aggregator"
        peer.join(member=1)  # the one slot is held by a call whose request has arrived
    finally:
        waiting.cancel()


def agg_case_bug(peer: Peer) -> None:
    def broken(*_: Any) -> None:
        raise ZeroDivisionError("a bug")

    assert peer.aggregator is not None
    peer.aggregator.rounds.join = broken  # type: ignore[method-assign, assignment]
    peer.join(initial=first_part())


AGGREGATOR_CASES: dict[str, tuple[Callable[[Peer], None], dict[str, Any]]] = {
    "token": (agg_case_token, {}),
    "undecodable": (agg_case_undecodable, {}),
    "too-big": (agg_case_too_big, {"max_state_bytes": 256 * 1024}),
    "busy": (agg_case_busy, {"max_workers": 1}),
    "bug": (agg_case_bug, {}),
}


@pytest.mark.parametrize("row", sorted(AGGREGATOR_CASES))
def test_rows_of_every_method_hold_on_the_aggregator(row: str, serve: Callable[..., Peer]) -> None:
    expected = status_table().get(row)
    assert expected is not None, f"row {row!r} is not in docs/protocol.md's status table"
    case, needs = AGGREGATOR_CASES[row]
    rounds = {**ROUNDS, **({"max_state_bytes": needs["max_state_bytes"]} if "max_state_bytes" in needs else {})}
    server_options = {key: value for key, value in needs.items() if key != "max_state_bytes"}
    peer = serve(rounds=rounds, **server_options)
    with pytest.raises(grpc.RpcError) as refused:
        case(peer)
    error: Any = refused.value
    assert error.code().name == expected, f"{row}: {error.code().name} ({error.details()}), documented {expected}"


def test_a_server_with_the_aggregator_mounted_serves_both_and_takes_first_parts_over_its_batch_limit(
    serve: Callable[..., Peer],
) -> None:
    peer = serve(rounds=ROUNDS, mounted=True)
    big = first_part(size=64 * 1024)  # 768 KiB, far over what a batch of LIMIT samples needs
    assert big.ByteSize() > peer.split.max_message_bytes
    answer = peer.join(initial=big)
    assert answer.action == pb.JoinRoundResponse.ACTION_TRAIN and answer.state.ByteSize() > big.ByteSize() // 2
    health = health_pb2_grpc.HealthStub(peer.channel)
    for service in ("", *(name.strip("/") for name in SERVICES.values())):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, service


def test_a_cut_mismatch_carries_its_reason_in_trailing_metadata(serve: Callable[..., Peer]) -> None:
    """docs/protocol.md, Statuses: `split-reason: CUT_MISMATCH` on the contract row, and no reason elsewhere."""
    peer = serve()
    with pytest.raises(grpc.RpcError) as refused:
        case_contract(peer)
    assert (REASON_METADATA_KEY, Reason.CUT_MISMATCH.value) in tuple(refused.value.trailing_metadata() or ())
    with pytest.raises(grpc.RpcError) as other:
        case_version(peer)
    assert REASON_METADATA_KEY not in dict(other.value.trailing_metadata() or ())
