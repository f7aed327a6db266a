"""Idle links stay up: the client's keepalive pings are ones the server accepts, so a pause between steps (a
slow data loader) keeps the training stream open. Scaled down from the defaults (client every 30 s, server
accepts every 10 s) to the same ratio in milliseconds, so the pause spans many ping intervals."""

from __future__ import annotations

import time

import keras

from client_part import SplitClient
from server_part import SplitServer
from tests.conftest import build_pair, make_data, make_loss

IDLE_SECONDS = 3.0


def _train_across_a_pause(client_ping_ms: int, server_min_ping_ms: int) -> tuple[bool, int]:
    """Train a step, stay idle, train another; return (same stream after the pause, server resends)."""
    bottom, top = build_pair("plain", 5)
    server = SplitServer(top, make_loss(), keras.optimizers.SGD(0.1), min_ping_interval_ms=server_min_ping_ms)
    port = server.start("127.0.0.1:0")
    x, y = make_data(n=16)
    try:
        with SplitClient(
            bottom, keras.optimizers.SGD(0.1), target=f"127.0.0.1:{port}", keepalive_ms=client_ping_ms
        ) as client:
            client.fit(x, y, batch_size=16, epochs=1, verbose=0)
            stream = client._transport._call
            time.sleep(IDLE_SECONDS)
            client.fit(x, y, batch_size=16, epochs=2, initial_epoch=1, verbose=0)
            assert client.step == 2 and server.session().next_step == 2
            return client._transport._call is stream, server.session().resent
    finally:
        server.stop(grace=1.0)


def test_agreeing_keepalive_keeps_an_idle_stream_open() -> None:
    same_stream, resent = _train_across_a_pause(client_ping_ms=300, server_min_ping_ms=100)
    assert same_stream, "the training stream was reopened after an idle pause"
    assert resent == 0
