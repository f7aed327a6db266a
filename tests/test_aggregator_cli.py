"""`split-aggregator` as a process (`python -m aggregator`): no TensorFlow, one line for each set-up mistake,
the port file, SIGTERM, and a group's round kept in --state-dir across a kill -9."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from splitlearning import codec
from splitlearning.v1 import split_learning_pb2 as pb
from splitlearning.v1 import split_learning_pb2_grpc as pb_grpc
from tests.faults_support import ROOT, spawn, stop, wait_for
from tests.raw_support import model_state

pytestmark = pytest.mark.processes  # every test here starts OS processes

TIMEOUT = 10.0
SETTINGS = pb.GroupSettings(scheme=pb.SCHEME_SPLITFED, rounds=3, local_epochs=1)


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aggregator", *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


def error_lines(text: str) -> list[str]:
    assert "Traceback" not in text, text
    return [line for line in text.splitlines() if "error" in line.lower()]


def weights(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(3, 2)).astype(np.float32), rng.normal(size=(2,)).astype(np.float32)]


class Aggregator:
    """A `split-aggregator` process on 127.0.0.1 port 0, its port read from --port-file."""

    def __init__(self, tmp_path: Path, *flags: str) -> None:
        self.log = tmp_path / "aggregator.log"
        self.port_file = tmp_path / "port"
        self.port_file.unlink(missing_ok=True)
        self.process = spawn(
            "aggregator", ["--address", "127.0.0.1:0", "--port-file", str(self.port_file), *flags], self.log
        )
        wait_for(self._ready, 30, f"the aggregator's port file (log: {self.text()})")
        self.port = int(self.port_file.read_text())
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = pb_grpc.AggregatorServiceStub(self.channel)

    def _ready(self) -> bool:
        assert self.process.poll() is None, self.text()
        return self.port_file.is_file() and self.port_file.read_text().endswith("\n")

    def text(self) -> str:
        return self.log.read_text() if self.log.is_file() else ""

    def stop(self, sig: int = signal.SIGKILL) -> int:
        self.channel.close()
        return stop(self.process, sig)


@pytest.fixture
def aggregators() -> Iterator[list[Aggregator]]:
    started: list[Aggregator] = []
    yield started
    for aggregator in started:
        aggregator.stop()


def test_help_is_fast_and_needs_no_tensorflow() -> None:
    probe = (
        "import runpy, sys\n"
        "sys.argv = ['split-aggregator', '--help']\n"
        "try:\n"
        "    runpy.run_module('aggregator', run_name='__main__')\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('TENSORFLOW LOADED' if 'tensorflow' in sys.modules or 'keras' in sys.modules else 'NO TENSORFLOW')\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: split-aggregator [FLAG VALUE ...]")
    for flag in ("--members", "--round-deadline", "--min-members", "--state-dir"):
        assert flag in result.stdout
    assert result.stdout.rstrip().endswith("NO TENSORFLOW")


def test_serving_a_round_needs_no_tensorflow(tmp_path: Path) -> None:
    """The whole program in one process: main(), a join and two submissions over gRPC, SIGTERM."""
    port_file = tmp_path / "port"
    probe = f"""
import os, signal, sys, threading, time
import grpc, numpy as np
from aggregator import cli
from splitlearning import codec
from splitlearning.v1 import split_learning_pb2 as pb, split_learning_pb2_grpc as pb_grpc

def member():
    while not os.path.exists({str(port_file)!r}):
        time.sleep(0.02)
    time.sleep(0.1)
    with grpc.insecure_channel('127.0.0.1:' + open({str(port_file)!r}).read().strip()) as channel:
        stub = pb_grpc.AggregatorServiceStub(channel)
        state = pb.ModelState()
        codec.write(np.ones(3, np.float32), state.weights.add())
        settings = pb.GroupSettings(scheme=pb.SCHEME_SPLITFED, rounds=1, local_epochs=1)
        stub.JoinRound(pb.JoinRoundRequest(group='g', member=1, settings=settings, initial=state), timeout=10)
        for k in (1, 2):
            stub.SubmitRound(pb.SubmitRoundRequest(group='g', member=k, round=0, state=state, samples=1), timeout=10)
        answer = stub.JoinRound(pb.JoinRoundRequest(group='g', member=2, settings=settings), timeout=10)
        print('ANSWER', pb.JoinRoundResponse.Action.Name(answer.action), flush=True)
    os.kill(os.getpid(), signal.SIGTERM)

