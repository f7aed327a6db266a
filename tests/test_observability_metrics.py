"""The server's Prometheus endpoint: counters move with training, errors are counted by status code."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from client_part import RemoteError, SplitClient
from client_part.transport import Transport
from server_part import SplitServer
from splitlearning.contract import Spec
from tests.conftest import StartServer, build_top, make_data, make_loss
from tests.observability_support import scrape, value
from tests.raw_support import UNDECODABLE, send_raw

BATCH = 16


def test_counters_move_with_training(split_pair: StartServer) -> None:
    split = split_pair("plain", 3, metrics_port=0)
    port = split.server.metrics_port
    assert port is not None and port != split.port
    before = scrape(port)
    assert value(before, "split_server_steps_total") == 0
    assert value(before, "split_server_step") == 0

    x, y = make_data()  # 50 samples: 4 steps per epoch
    with SplitClient(split.bottom, "sgd", target=split.target, connect_timeout=10) as client:
        history = client.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
        after = scrape(port)
        steps, totals = client.step, client.meter.totals
        client.end_session()
        closed = scrape(port)

    assert steps == 8
    assert value(after, "split_server_steps_total") == steps
    assert value(after, "split_server_requests_total", method="Train") == steps
    assert value(after, "split_server_requests_total", method="Handshake") == 1
    assert value(after, "split_server_step", session=client.session_id) == steps
    # Every byte the client counted leaving arrived, and the other way round.
    assert value(after, "split_server_received_bytes_total", method="Train") == totals.bytes_sent > steps * BATCH * 4
    assert value(after, "split_server_sent_bytes_total", method="Train") == totals.bytes_received > 0
    # Latency: one observation per step, all in the buckets; the trainer's time is part of it.
    assert value(after, "split_server_latency_seconds_count", method="Train") == steps
    assert value(after, "split_server_latency_seconds_bucket", method="Train", le="+Inf") == steps
    latency_sum = value(after, "split_server_latency_seconds_sum", method="Train")
    assert 0 < value(after, "split_server_compute_seconds_total") <= latency_sum
    p50 = value(after, "split_server_step_latency_recent_seconds", quantile="0.5")
    p99 = value(after, "split_server_step_latency_recent_seconds", quantile="0.99")
    assert 0 < p50 <= p99 <= latency_sum
    final_loss = value(after, "split_server_train_metric", session=client.session_id, name="loss")
    np.testing.assert_allclose(final_loss, history.history["loss"][-1])
    assert not [key for key in after if key[0] == "split_server_errors_total"]
    # A session's own series leave with it; the server-wide totals stay.
    assert value(after, "split_server_sessions") == 1 and value(closed, "split_server_sessions") == 0
    assert not [key for key in closed if ("session", client.session_id) in key[1]]
    assert value(closed, "split_server_steps_total") == steps


def test_errors_are_counted_by_status_code(split_pair: StartServer) -> None:
    split = split_pair("plain", 3, metrics_port=0)
    assert split.server.metrics_port is not None
    iv = np.zeros((2, 5), "float32")
    labels = np.zeros(2, "int64")
    transport = Transport(split.target, 1 << 20, rpc_timeout=10)
    try:
        transport.wait_ready(10)
        transport.handshake(Spec((5,), np.dtype("float32")), None, 8)
        session = transport.session_id
        transport.session_id = "no-such-session"
        with pytest.raises(RemoteError) as not_found:
            transport.predict(iv)
        transport.session_id = session
        with pytest.raises(RemoteError) as out_of_order:
            transport.train(5, iv, labels, reset=True)  # the server expects step 0
        with pytest.raises(RemoteError) as bad_labels:
            transport.evaluate(iv, np.full(2, 7, "int64"), reset=True)  # 3 classes
        handshake_bytes = value(
            scrape(split.server.metrics_port), "split_server_received_bytes_total", method="Handshake"
        )
        undecodable = [_status(split.target, method, UNDECODABLE) for method in ("Train", "Handshake")]
    finally:
        transport.close()
    assert not_found.value.code.name == "NOT_FOUND"
    assert out_of_order.value.code.name == "FAILED_PRECONDITION"
    assert bad_labels.value.code.name == "INVALID_ARGUMENT"
    assert undecodable == [grpc.StatusCode.INVALID_ARGUMENT] * 2

    samples = scrape(split.server.metrics_port)
    assert value(samples, "split_server_errors_total", method="Predict", code="NOT_FOUND") == 1
    assert value(samples, "split_server_errors_total", method="Train", code="FAILED_PRECONDITION") == 1
    assert value(samples, "split_server_errors_total", method="Evaluate", code="INVALID_ARGUMENT") == 1
    # Bytes that are no message: refused by the servicer and counted like any refusal, with their size.
    assert value(samples, "split_server_errors_total", method="Train", code="INVALID_ARGUMENT") == 1
    assert value(samples, "split_server_errors_total", method="Handshake", code="INVALID_ARGUMENT") == 1
    received = value(samples, "split_server_received_bytes_total", method="Handshake")
    assert received == handshake_bytes + len(UNDECODABLE)
    assert value(samples, "split_server_steps_total") == 0


def _status(target: str, method: str, payload: bytes) -> grpc.StatusCode:
    with grpc.insecure_channel(target) as channel:
        try:
            send_raw(channel, method, payload)
        except grpc.RpcError as error:
            return error.code()
    return grpc.StatusCode.OK


def test_servers_in_one_process_count_apart(split_pair: StartServer) -> None:
    first = split_pair("plain", 1, metrics_port=0)
    second = split_pair("plain", 2, metrics_port=0)
    x, y = make_data(n=32)
    with SplitClient(first.bottom, "sgd", target=first.target, connect_timeout=10) as client:
        client.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
    assert first.server.metrics_port is not None and second.server.metrics_port is not None
    assert value(scrape(first.server.metrics_port), "split_server_steps_total") == 2
    assert value(scrape(second.server.metrics_port), "split_server_steps_total") == 0


def test_metrics_are_off_by_default_and_stop_with_the_server() -> None:
    quiet = SplitServer(build_top("plain", 0), make_loss(), "sgd")
    quiet.start("127.0.0.1:0")
    try:
        assert quiet.metrics_port is None
    finally:
        quiet.stop(grace=1)
    server = SplitServer(build_top("plain", 0), make_loss(), "sgd", metrics_port=0)
    server.start("127.0.0.1:0")
    port = server.metrics_port
    assert port is not None
    assert value(scrape(port), "split_server_steps_total") == 0
    server.stop(grace=1)
    assert server.metrics_port is None
    with pytest.raises(OSError):
        scrape(port)


def test_a_resent_step_counts_as_a_request_not_as_a_step(split_pair: StartServer) -> None:
    split = split_pair("plain", 3, metrics_port=0)
    assert split.server.metrics_port is not None
    x, y = make_data(n=BATCH)
    iv = np.asarray(split.bottom(x), dtype="float32")
    transport = Transport(split.target, 1 << 20, rpc_timeout=10)
    try:
        transport.wait_ready(10)
        transport.handshake(Spec((iv.shape[1],), np.dtype("float32")), None, BATCH)
        first, _ = transport.train(0, iv, y, True)
        transport._close_stream()  # as after a lost reply: the client sends the step again on a new stream
        again, _ = transport.train(0, iv, y, True)
        np.testing.assert_array_equal(first, again)
    finally:
        transport.close()
    after = scrape(split.server.metrics_port)
    assert split.server.session().resent == 1
    assert value(after, "split_server_requests_total", method="Train") == 2
    steps = value(after, "split_server_step", session=split.server.session().id)
    assert value(after, "split_server_steps_total") == 1 == steps
