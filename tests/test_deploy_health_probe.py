"""`split-health`, the compose health check: exit 0 only while a real server answers SERVING."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from splitlearning import health_probe
from splitlearning.protocol import SPLIT_SERVICE
from tests.conftest import StartServer

_PROBE_TIMEOUT = 60.0


def unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_serving_server(split_pair: StartServer, capsys: pytest.CaptureFixture[str]) -> None:
    split = split_pair()
    assert health_probe.main(["--target", split.target]) == 0
    assert capsys.readouterr().out.strip() == f"{split.target}: SERVING"
    assert health_probe.main(["--target", split.target, "--service", SPLIT_SERVICE]) == 0


def test_stopped_server(split_pair: StartServer, capsys: pytest.CaptureFixture[str]) -> None:
    split = split_pair()
    split.server.stop(grace=1.0)
    assert health_probe.main(["--target", split.target, "--timeout", "2"]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err


def test_unknown_service(split_pair: StartServer, capsys: pytest.CaptureFixture[str]) -> None:
    split = split_pair()
    assert health_probe.main(["--target", split.target, "--service", "no.such.Service"]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err


def test_not_serving(split_pair: StartServer, capsys: pytest.CaptureFixture[str]) -> None:
    split = split_pair()
    assert split.server.host is not None
    split.server.host.health.set("", health_probe.health_pb2.HealthCheckResponse.NOT_SERVING)
    assert health_probe.main(["--target", split.target]) == 1
    assert capsys.readouterr().out.strip() == f"{split.target}: NOT_SERVING"


def test_nothing_listening() -> None:
    assert health_probe.main(["--target", f"127.0.0.1:{unused_port()}", "--timeout", "2"]) == 1


def test_bad_usage() -> None:
    with pytest.raises(SystemExit) as exit_:
        health_probe.parse_args(["--timeout", "0"])
    assert exit_.value.code == 2


@pytest.mark.processes
def test_runs_as_its_own_process_without_tensorflow() -> None:
    """The probe runs every few seconds in the server's container: it must not pay for a TensorFlow import."""
    code = "import sys; from splitlearning import health_probe; sys.exit('tensorflow' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], timeout=_PROBE_TIMEOUT, check=False)
    assert result.returncode == 0
