"""The approximations beyond the exact split through the two programs, as a user runs them: the server's operator
allows them, the client asks, the summary says what it trained with; a server that does not allow one refuses
the client in one line."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from splitlearning import subprocesses
from splitlearning.models import load_part
from splitlearning.top_k_layer import TopK
from tests.faults_support import spawn, wait_for_port_file

pytestmark = pytest.mark.processes  # every test here starts OS processes

START_TIMEOUT = 120.0
ALLOWED = "stale-gradients,local-loss,top-k"


def _env() -> dict[str, str]:
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "SPLIT_SEED": "3"}


def start_server(folder: Path, *flags: str) -> tuple[subprocess.Popen[bytes], int]:
    """A split-server (seed 3) on a free port with `flags`: the process and its port."""
    port_file = folder / "port"
    args = ["--address", "127.0.0.1:0", "--port-file", str(port_file), "--seed", "3", *flags]
    process = spawn("server_part", args, folder / "server.log")
    return process, wait_for_port_file(port_file, process, START_TIMEOUT)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    flags = ("--allow-approximations", ALLOWED, "--optimizer", "adam", "--learning-rate", "0.003")
    process, port = start_server(tmp_path_factory.mktemp("server"), *flags)
    try:
        yield port
    finally:
        subprocesses.stop(process, timeout=20)


def client(port: int, tmp_path: Path, *flags: str) -> tuple[subprocess.CompletedProcess[str], dict | None]:
    history = tmp_path / "history.json"
    command = [sys.executable, "-m", "client_part", "--target", f"127.0.0.1:{port}", "--history-json", str(history)]
    command += ["--epochs", "3", "--batch-size", "32", "--optimizer", "adam", "--learning-rate", "0.003", *flags]
    result = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300)
    return result, json.loads(history.read_text()) if history.exists() else None


@pytest.mark.parametrize(
    ("flags", "names"),
    [
        (("--local-loss", "--top-k", "0.25"), ["local-loss", "top-k"]),
        (("--stale-gradients",), ["stale-gradients"]),
    ],
    ids=["local-loss+top-k", "stale-gradients"],
)
def test_a_client_trains_with_what_it_asked_for_and_says_so(
    server: int, tmp_path: Path, flags: tuple[str, ...], names: list[str]
) -> None:
    saved = ("--save-model", str(tmp_path / "first.keras")) if "--top-k" in flags else ()
    result, report = client(server, tmp_path, *flags, *saved)
    assert result.returncode == 0, result.stderr[-3000:]
    assert report is not None
    assert report["summary"]["approximations"] == names
    assert re.search(rf"^approximations \(not exact\)\s+{', '.join(names)}$", result.stdout, re.M), result.stdout
    assert report["test"]["accuracy"] > 0.5, report["test"]  # digits, 10 classes: it learned
    if "--local-loss" in flags:
        assert len(report["history"]["local_loss"]) == 3
    if saved:  # the first part as it ran: with its top-k, which loading the file (as --model does) restores
        assert "(with its top-k)" in result.stderr
        first = load_part(saved[1], "client", 0)()
        assert isinstance(first.layers[-1], TopK) and first.layers[-1].fraction == 0.25


def test_a_server_that_does_not_allow_it_refuses_in_one_line(tmp_path: Path) -> None:
    process, port = start_server(tmp_path, "--allow-approximations", "top-k")
    try:
        result, report = client(port, tmp_path, "--stale-gradients")
    finally:
        subprocesses.stop(process, timeout=20)
    assert result.returncode != 0 and report is None
    lines = [line for line in result.stderr.splitlines() if "stale-gradients" in line]
    assert lines, result.stderr[-3000:]
    assert "FAILED_PRECONDITION" in lines[-1] and "--allow-approximations stale-gradients,top-k" in lines[-1]
    assert "Traceback" not in result.stderr
