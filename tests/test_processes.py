"""End to end across two real processes on loopback, driven through the CLIs as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from splitlearning import subprocesses
from tests.faults_support import wait_for_port_file

pytestmark = pytest.mark.processes  # every test here starts OS processes

START_TIMEOUT = 120.0


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **extra}


@pytest.fixture
def server(tmp_path: Path) -> Iterator[int]:
    port_file = tmp_path / "port"
    process = subprocess.Popen(
        [sys.executable, "-m", "server_part", "--address", "127.0.0.1:0", "--port-file", str(port_file)],
        env=_env(SPLIT_SEED="3"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield wait_for_port_file(port_file, process, START_TIMEOUT)
    finally:
        subprocesses.stop(process, timeout=20)
    assert process.returncode == 0, f"split-server exited with {process.returncode} on SIGTERM"


def test_two_processes_train_the_digits(server: int, tmp_path: Path) -> None:
    history_file = tmp_path / "history.json"
    result = subprocess.run(
        [sys.executable, "-m", "client_part", "--target", f"127.0.0.1:{server}", "--history-json", str(history_file)],
        env=_env(SPLIT_EPOCHS="8", SPLIT_SEED="3", SPLIT_BATCH_SIZE="32"),  # flags from the environment
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(history_file.read_text())
    losses = report["history"]["loss"]
    assert len(losses) == 8
    assert losses[-1] < losses[0] / 3, f"loss did not fall: {losses}"
    assert report["test"]["accuracy"] >= 0.93, report["test"]
    assert report["steps"] == 8 * -(-int(1437 * 0.9) // 32)  # 10% of the training split held out to validate
    assert "val_accuracy" in report["history"]
    assert "test loss" in result.stdout and "accuracy" in result.stdout


def test_client_reports_an_absent_server_clearly(client_without_server: subprocess.CompletedProcess[str]) -> None:
    result = client_without_server  # also read by tests/test_startup.py
    assert result.returncode == 1
    assert "no server answered at 127.0.0.1:9 within 1 s" in result.stderr


def test_a_device_that_does_not_exist_is_an_error_at_start() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "server_part", "--address", "127.0.0.1:0", "--device", "/GPU:7"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "device '/GPU:7' does not exist" in result.stderr
