"""Kill either process mid-epoch (SIGKILL) or stop the server (SIGTERM), restart it with the same flags: the run
completes and the final weights on both sides equal those of an uninterrupted run with the same seed."""

from __future__ import annotations

import random
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from client_part import cli as client_cli
from server_part import cli as server_cli
from tests.faults_support import (
    assert_weights_close,
    exit_code,
    free_port,
    latest_session_step,
    latest_step,
    load_weights,
    make_npz,
    spawn,
    stop,
    wait_for,
)

pytestmark = pytest.mark.processes  # every test here starts OS processes

EPOCHS, BATCH, TRAIN = 4, 8, 96
# split-client trains on the first 90% (its default --validation-split 0.1 holds the rest out): 11 steps an epoch.
TOTAL_STEPS = EPOCHS * -(-int(TRAIN * 0.9) // BATCH)  # 44
START_TIMEOUT = 120.0  # TensorFlow's import on a busy machine
RUN_TIMEOUT = 240.0


def common_flags(dataset: Path) -> list[str]:
    return ["--model", "digits-mlp", "--seed", "3", "--optimizer", "adam", "--learning-rate", "0.01"]


def client_flags(dataset: Path, port: int) -> list[str]:
    return [
        *common_flags(dataset),
        "--target",
        f"127.0.0.1:{port}",
        "--dataset",
        str(dataset),
        "--batch-size",
        str(BATCH),
        "--epochs",
        str(EPOCHS),
        "--connect-timeout",
        str(START_TIMEOUT),
        "--retry-timeout",
        str(START_TIMEOUT),
        "--rpc-timeout",
        "30",
        "--log-level",
        "INFO",
    ]


def server_flags(port: int) -> list[str]:
    return [*common_flags(Path()), "--address", f"127.0.0.1:{port}", "--max-batch-size", "64", "--log-level", "INFO"]


@dataclass(frozen=True)
class Reference:
    client: list[np.ndarray]
    server: list[np.ndarray]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def dataset(workdir: Path) -> Path:
    return make_npz(workdir / "data.npz", n_train=TRAIN)


@pytest.fixture(scope="module")
def reference(workdir: Path, dataset: Path) -> Iterator[Reference]:
    """The uninterrupted run, in this process, built from the same flags by the same CLI code."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    server = server_cli.build(server_cli.parse_args(server_flags(0)))
    port = server.start("127.0.0.1:0")
    try:
        out = workdir / "reference-client.npz"
        client_cli.run(client_cli.parse_args([*client_flags(dataset, port), "--save-weights", str(out)]))
        client_weights, client_steps = load_weights(out)
    finally:
        server.stop(grace=1.0)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert client_steps == TOTAL_STEPS == server.trainer.iterations
    yield Reference(client_weights, server.model.get_weights())


Interruption = tuple[str, int]  # (victim: "server" or "client", signal)


def run_interrupted(workdir: Path, dataset: Path, name: str, interruptions: list[Interruption]) -> tuple[Path, Path]:
    """Train with checkpoints every step; at seeded steps mid-epoch, signal each victim in turn, restart it."""
    base = workdir / name
    base.mkdir()
    port = free_port()
    rng = random.Random(name)
    server_args = [*server_flags(port), "--checkpoint-dir", str(base / "server-ckpt"), "--checkpoint-every", "1"]
    server_args += ["--save-weights", str(base / "server.npz")]
    client_args = [*client_flags(dataset, port), "--checkpoint-dir", str(base / "client-ckpt")]
    client_args += ["--checkpoint-every", "1", "--save-weights", str(base / "client.npz")]
    server = spawn("server_part", server_args, base / "server.log")
    client = spawn("client_part", client_args, base / "client.log")
    try:
        kill_at = 0
        for victim, sig in interruptions:
            kill_at = rng.randrange(kill_at + 5, kill_at + 16)  # mid-epoch, before the last epoch ends
            watched = base / ("server-ckpt" if victim == "server" else "client-ckpt")
            step_of = latest_session_step if victim == "server" else latest_step
            wait_for(
                lambda w=watched, k=kill_at, c=client, f=step_of: f(w) >= k or c.poll() is not None,  # type: ignore[misc]
                RUN_TIMEOUT,
                f"{victim} to reach step {kill_at}",
            )
            assert client.poll() is None, f"the client ended before the {victim} could be interrupted"
            assert step_of(watched) < TOTAL_STEPS, "interrupted too late to prove anything"
            if victim == "server":
                code = stop(server, sig, timeout=10.0)  # SIGTERM: within compose's 10 s
                assert code == (0 if sig == signal.SIGTERM else -signal.SIGKILL), (base / "server.log").read_text()
                server = spawn("server_part", server_args, base / "server.log")
            else:
                stop(client, sig)
                client = spawn("client_part", client_args, base / "client.log")
        code = exit_code(client, base / "client.log", RUN_TIMEOUT, "the client", [(server, base / "server.log")])
        assert code == 0, (base / "client.log").read_text()[-5000:]
        assert stop(server, signal.SIGTERM, timeout=10.0) == 0, (base / "server.log").read_text()[-5000:]
    finally:
        for process in (client, server):
            if process.poll() is None:
                stop(process)
    return base / "client.npz", base / "server.npz"


@pytest.mark.parametrize(
    "interruptions",
    [[("server", signal.SIGKILL)], [("client", signal.SIGKILL), ("server", signal.SIGTERM)]],
    ids=["server-SIGKILL", "client-SIGKILL-then-server-SIGTERM"],
)
def test_interrupted_run_equals_uninterrupted(
    workdir: Path, dataset: Path, reference: Reference, interruptions: list[Interruption]
) -> None:
    name = "-".join(f"{victim}{int(sig)}" for victim, sig in interruptions)
    client_file, server_file = run_interrupted(workdir, dataset, name, interruptions)
    client_weights, client_steps = load_weights(client_file)
    server_weights, server_steps = load_weights(server_file)
    assert client_steps == server_steps == TOTAL_STEPS
    assert_weights_close(client_weights, reference.client, "client part")
    assert_weights_close(server_weights, reference.server, "server part")
