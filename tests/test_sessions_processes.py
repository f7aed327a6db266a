"""Sessions across real processes (issue 15): split-client processes train at once against one split-server.

Each client process trains in its own session; each must end with exactly the weights of the same run against
a server of its own (bit for bit: the same flags give the same operations in the same order, and a session's
part is built as a fresh server's), also when the server holding the sessions is killed and restarted.
"""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from server_part import cli as server_cli
from server_part.server import SplitServer
from server_part.session import Session
from tests.exactness_support import assert_same
from tests.faults_support import free_port, latest_step, load_weights, make_npz, spawn, stop, wait_for

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


def wait_all(processes: dict[int, subprocess.Popen[bytes]], logs: dict[int, Path]) -> None:
    try:
        for seed, process in processes.items():
            code = process.wait(timeout=RUN_TIMEOUT)
            assert code == 0, logs[seed].read_text()[-4000:]
    finally:
        for process in processes.values():
            if process.poll() is None:
                stop(process)


def result(out: Path) -> tuple[list[np.ndarray], str]:
    weights, _ = load_weights(out / "client.npz")
    return weights, json.loads((out / "history.json").read_text())["session"]


def test_four_client_processes_at_once_each_train_as_if_alone(
    tmp_path: Path, dataset: Path, ended: list[Ended]
) -> None:
    shared = Ended()
    ended.append(shared)
    alone = {seed: Ended() for seed in SEEDS}
    ended.extend(alone.values())
    processes, logs = {}, {}
    for seed in SEEDS:  # all eight at once: four against the shared server, each also against its own
        for name, port in (("together", shared.port), ("alone", alone[seed].port)):
            key = seed if name == "together" else -seed
            logs[key] = tmp_path / f"{name}-{seed}.log"
            out = tmp_path / f"{name}-{seed}"
            processes[key] = spawn("client_part", client_flags(dataset, port, seed, out), logs[key])
    wait_all(processes, logs)
    sessions = set()
    for seed in SEEDS:
        together, session = result(tmp_path / f"together-{seed}")
        by_itself, own_session = result(tmp_path / f"alone-{seed}")
        sessions.add(session)
        assert_same(together, by_itself, f"client {seed}'s part")
        assert_same(shared.parts[session], alone[seed].parts[own_session], f"client {seed}'s server part")
    assert len(sessions) == len(SEEDS), "two clients shared a session"
    assert not shared.server.sessions.sessions(), "a client did not end its session"


def session_parts(checkpoints: Path, sessions: list[str]) -> dict[str, list[np.ndarray]]:
    """Each session's part at its latest checkpoint, loaded by a server of the same flags in this process."""
    server = server_cli.build(server_cli.parse_args(server_flags("127.0.0.1:0", "--checkpoint-dir", str(checkpoints))))
    return {session: server.sessions.open(session).trainer.model.get_weights() for session in sessions}


def test_a_server_killed_with_three_sessions_resumes_them_all(tmp_path: Path, dataset: Path) -> None:
    seeds = SEEDS[:3]
    runs: dict[str, dict[int, subprocess.Popen[bytes]]] = {}
    logs: dict[str, dict[int, Path]] = {}
    servers: dict[str, subprocess.Popen[bytes]] = {}
    ports = {"killed": free_port(), "reference": free_port()}
    checkpoints = {name: tmp_path / f"{name}-server-ckpt" for name in ports}

    def server_args(name: str) -> list[str]:
        extra = ("--checkpoint-dir", str(checkpoints[name]), "--checkpoint-every", "1")
        return server_flags(f"127.0.0.1:{ports[name]}", *extra)

    try:
        for name in ports:  # the run to interrupt, and the same run left alone, at once
            servers[name] = spawn("server_part", server_args(name), tmp_path / f"{name}-server.log")
            logs[name] = {seed: tmp_path / f"{name}-{seed}.log" for seed in seeds}
            runs[name] = {
                seed: spawn(
                    "client_part",
                    client_flags(
                        dataset,
                        ports[name],
                        seed,
                        tmp_path / f"{name}-{seed}",
                        "--checkpoint-dir",
                        str(tmp_path / f"{name}-{seed}-ckpt"),
                        "--checkpoint-every",
                        "1",
                    ),
                    logs[name][seed],
                )
                for seed in seeds
            }

        def mid_training() -> bool:
            folders = [path for path in checkpoints["killed"].glob("*") if path.is_dir()]
            return len(folders) == 3 and all(latest_step(folder) >= 4 for folder in folders)

        wait_for(mid_training, RUN_TIMEOUT, "three sessions four steps in")
        assert all(p.poll() is None for p in runs["killed"].values()), "a client ended before the kill"
        assert stop(servers["killed"], signal.SIGKILL) == -signal.SIGKILL
        servers["killed"] = spawn("server_part", server_args("killed"), tmp_path / "killed-server.log")
        for name in ports:
            wait_all(runs[name], logs[name])
    finally:
        for process in [*servers.values(), *(p for run in runs.values() for p in run.values())]:
            if process.poll() is None:
                stop(process, signal.SIGTERM)
    assert stop(servers["killed"], signal.SIGTERM) == 0
    assert stop(servers["reference"], signal.SIGTERM) == 0

    results = {name: {seed: result(tmp_path / f"{name}-{seed}") for seed in seeds} for name in ports}
    parts = {name: session_parts(checkpoints[name], [s for _, s in results[name].values()]) for name in ports}
    for seed in seeds:
        (killed, killed_session), (reference, reference_session) = results["killed"][seed], results["reference"][seed]
        assert_same(killed, reference, f"client {seed}'s part")
        assert_same(parts["killed"][killed_session], parts["reference"][reference_session], f"session {seed}'s part")
    assert "resumed session" in (tmp_path / "killed-server.log").read_text()
