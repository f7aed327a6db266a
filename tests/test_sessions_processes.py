"""Sessions across real processes (issue 15): split-client processes train at once against one split-server.

Each client process trains in its own session; each must end with exactly the weights of the same run against
a server of its own (bit for bit: the same flags give the same operations in the same order, and a session's
part is built as a fresh server's), also when the server holding the sessions is killed and restarted. Those
runs alone (`alone`) are made once, for both tests.
"""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from server_part import cli as server_cli
from server_part.server import SplitServer
from server_part.session import Session
from tests.exactness_support import assert_same
from tests.faults_support import exit_code, free_port, latest_step, load_weights, make_npz, spawn, stop, wait_for

pytestmark = pytest.mark.processes  # every test here starts OS processes

SEEDS = (1, 2, 3, 4)
EPOCHS, BATCH = 3, 8
RUN_TIMEOUT = 300.0  # several TensorFlow processes starting at once on two cores
COMMON = ["--model", "digits-mlp", "--optimizer", "adam", "--learning-rate", "0.01", "--log-level", "INFO"]


def server_flags(address: str, *extra: str) -> list[str]:
    return [*COMMON, "--seed", "7", "--address", address, "--max-batch-size", "64", *extra]


def client_flags(dataset: Path, port: int, seed: int, out: Path, *extra: str) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    return [
        *COMMON,
        "--seed",
        str(seed),
        "--target",
        f"127.0.0.1:{port}",
        "--dataset",
        str(dataset),
        "--batch-size",
        str(BATCH),
        "--epochs",
        str(EPOCHS),
        "--connect-timeout",
        str(RUN_TIMEOUT),
        "--retry-timeout",
        str(RUN_TIMEOUT),
        "--rpc-timeout",
        "60",
        "--save-weights",
        str(out / "client.npz"),
        "--history-json",
        str(out / "history.json"),
        *extra,
    ]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_npz(tmp_path_factory.mktemp("sessions") / "data.npz", n_train=64)


class Ended:
    """An in-process server of the CLI's flags that keeps each session's final part as it ends."""

    def __init__(self, *extra: str) -> None:
        self.parts: dict[str, list[np.ndarray]] = {}
        self.server: SplitServer = server_cli.build(server_cli.parse_args(server_flags("127.0.0.1:0", *extra)))
        self.server.on_session_end = self._keep
        self.port = self.server.start("127.0.0.1:0")

    def _keep(self, session: Session) -> None:
        self.parts[session.id] = [np.array(w) for w in session.trainer.model.get_weights()]


@pytest.fixture
def ended() -> Iterator[list[Ended]]:
    started: list[Ended] = []
    yield started
    for each in started:
        each.server.stop(grace=1.0)


@dataclass(frozen=True)
class Alone:
    """A seed's run against a server of its own, with no other session: the client's and the server's part."""

    client: list[np.ndarray]
    server: list[np.ndarray]


@pytest.fixture(scope="module")
def alone(tmp_path_factory: pytest.TempPathFactory, dataset: Path) -> Iterator[dict[int, Alone]]:
    """Each seed's client process against an in-process server of its own, all at once, without checkpoints:
    what every run below must end with, bit for bit (checkpoints change no weight)."""
    base = tmp_path_factory.mktemp("alone")
    servers = {seed: Ended() for seed in SEEDS}
    try:
        logs = {seed: base / f"alone-{seed}.log" for seed in SEEDS}
        processes = {
            seed: spawn("client_part", client_flags(dataset, servers[seed].port, seed, base / f"alone-{seed}"), log)
            for seed, log in logs.items()
        }
        wait_all(processes, logs)
        runs = {}
        for seed in SEEDS:
            weights, session = result(base / f"alone-{seed}")
            runs[seed] = Alone(weights, servers[seed].parts[session])
    finally:
        for each in servers.values():
            each.server.stop(grace=1.0)
    yield runs


