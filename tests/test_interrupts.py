"""Stopping the client on request: a first SIGINT or SIGTERM stops it within moments in every phase (waiting for
the server, retrying, training, evaluating), a second one at once; the exit status is 128 + the signal's number,
and what it says about checkpoints is true. Real client processes where the behaviour crosses processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from client_part import SplitClient
from client_part.cli import Interrupts
from client_part.stopping import Stopped
from tests.conftest import StartServer, make_data
from tests.faults_support import free_port, wait_for_text

START_TIMEOUT = 120.0  # loading TensorFlow on a busy machine
# Far below --connect-timeout and --retry-timeout (both 300 s below): the client did not wait them out.
STOP_WITHIN = 30.0


@pytest.fixture
def unavailable_server() -> Iterator[int]:
    """A gRPC server that answers every call UNAVAILABLE: the client connects, then retries forever."""

    def refuse(_request: bytes, context: grpc.ServicerContext) -> None:
        context.abort(grpc.StatusCode.UNAVAILABLE, "test: try again later")

    class Refuser(grpc.GenericRpcHandler):
        def service(self, _details: Any) -> grpc.RpcMethodHandler:
            return grpc.unary_unary_rpc_method_handler(refuse)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((Refuser(),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port
    server.stop(grace=None)


def start_client(target: str, log: Path) -> subprocess.Popen[bytes]:
    flags = ["--target", target, "--connect-timeout", "300", "--retry-timeout", "300", "--epochs", "1"]
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", "client_part", *flags], stdout=out, stderr=subprocess.STDOUT)


def interrupt(process: subprocess.Popen[bytes], signum: int) -> int:
    process.send_signal(signum)
    try:
        return process.wait(timeout=STOP_WITHIN)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        pytest.fail(f"{signal.Signals(signum).name} did not stop the client within {STOP_WITHIN:g} s")


@pytest.mark.processes
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_the_client_waiting_for_an_absent_server(tmp_path: Path, signum: int) -> None:
    log = tmp_path / "client.log"
    process = start_client(f"127.0.0.1:{free_port()}", log)
    wait_for_text(log, "waiting up to 300 s for the server", process, START_TIMEOUT)
    time.sleep(0.5)  # inside the wait
    assert interrupt(process, signum) == 128 + signum
    output = log.read_text()
    assert "stopped on request while waiting for the server" in output
    assert "Traceback" not in output


@pytest.mark.processes
def test_sigint_stops_the_client_while_it_retries(tmp_path: Path, unavailable_server: int) -> None:
    log = tmp_path / "client.log"
    process = start_client(f"127.0.0.1:{unavailable_server}", log)
    wait_for_text(log, "retry 2 in", process, START_TIMEOUT)
    assert interrupt(process, signal.SIGINT) == 130
    output = log.read_text()
    assert "stopped on request while retrying handshake" in output
    assert "checkpoint" not in output.split("stopped on request")[-1]
    assert "Traceback" not in output


class StopAfter:
    """A Keras-style callback that asks the client to stop after training step `step`."""

    def __init__(self, client: SplitClient, step: int) -> None:
        self.client, self.step = client, step

    def set_model(self, _model: Any) -> None:
        pass

    def set_params(self, _params: Any) -> None:
        pass

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        if batch + 1 == self.step:
            self.client.request_stop()


def test_a_stop_without_checkpoints_does_not_claim_one(split_pair: StartServer) -> None:
    x, y = make_data()
    split = split_pair("plain", 7)
    with SplitClient(split.bottom, "sgd", target=split.target, connect_timeout=10) as client:
        with pytest.raises(Stopped) as stopped:
            client.fit(x, y, batch_size=16, epochs=3, verbose=0, callbacks=[StopAfter(client, 2)])
        assert client.step < 3 * 4  # stopped, not finished
    message = f"after step {client.step}; no checkpoint was saved (start with --checkpoint-dir"
    assert message in str(stopped.value)
    assert "resume" not in str(stopped.value).split(";")[1].replace("to be able to resume", "")


def test_a_stop_with_checkpoints_names_them(split_pair: StartServer, tmp_path: Path) -> None:
    x, y = make_data()
    split = split_pair("plain", 7)
    directory = tmp_path / "ckpt"
    client = SplitClient(split.bottom, "sgd", target=split.target, checkpoint_dir=directory)
    with client, pytest.raises(Stopped) as stopped:
        client.fit(x, y, batch_size=16, epochs=3, verbose=0, callbacks=[StopAfter(client, 2)])
    assert f"a checkpoint of it is saved in {directory}: run again with the same flags" in str(stopped.value)


def test_a_stop_during_evaluation_ends_it(split_pair: StartServer) -> None:
    x, y = make_data()
    split = split_pair("plain", 7)
    with SplitClient(split.bottom, "sgd", target=split.target, connect_timeout=10) as client:
        client.request_stop()
        with pytest.raises(Stopped, match="while evaluating"):
            client.evaluate(x, y, batch_size=16)
        with pytest.raises(Stopped, match="while predicting"):
            client.predict(x, batch_size=16)


def test_a_second_signal_exits_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    exits: list[int] = []
    monkeypatch.setattr(os, "_exit", exits.append)
    stops = threading.Event()

    class Client:
        def request_stop(self) -> None:
            stops.set()

    interrupts = Interrupts()
    interrupts.client = Client()
    interrupts.handle(signal.SIGTERM, None)
    assert stops.is_set() and not exits and interrupts.exit_code == 143
    interrupts.handle(signal.SIGINT, None)
    assert exits == [130]


def test_a_signal_before_the_client_exists_stops_at_once() -> None:
    with pytest.raises(KeyboardInterrupt, match="while starting"):
        Interrupts().handle(signal.SIGINT, None)
