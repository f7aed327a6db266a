"""The aggregator over gRPC: a real `AggregatorServer` on 127.0.0.1 port 0, called through raw stubs. Each bad
request gets its status and changes nothing; a SplitFed exchange averages; big first parts fit; health and
Prometheus answer."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aggregator.server import Aggregator, AggregatorServer
from splitlearning import codec
from splitlearning.v1 import split_learning_pb2 as pb
from splitlearning.v1 import split_learning_pb2_grpc as pb_grpc
from tests.observability_support import scrape, value
from tests.raw_support import UNDECODABLE, model_state

TIMEOUT = 10.0
SERVICE = "/splitlearning.v1.AggregatorService/"
SPLITFED = pb.GroupSettings(scheme=pb.SCHEME_SPLITFED, rounds=2, local_epochs=1)
TOKEN = "agg-token-0123456789"
# Room for the big first parts below on the client's side (the server's limit is its own, 256 MiB).
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]


def weights(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=(3,)).astype(np.float32)]


def decoded(message: pb.ModelState) -> list[np.ndarray]:
    return [np.array(codec.from_proto(t)) for t in message.weights]


def join(
    member: int, group: str = "g", initial: list[np.ndarray] | None = None, **fields: object
) -> pb.JoinRoundRequest:
    request = pb.JoinRoundRequest(group=group, member=member, settings=SPLITFED, **fields)  # type: ignore[arg-type]
    if initial is not None:
        request.initial.CopyFrom(model_state(initial))
    return request


def submit(member: int, round_: int, arrays: list[np.ndarray], samples: int, group: str = "g") -> pb.SubmitRoundRequest:
    return pb.SubmitRoundRequest(group=group, member=member, round=round_, state=model_state(arrays), samples=samples)


@dataclass
class Served:
    server: AggregatorServer
    channel: grpc.Channel
    stub: pb_grpc.AggregatorServiceStub
    target: str


@pytest.fixture
def serve() -> Iterator[Callable[..., Served]]:
    """A factory: `serve(members=2, **Aggregator or AggregatorServer keywords)` starts one; stopped at the end."""
    started: list[Served] = []

    def start(members: int = 2, deadline: float = 0.0, **server_kwargs: object) -> Served:
        server = AggregatorServer(Aggregator(members, deadline), **server_kwargs)  # type: ignore[arg-type]
        target = f"127.0.0.1:{server.start('127.0.0.1:0')}"
        channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        served = Served(server, channel, pb_grpc.AggregatorServiceStub(channel), target)
        started.append(served)
        return served

    yield start
    for served in started:
        served.channel.close()
        served.server.stop(grace=0.5)


def refused(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def call(channel: grpc.Channel, method: str, request: bytes | pb.JoinRoundRequest | pb.SubmitRoundRequest) -> bytes:
    """`method` with `request` as it is on the wire (a message is serialized first); a refusal raises."""
    payload = request if isinstance(request, bytes) else request.SerializeToString()
    identity = lambda data: data  # noqa: E731 (bytes on the wire as they are)
    unary = channel.unary_unary(SERVICE + method, request_serializer=identity, response_deserializer=identity)
    return bytes(unary(payload, timeout=TIMEOUT))


def bad_tensor() -> pb.ModelState:
    """Claims float32 [4, 3] (48 bytes) but carries 5."""
    state = pb.ModelState()
    state.weights.add(dtype=pb.DTYPE_FLOAT32, shape=[4, 3], content=b"\x00" * 5)
    state.weights.add().CopyFrom(model_state(weights(1)).weights[1])
    return state


INVALID, PRECONDITION = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION
ROUND_ROBIN = pb.GroupSettings(scheme=pb.SCHEME_ROUND_ROBIN, rounds=2, local_epochs=1)
# (what, method, request, status, a part of the message), all against group 'g' (2 members, member 1 joined).
BAD_REQUESTS: list[tuple[str, str, bytes | pb.JoinRoundRequest | pb.SubmitRoundRequest, grpc.StatusCode, str]] = [
    ("undecodable join", "JoinRound", UNDECODABLE, INVALID, "the request is not a valid JoinRoundRequest (3 bytes)"),
    ("undecodable submit", "SubmitRound", UNDECODABLE, INVALID, "the request is not a valid SubmitRoundRequest"),
    ("malformed group", "JoinRound", join(1, "a/b", weights(0)), INVALID,
     "group: expected 1 to 128 letters, digits, '-' or '_', got 'a/b'"),
    ("empty group", "SubmitRound", submit(1, 0, weights(1), 5, group=""), INVALID, "group: expected 1 to 128 letters"),
    ("long group", "JoinRound", join(1, "g" * 100_000, weights(0)), INVALID,
     "group: at most 128 characters, got 100000"),
    ("member 0", "JoinRound", join(0), INVALID, "member: expected 1 to 2 (this aggregator's members), got 0"),
    ("member 3", "SubmitRound", submit(3, 0, weights(1), 5), INVALID,
     "member: expected 1 to 2 (this aggregator's members), got 3"),
    ("bad tensor in state", "SubmitRound",
     pb.SubmitRoundRequest(group="g", member=1, round=0, state=bad_tensor(), samples=5), INVALID,
     "state.weights[0]: shape [4, 3] of float32 encoded as raw needs 48 bytes, got 5"),
    ("bad tensor in initial", "JoinRound",
     pb.JoinRoundRequest(group="h", member=1, settings=SPLITFED, initial=bad_tensor()), INVALID,
     "initial.weights[0]: shape [4, 3] of float32 encoded as raw needs 48 bytes, got 5"),
    ("state of another shape", "SubmitRound", submit(1, 0, weights(1)[:1], 5), INVALID,
     "state: 1 weight tensors, expected 2"),
    ("no state", "SubmitRound", pb.SubmitRoundRequest(group="g", member=1, round=0, samples=5), INVALID,
     "state: SplitFed averages the members' first parts: send the weights"),
    ("samples 0", "SubmitRound", submit(1, 0, weights(1), 0), INVALID,
     "samples: the samples trained on in the round, at least 1, got 0"),
    ("missing initial", "JoinRound", join(1, "h"), PRECONDITION,
     "group 'h' is not on this aggregator and this join carries no first part to start it from (a group's first "
     "join must carry one)"),
    ("no scheme", "JoinRound",
     pb.JoinRoundRequest(group="g", member=1, settings=pb.GroupSettings(rounds=2, local_epochs=1)), INVALID,
     "settings.scheme: expected SCHEME_ROUND_ROBIN or SCHEME_SPLITFED, got 0"),
    ("no settings", "JoinRound", pb.JoinRoundRequest(group="g", member=1), INVALID, "settings.scheme"),
    ("settings mismatch", "JoinRound", pb.JoinRoundRequest(group="g", member=2, settings=ROUND_ROBIN), PRECONDITION,
     "group 'g' trains splitfed for 2 rounds of 1 local epoch; this member asks for round-robin for 2 rounds of 1 "
     "local epoch"),
    ("round not open", "SubmitRound", submit(1, 1, weights(1), 5), PRECONDITION,
     "round 1 of group 'g' is not open: the group is at round 0"),
    ("unknown group", "SubmitRound", submit(1, 0, weights(1), 5, group="nope"), grpc.StatusCode.NOT_FOUND,
     "no group 'nope' on this aggregator: join it first"),
]  # fmt: skip


def test_each_bad_request_gets_its_status_and_changes_nothing(serve: Callable[..., Served]) -> None:
    served = serve()
    stub = served.stub
    before = stub.JoinRound(join(1, initial=weights(0)), timeout=TIMEOUT)
    assert before.action == pb.JoinRoundResponse.ACTION_TRAIN and before.round == 0
    for what, method, request, code, message in BAD_REQUESTS:
        error = refused(lambda: call(served.channel, method, request))  # noqa: B023 (called at once)
        assert error.code() == code, (what, error.code(), error.details())
        assert message in (error.details() or ""), (what, error.details())
        assert stub.JoinRound(join(1), timeout=TIMEOUT) == before, what
    assert [group.name for group in served.server.aggregator.rounds.groups()] == ["g"]
    assert stub.SubmitRound(submit(2, 0, weights(2), 5), timeout=TIMEOUT).submitted == 1  # none was counted


def test_a_submission_to_a_round_closed_without_the_member_is_failed_precondition(
    serve: Callable[..., Served],
) -> None:
    served = serve(deadline=0.2)
    stub = served.stub
    stub.JoinRound(join(1, initial=weights(0)), timeout=TIMEOUT)
    stub.SubmitRound(submit(1, 0, weights(1), 5), timeout=TIMEOUT)
    deadline = time.monotonic() + TIMEOUT
    while stub.JoinRound(join(2), timeout=TIMEOUT).round == 0:  # the aggregator's ticker closes it
        assert time.monotonic() < deadline, "round 0 did not close at its deadline"
        time.sleep(0.05)
    error = refused(lambda: stub.SubmitRound(submit(2, 0, weights(2), 5), timeout=TIMEOUT))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "round 0 of group 'g' closed without member 2 (its deadline passed); join again" in (error.details() or "")
    again = stub.SubmitRound(submit(1, 0, weights(1), 5), timeout=TIMEOUT)  # a resend it counted
    assert (again.submitted, again.members) == (1, 2)


def test_without_the_token_every_call_is_unauthenticated(serve: Callable[..., Served]) -> None:
    served = serve(auth_token=TOKEN)
    stub = served.stub
    for metadata in ((), (("authorization", "Bearer wrong"),), (("authorization", TOKEN),)):
        with pytest.raises(grpc.RpcError) as joined:
            stub.JoinRound(join(1, initial=weights(0)), metadata=metadata, timeout=TIMEOUT)
        with pytest.raises(grpc.RpcError) as submitted:
            stub.SubmitRound(submit(1, 0, weights(1), 5), metadata=metadata, timeout=TIMEOUT)
        for error in (joined.value, submitted.value):
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED, metadata
    assert served.server.aggregator.rounds.groups() == []
    good = (("authorization", f"Bearer {TOKEN}"),)
    answer = stub.JoinRound(join(1, initial=weights(0)), metadata=good, timeout=TIMEOUT)
    assert answer.action == pb.JoinRoundResponse.ACTION_TRAIN
    health = health_pb2_grpc.HealthStub(served.channel)  # health checks need no token
    assert (
        health.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT).status == health_pb2.HealthCheckResponse.SERVING
    )


def test_two_members_train_a_splitfed_group_over_grpc(serve: Callable[..., Served]) -> None:
    served = serve()
    stub = served.stub
    for member in (1, 2):
        answer = stub.JoinRound(join(member, initial=weights(0)), timeout=TIMEOUT)
        assert (answer.action, answer.round, answer.members, list(answer.start)) == (
            pb.JoinRoundResponse.ACTION_TRAIN, 0, 2, [],
        )  # fmt: skip
        for got, sent in zip(decoded(answer.state), weights(0), strict=True):
            np.testing.assert_array_equal(got, sent)
    first = stub.SubmitRound(submit(1, 0, weights(1), 30), timeout=TIMEOUT)
    assert (first.submitted, first.members) == (1, 2)

    # Member 1 waits (long-poll) until member 2's submission closes the round.
    waited: list[tuple[pb.JoinRoundResponse, float]] = []

    def wait() -> None:
        began = time.monotonic()
        waited.append((stub.JoinRound(join(1, wait_ms=20_000), timeout=30), time.monotonic() - began))

    waiter = threading.Thread(target=wait)
    waiter.start()
    time.sleep(0.3)
    second = stub.SubmitRound(submit(2, 0, weights(2), 10), timeout=TIMEOUT)
    assert (second.submitted, second.members) == (2, 2)
    waiter.join(timeout=TIMEOUT)
    ((answer, seconds),) = waited
    assert seconds < 5.0, seconds

    assert (answer.action, answer.round) == (pb.JoinRoundResponse.ACTION_TRAIN, 1)
    assert [(c.round, c.member, c.samples) for c in answer.start] == [(0, 1, 30), (0, 2, 10)]
    expected = [((30 * a.astype(np.float64) + 10 * b.astype(np.float64)) / 40).astype(np.float32)
                for a, b in zip(weights(1), weights(2), strict=True)]  # fmt: skip
    averaged = decoded(answer.state)
    assert len(averaged) == len(expected)
    for g, e in zip(averaged, expected, strict=True):
        assert g.dtype == np.float32
        np.testing.assert_allclose(g, e, rtol=1e-6, atol=1e-7)
    assert len(answer.state.optimizer) == 0

    for member in (1, 2):
        stub.SubmitRound(submit(member, 1, weights(10 + member), 5), timeout=TIMEOUT)
    done = stub.JoinRound(join(2), timeout=TIMEOUT)
    assert (done.action, done.round) == (pb.JoinRoundResponse.ACTION_DONE, 2)
    assert [(c.round, c.member, c.samples) for c in done.start] == [(1, 1, 5), (1, 2, 5)]


def test_first_parts_over_four_mib_are_accepted(serve: Callable[..., Served]) -> None:
    served = serve()
    stub = served.stub
    big = [np.arange(5 * 1024 * 1024 // 4, dtype=np.float32)]  # 5 MiB: over gRPC's default 4 MiB
    answer = stub.JoinRound(join(1, initial=big), timeout=30)
    assert answer.ByteSize() > 5 * 1024 * 1024
    np.testing.assert_array_equal(decoded(answer.state)[0], big[0])
    for member in (1, 2):
        stub.SubmitRound(submit(member, 0, [big[0] * member], 1), timeout=30)
    averaged = decoded(stub.JoinRound(join(1), timeout=30).state)[0]
    np.testing.assert_allclose(averaged, big[0] * 1.5, rtol=1e-6)


def test_health_is_serving(serve: Callable[..., Served]) -> None:
    health = health_pb2_grpc.HealthStub(serve().channel)
    for service in ("", "splitlearning.v1.AggregatorService"):
        status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT).status
        assert status == health_pb2.HealthCheckResponse.SERVING, service


def test_prometheus_series_after_a_round(serve: Callable[..., Served]) -> None:
    served = serve(metrics_port=0)
    stub, port = served.stub, served.server.metrics_port
    assert port is not None
    stub.JoinRound(join(1, initial=weights(0)), timeout=TIMEOUT)
    stub.SubmitRound(submit(1, 0, weights(1), 30), timeout=TIMEOUT)
    stub.SubmitRound(submit(2, 0, weights(2), 12), timeout=TIMEOUT)
    stub.SubmitRound(submit(2, 1, weights(3), 12), timeout=TIMEOUT)  # member 2 hands in round 1 too
    samples = scrape(port)
    assert samples[("split_aggregator_round", (("group", "g"),))] == 1
    assert samples[("split_aggregator_rounds_total", (("group", "g"),))] == 1
    assert samples[("split_aggregator_round_members", (("group", "g"),))] == 2
    assert samples[("split_aggregator_round_samples", (("group", "g"),))] == 42
    assert samples[("split_aggregator_missed_members_total", (("group", "g"),))] == 0
    assert value(samples, "split_aggregator_round_seconds", group="g") >= 0
    assert samples[("split_aggregator_member_round", (("group", "g"), ("member", "1")))] == 0
    assert samples[("split_aggregator_member_round", (("group", "g"), ("member", "2")))] == 1
