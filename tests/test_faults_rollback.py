"""The server is killed and restarts from a checkpoint older than the client's step. Outside `fit`, `evaluate`
and `predict` then restore the client's checkpoint of the server's step, so the two parts are one model again,
and answer exactly as a pair trained only to that step does. (They used to pair the client's newer part with the
server's older one without a word: the server did not know the client's step.)"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import pytest

from client_part import SplitClient
from server_part import cli as server_cli
from splitlearning.models import load_part
from tests.faults_support import assert_weights_close, free_port, make_npz, spawn, stop, wait_for

BATCH, SERVER_EVERY = 8, 4
TRAINED, RESUMED = 6, 4  # steps the client trains; the server's latest checkpoint when it is killed
START_TIMEOUT = 120.0  # TensorFlow's import on a busy machine


def server_flags(port: int, checkpoints: Path | None = None) -> list[str]:
    flags = ["--model", "digits-mlp", "--seed", "3", "--optimizer", "adam", "--learning-rate", "0.01"]
    flags += ["--address", f"127.0.0.1:{port}", "--max-batch-size", "64"]
    if checkpoints is not None:
        flags += ["--checkpoint-dir", str(checkpoints), "--checkpoint-every", str(SERVER_EVERY)]
    return flags


def make_client(port: int, checkpoints: Path | None = None, session: str = "") -> SplitClient:
    return SplitClient(
        load_part("digits-mlp", "client", 3),
        keras.optimizers.Adam(0.01),
        target=f"127.0.0.1:{port}",
        max_batch_size=64,
        connect_timeout=START_TIMEOUT,
        checkpoint_dir=checkpoints,
        checkpoint_every=1,
        session_id=session,
    )


@dataclass(frozen=True)
class Data:
    x: np.ndarray
    y: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


@dataclass(frozen=True)
class Reference:
    weights: list[np.ndarray]
    metrics: dict[str, float]
    outputs: np.ndarray


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Data:
    arrays = np.load(make_npz(tmp_path_factory.mktemp("rollback") / "data.npz"))
    return Data(arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"])


def train(client: SplitClient, data: Data, steps: int) -> None:
    client.fit(data.x[: steps * BATCH], data.y[: steps * BATCH], batch_size=BATCH, shuffle=False, verbose=0)
    assert client.step == steps


@pytest.fixture(scope="module")
def reference(data: Data) -> Iterator[Reference]:
    """The pair trained only to the step the server resumes at, in this process, with no fault."""
    server = server_cli.build(server_cli.parse_args(server_flags(0)))
    port = server.start("127.0.0.1:0")
    try:
        with make_client(port) as client:
            train(client, data, RESUMED)
            metrics = client.evaluate(data.x_test, data.y_test, batch_size=BATCH)
            yield Reference(client.model.get_weights(), metrics, client.predict(data.x_test, batch_size=BATCH))
    finally:
        server.stop(grace=1.0)


@contextmanager
def resumed_behind(tmp_path: Path, data: Data, client_checkpoints: bool) -> Iterator[SplitClient]:
    """A client that trained 6 steps against a server process killed then (SIGKILL: nothing saved on the way
    out), and a server restarted from the same flags at its checkpoint of step 4 (in this process: it only has
    to resume, which the flags decide)."""
    port = free_port()
    args = server_flags(port, tmp_path / "server-ckpt")
    server = spawn("server_part", args, tmp_path / "server.log")
    restarted = None
    try:
        with make_client(port, tmp_path / "client-ckpt" if client_checkpoints else None) as client:
            train(client, data, TRAINED)  # the server saved step 4, not 5 or 6
            assert stop(server, signal.SIGKILL) == -signal.SIGKILL
            restarted = server_cli.build(server_cli.parse_args(args))  # resumes at step 4
            restarted.start(f"127.0.0.1:{port}")
            # The client's channel reconnects: the next call reaches the restarted server without any failure,
            # so only the step it names can tell the server that the client's part is ahead of its own.
            wait_for(lambda: _ready(client), START_TIMEOUT, "the restarted server")
            yield client
    finally:
        stop(server)
        if restarted is not None:
            restarted.stop(grace=1.0)


@pytest.mark.processes
@pytest.mark.parametrize("call", ["evaluate", "predict"])
def test_a_call_after_the_server_resumed_behind_restores_the_client(
    tmp_path: Path, data: Data, reference: Reference, call: str
) -> None:
    with resumed_behind(tmp_path, data, client_checkpoints=True) as client:
        if call == "evaluate":
            metrics = client.evaluate(data.x_test, data.y_test, batch_size=BATCH)
            assert metrics.keys() == reference.metrics.keys()
            for name, value in reference.metrics.items():
                np.testing.assert_allclose(metrics[name], value, rtol=1e-5, err_msg=name)
        else:
            outputs = client.predict(data.x_test, batch_size=BATCH)
            np.testing.assert_allclose(outputs, reference.outputs, rtol=1e-5, atol=1e-6)
        assert client.step == RESUMED
        assert_weights_close(client.model.get_weights(), reference.weights, "client part")


@pytest.mark.processes
def test_a_client_that_cannot_roll_back_is_refused_every_time(tmp_path: Path, data: Data) -> None:
    """Without a checkpoint of the server's step the client cannot rejoin: every later call says so, none
    answers for the mismatched pair."""
    with resumed_behind(tmp_path, data, client_checkpoints=False) as client:

        def evaluate() -> object:
            return client.evaluate(data.x_test, data.y_test, batch_size=BATCH)

        def predict() -> object:
            return client.predict(data.x_test, batch_size=BATCH)

        for call in (evaluate, predict, evaluate):
            with pytest.raises(RuntimeError, match="server's session is at step 4 but this client is at step 6"):
                call()
        assert client.step == TRAINED


def _ready(client: SplitClient) -> bool:
    try:
        client._transport.wait_ready(timeout=1.0)
    except ConnectionError:
        return False
    return True


def test_a_client_that_agreed_on_no_step_is_not_checked(data: Data) -> None:
    """Inference with a first part that did not train with this server (its weights brought from elsewhere, its
    step not the server's) names no step, so the server answers it."""
    server = server_cli.build(server_cli.parse_args(server_flags(0)))
    port = server.start("127.0.0.1:0")
    try:
        with make_client(port) as trainer:
            train(trainer, data, 2)
        with make_client(port, session=trainer.session_id) as client:  # the trained session, another first part
            assert client.connect().next_step == 2 and client.step == 0
            metrics = client.evaluate(data.x_test, data.y_test, batch_size=BATCH)
            assert np.isfinite(metrics["loss"])
            assert client.predict(data.x_test, batch_size=BATCH).shape == (len(data.x_test), 10)
            assert client.step == 0
    finally:
        server.stop(grace=1.0)
