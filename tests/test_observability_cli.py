"""Two real processes: split-server with --metrics-port and --log-dir, split-client with the summary table,
--history-json, --plot and --log-dir; counters, event files and the summary agree with each other."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from splitlearning.events import read_scalars
from tests.faults_support import wait_for_port_file
from tests.observability_support import scrape, value

pytestmark = pytest.mark.processes  # every test here starts OS processes

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT = 120.0
TRAIN_TIMEOUT = 240.0
EPOCHS = 2
STEPS = EPOCHS * 21  # 1,437 training digits less the 10% held out to validate (1,293), in batches of 64


def env() -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "TF_CPP_MIN_LOG_LEVEL": "3"}


def test_two_processes_report_the_same_training(tmp_path: Path) -> None:
    logs, files = tmp_path / "logs", tmp_path / "files"
    files.mkdir()
    server = subprocess.Popen(
        [sys.executable, "-m", "server_part", "--address", "127.0.0.1:0", "--port-file", str(files / "port"),
         "--metrics-port", "0", "--metrics-port-file", str(files / "metrics"), "--log-dir", str(logs)],
        env=env(), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        port = wait_for_port_file(files / "port", server, START_TIMEOUT)
        metrics_port = int((files / "metrics").read_text())
        assert value(scrape(metrics_port), "split_server_steps_total") == 0
        client = subprocess.run(
            [sys.executable, "-m", "client_part", "--target", f"127.0.0.1:{port}", "--epochs", str(EPOCHS),
             "--log-dir", str(logs), "--history-json", str(files / "history.json"), "--plot", str(files / "c.png")],
            env=env(), cwd=tmp_path, capture_output=True, text=True, timeout=TRAIN_TIMEOUT,
        )  # fmt: skip
        assert client.returncode == 0, client.stderr
        samples = scrape(metrics_port)
    finally:
        server.terminate()
        _, server_err = server.communicate(timeout=30)
    assert server.returncode == 0, server_err

    # The summary table, and the same figures for scripts.
    for row in ("epochs", "samples/s", "final val_accuracy", "bytes/step sent", "time in network", "time in compute"):
        assert row in client.stdout, row
    result = json.loads((files / "history.json").read_text())
    summary = result["summary"]
    assert result["steps"] == summary["steps"] == STEPS and summary["epochs"] == EPOCHS
    assert summary["final"]["loss"] == result["history"]["loss"][-1]
    assert summary["test"] == result["test"] and summary["samples_per_s"] > 0
    assert summary["network_seconds"] > 0 and summary["compute_seconds"] > 0
    assert (files / "c.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")

    # The server counted what the client sent.
    assert value(samples, "split_server_steps_total") == STEPS
    assert value(samples, "split_server_received_bytes_total", method="Train") == summary["bytes_sent_per_step"] * STEPS
    assert value(samples, "split_server_sent_bytes_total", method="Train") == summary["bytes_received_per_step"] * STEPS

    # Both event files, lined up by step.
    assert [run.name for run in (logs / "server").iterdir()] == [result["session"]]  # one run per session
    client_run, server_run = read_scalars(logs / "client"), read_scalars(logs / "server" / result["session"])
    assert (
        [s for s, _ in client_run["step/loss"]] == [s for s, _ in server_run["step/loss"]] == list(range(1, STEPS + 1))
    )
    np.testing.assert_allclose([v for _, v in client_run["step/loss"]], [v for _, v in server_run["step/loss"]])
    np.testing.assert_allclose([v for _, v in client_run["epoch/val_loss"]], result["history"]["val_loss"], rtol=1e-6)
    assert [s for s, _ in server_run["epoch/loss"]] == [STEPS // EPOCHS, STEPS]

    # Quiet by default: start-up and epoch lines at INFO, nothing per step.
    for stream in (client.stderr, server_err):
        assert "step done" not in stream and "step answered" not in stream
    assert client.stderr.count("INFO split-client: epoch ") == EPOCHS
    assert "Prometheus metrics on http://127.0.0.1:" in server_err