threading.Thread(target=member, daemon=True).start()
code = cli.main(['--address', '127.0.0.1:0', '--port-file', {str(port_file)!r}, '--grace', '0'])
print('EXIT', code)
print('LOADED', sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras')))
"""
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["ANSWER ACTION_DONE", "EXIT 0", "LOADED []"], result.stderr


def test_more_min_members_than_members_is_one_line() -> None:
    result = run("--min-members", "3", "--members", "2")
    assert result.returncode == 2
    assert error_lines(result.stderr) == ["split-aggregator: error: --min-members 3 is more than --members 2"]


def test_a_port_in_use_is_one_line(listening: int) -> None:
    result = run("--address", f"127.0.0.1:{listening}")
    assert result.returncode == 2
    (line,) = error_lines(result.stderr)
    assert f"port {listening} is already in use" in line
    assert " ERROR " in line


def test_port_file_health_and_sigterm(tmp_path: Path, aggregators: list[Aggregator]) -> None:
    metrics_file = tmp_path / "metrics-port"
    aggregator = Aggregator(tmp_path, "--metrics-port", "0", "--metrics-port-file", str(metrics_file), "--grace", "1")
    aggregators.append(aggregator)
    health = health_pb2_grpc.HealthStub(aggregator.channel)
    for service in ("", "splitlearning.v1.AggregatorService"):
        status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    assert int(metrics_file.read_text()) > 0
    assert f"serving splitlearning.v1.AggregatorService on 127.0.0.1:0 (port {aggregator.port}" in aggregator.text()
    assert aggregator.stop(signal.SIGTERM) == 0
    lines = aggregator.text().splitlines()
    assert any("SIGTERM: stopping (grace 1 s)" in line for line in lines), lines
    assert lines[-1].endswith("stopped"), lines
    assert error_lines(aggregator.text()) == []


def test_a_round_survives_kill_9_with_state_dir(tmp_path: Path, aggregators: list[Aggregator]) -> None:
    flags = ("--members", "2", "--round-deadline", "0", "--state-dir", str(tmp_path / "state"))
    first = Aggregator(tmp_path, *flags)
    aggregators.append(first)
    joined = first.stub.JoinRound(
        pb.JoinRoundRequest(group="g", member=1, settings=SETTINGS, initial=model_state(weights(0))), timeout=TIMEOUT
    )
    assert (joined.action, joined.round) == (pb.JoinRoundResponse.ACTION_TRAIN, 0)
    one = pb.SubmitRoundRequest(group="g", member=1, round=0, state=model_state(weights(1)), samples=30)
    assert first.stub.SubmitRound(one, timeout=TIMEOUT).submitted == 1
    assert first.stop(signal.SIGKILL) == -signal.SIGKILL

    second = Aggregator(tmp_path, *flags)
    aggregators.append(second)
    waiting = second.stub.JoinRound(pb.JoinRoundRequest(group="g", member=1, settings=SETTINGS), timeout=TIMEOUT)
    assert (waiting.action, waiting.round) == (pb.JoinRoundResponse.ACTION_WAIT, 0)
    two = pb.SubmitRoundRequest(group="g", member=2, round=0, state=model_state(weights(2)), samples=10)
    answer = second.stub.SubmitRound(two, timeout=TIMEOUT)
    assert (answer.submitted, answer.members) == (2, 2)
    joined = second.stub.JoinRound(pb.JoinRoundRequest(group="g", member=2, settings=SETTINGS), timeout=TIMEOUT)
    assert (joined.action, joined.round) == (pb.JoinRoundResponse.ACTION_TRAIN, 1)
    assert [(c.round, c.member, c.samples) for c in joined.start] == [(0, 1, 30), (0, 2, 10)]
    for tensor, a, b in zip(joined.state.weights, weights(1), weights(2), strict=True):
        expected = ((30 * a.astype(np.float64) + 10 * b.astype(np.float64)) / 40).astype(np.float32)
        np.testing.assert_allclose(codec.from_proto(tensor), expected, rtol=1e-6, atol=1e-7)
    assert "group g: resumed at round 0 with 1 submissions" in second.text()