def wait_all(
    processes: dict[int, subprocess.Popen[bytes]],
    logs: dict[int, Path],
    server: tuple[subprocess.Popen[bytes], Path] | None = None,
) -> None:
    """Each client exits 0 (a hung one fails the test with its stacks and its `server`'s: process and log)."""
    try:
        for seed, process in processes.items():
            peers = [server] if server is not None else []
            code = exit_code(process, logs[seed], RUN_TIMEOUT, f"client {seed}", peers)
            assert code == 0, logs[seed].read_text()[-4000:]
    finally:
        for process in processes.values():
            if process.poll() is None:
                stop(process)


def result(out: Path) -> tuple[list[np.ndarray], str]:
    weights, _ = load_weights(out / "client.npz")
    return weights, json.loads((out / "history.json").read_text())["session"]


def test_four_client_processes_at_once_each_train_as_if_alone(
    tmp_path: Path, dataset: Path, ended: list[Ended], alone: dict[int, Alone]
) -> None:
    shared = Ended()
    ended.append(shared)
    processes, logs = {}, {}
    for seed in SEEDS:  # all four at once against the shared server
        logs[seed] = tmp_path / f"together-{seed}.log"
        out = tmp_path / f"together-{seed}"
        processes[seed] = spawn("client_part", client_flags(dataset, shared.port, seed, out), logs[seed])
    wait_all(processes, logs)
    sessions = set()
    for seed in SEEDS:
        together, session = result(tmp_path / f"together-{seed}")
        sessions.add(session)
        assert_same(together, alone[seed].client, f"client {seed}'s part")
        assert_same(shared.parts[session], alone[seed].server, f"client {seed}'s server part")
    assert len(sessions) == len(SEEDS), "two clients shared a session"
    assert not shared.server.sessions.sessions(), "a client did not end its session"


def session_parts(checkpoints: Path, sessions: list[str]) -> dict[str, list[np.ndarray]]:
    """Each session's part at its latest checkpoint, loaded by a server of the same flags in this process."""
    server = server_cli.build(server_cli.parse_args(server_flags("127.0.0.1:0", "--checkpoint-dir", str(checkpoints))))
    return {session: server.sessions.open(session).trainer.model.get_weights() for session in sessions}


def test_a_server_killed_with_three_sessions_resumes_them_all(
    tmp_path: Path, dataset: Path, alone: dict[int, Alone]
) -> None:
    seeds = SEEDS[:3]
    port = free_port()
    checkpoints = tmp_path / "server-ckpt"
    server_args = server_flags(f"127.0.0.1:{port}", "--checkpoint-dir", str(checkpoints), "--checkpoint-every", "1")
    logs = {seed: tmp_path / f"client-{seed}.log" for seed in seeds}
    server = spawn("server_part", server_args, tmp_path / "server.log")
    clients: dict[int, subprocess.Popen[bytes]] = {}
    try:
        for seed in seeds:
            extra = ("--checkpoint-dir", str(tmp_path / f"client-{seed}-ckpt"), "--checkpoint-every", "1")
            clients[seed] = spawn(
                "client_part", client_flags(dataset, port, seed, tmp_path / f"client-{seed}", *extra), logs[seed]
            )

        def mid_training() -> bool:
            folders = [path for path in checkpoints.glob("*") if path.is_dir()]
            return len(folders) == 3 and all(latest_step(folder) >= 4 for folder in folders)

        wait_for(mid_training, RUN_TIMEOUT, "three sessions four steps in")
        assert all(p.poll() is None for p in clients.values()), "a client ended before the kill"
        assert stop(server, signal.SIGKILL) == -signal.SIGKILL
        server = spawn("server_part", server_args, tmp_path / "server.log")
        wait_all(clients, logs, (server, tmp_path / "server.log"))
    finally:
        for process in [server, *clients.values()]:
            if process.poll() is None:
                stop(process, signal.SIGTERM)
    assert stop(server, signal.SIGTERM) == 0

    results = {seed: result(tmp_path / f"client-{seed}") for seed in seeds}
    parts = session_parts(checkpoints, [session for _, session in results.values()])
    for seed, (weights, session) in results.items():  # each as if it had trained alone, never interrupted
        assert_same(weights, alone[seed].client, f"client {seed}'s part")
        assert_same(parts[session], alone[seed].server, f"session {seed}'s part")
    assert "resumed session" in (tmp_path / "server.log").read_text()
