"""Structured logs: one format with step, session and peer; per-step lines only at DEBUG."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import keras
import pytest

from client_part import SplitClient
from server_part import SplitServer
from splitlearning import logs
from tests.conftest import StartServer, build_pair, make_data, make_loss
from tests.observability_support import captured


def record(message: str, **extra: object) -> logging.LogRecord:
    item = logging.LogRecord("split-test", logging.INFO, __file__, 1, message, None, None)
    for key, value in extra.items():
        setattr(item, key, value)
    logs.ContextFilter().filter(item)
    return item


def test_text_and_json_lines_carry_the_bound_fields() -> None:
    with logs.bind(session="abc", peer="ipv4:127.0.0.1:1"), logs.bind(step=4):
        text = logs.TextFormatter().format(record("hello %s", epoch=2))
        entry = json.loads(logs.JsonFormatter().format(record("hello")))
        logs.update(step=5)
        assert logs.current()["step"] == 5
    assert text.endswith("INFO split-test: hello %s session=abc step=4 epoch=2 peer=ipv4:127.0.0.1:1")
    assert entry["message"] == "hello" and entry["level"] == "INFO" and entry["logger"] == "split-test"
    assert (entry["session"], entry["step"], entry["peer"]) == ("abc", 4, "ipv4:127.0.0.1:1")
    assert logs.current() == {}  # nothing leaks out of the blocks
    with logs.bind(step=1), logs.bind(fresh=True, peer="p"):
        assert logs.current() == {"peer": "p"}
    assert logs.TextFormatter().format(record("plain")).endswith("split-test: plain")


def test_server_and_client_step_lines_name_step_session_and_peer(split_pair: StartServer) -> None:
    split = split_pair("plain", 2)
    x, y = make_data(n=32)
    with (
        captured("server_part.interceptor") as server_lines,
        captured("split-client") as client_lines,
        SplitClient(split.bottom, "sgd", target=split.target, connect_timeout=10) as client,
    ):
        client.fit(x, y, batch_size=16, epochs=2, verbose=0)
    session = split.server.session().id
    answered = [r for r in server_lines.records if r.getMessage().startswith("step answered")]
    assert [r.step for r in answered] == [0, 1, 2, 3]  # type: ignore[attr-defined]
    assert {r.session for r in answered} == {session}  # type: ignore[attr-defined]
    assert all(r.peer.startswith("ipv4:127.0.0.1:") for r in answered)  # type: ignore[attr-defined]
    assert {r.levelno for r in answered} == {logging.DEBUG}

    done = [r for r in client_lines.records if r.getMessage().startswith("step done")]
    assert [r.step for r in done] == [1, 2, 3, 4] and {r.levelno for r in done} == {logging.DEBUG}  # type: ignore[attr-defined]
    epochs = [r for r in client_lines.records if r.levelno == logging.INFO]
    assert [(r.epoch, r.step, r.session, r.peer) for r in epochs] == [  # type: ignore[attr-defined]
        (1, 2, session, split.target),
        (2, 4, session, split.target),
    ]


def test_the_server_numbers_epochs_as_the_client_does(
    split_pair: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    """After a resume (here: `initial_epoch`, as Keras takes it) the server's epoch lines carry the client's epoch
    numbers, not a count that started again at 1 (issue 19)."""
    split = split_pair("plain", 3)
    x, y = make_data(20)
    with caplog.at_level(logging.INFO, logger="server_part.telemetry"):
        with SplitClient(split.bottom, "sgd", target=split.target, connect_timeout=10) as client:
            client.fit(x, y, batch_size=10, epochs=7, initial_epoch=5, verbose=0)
        split.server.stop(grace=1.0)  # closes the last epoch
    epochs = [r.getMessage().split(":")[0] for r in caplog.records if r.name == "server_part.telemetry"]
    assert epochs == ["epoch 6", "epoch 7"], epochs


def test_a_server_restarted_mid_epoch_numbers_it_as_the_client_does(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The server stops after the second step of the second epoch and a new one takes over from its checkpoint:
    the client goes on mid-epoch (no metrics reset), and the new server's epoch line says epoch 2, not 0."""
    bottom, _ = build_pair("plain", 3)
    servers: list[SplitServer] = []

    def serve(port: int = 0) -> int:
        _, part = build_pair("plain", 3)
        server = SplitServer(part, make_loss(), "sgd", ["accuracy"], checkpoint_dir=tmp_path, checkpoint_every=0)
        servers.append(server)
        return server.start(f"127.0.0.1:{port}")

    class RestartServer(keras.callbacks.Callback):
        def on_train_batch_end(self, batch: int, logs: dict[str, float] | None = None) -> None:
            if len(servers) == 1 and client.step == 6:  # epoch 2 (index 1), two of its four steps done
                servers[0].stop(grace=1.0)  # saves the session at step 6
                serve(port)

    port = serve()
    x, y = make_data(40)
    try:
        with caplog.at_level(logging.INFO, logger="server_part.telemetry"):
            with SplitClient(bottom, "sgd", target=f"127.0.0.1:{port}", connect_timeout=10) as client:
                client.fit(x, y, batch_size=10, epochs=3, verbose=0, callbacks=[RestartServer()])
            servers[-1].stop(grace=1.0)
    finally:
        for server in servers:
            server.stop(grace=1.0)
    assert len(servers) == 2, "the server was not restarted"
    epochs = [r.getMessage().split(":")[0] for r in caplog.records if r.name == "server_part.telemetry"]
    assert epochs == ["epoch 1", "epoch 2", "epoch 2", "epoch 3"], epochs


def test_a_pipelined_run_numbers_its_epochs_as_the_client_does(
    split_pair: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    """With micro-batches a step's reset comes with its first micro-batch and the server counts the last: each
    step carries its epoch, so three epochs without validation are three epoch lines, not one."""
    split = split_pair("plain", 3)
    x, y = make_data(20)
    with caplog.at_level(logging.INFO, logger="server_part.telemetry"):
        with SplitClient(split.bottom, "sgd", target=split.target, connect_timeout=10, micro_batches=2) as client:
            client.fit(x, y, batch_size=10, epochs=3, verbose=0)
        split.server.stop(grace=1.0)  # closes the last epoch
    epochs = [r.getMessage().split(":")[0] for r in caplog.records if r.name == "server_part.telemetry"]
    assert epochs == ["epoch 1", "epoch 2", "epoch 3"], epochs
