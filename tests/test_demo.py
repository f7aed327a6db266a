"""`split-demo`: its own help, the pair's flags to both processes, and Ctrl-C without a traceback."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from splitlearning import demo

START_TIMEOUT = 180.0  # two processes loading TensorFlow on a busy machine


def test_the_demo_has_its_own_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        demo.parser().parse_args(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: split-demo") and "given to both processes" in out and "split-client --help" in out


def test_the_pairs_flags_go_to_both_processes_and_the_rest_to_the_client() -> None:
    shared, client_only = demo.split_flags(["--model", "digits-cnn", "--epochs", "3", "--cut=ushape", "--seed", "4"])
    assert shared == ["--model", "digits-cnn", "--cut", "ushape", "--seed", "4"]
    assert client_only == ["--epochs", "3"]


@pytest.mark.processes
def test_ctrl_c_stops_the_demo_without_a_traceback(tmp_path: Path) -> None:
    log = tmp_path / "demo.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "splitlearning.demo", "--epochs", "1000", "--model", "digits-cnn"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + START_TIMEOUT
    while "Epoch 2/" not in log.read_text():
        assert process.poll() is None, f"the demo exited early:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"the demo did not train:\n{log.read_text()[-3000:]}"
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    try:
        code = process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        pytest.fail("SIGINT did not stop the demo")
    output = log.read_text()
    assert code == 130, output[-3000:]
    assert "Traceback" not in output
    # Ctrl-C lands in a training step or in the epoch's validation: either way the demo says where it stopped.
    assert "stopped on request after step" in output or "stopped on request while evaluating" in output, output[-3000:]
