"""Start-up: `--help` without TensorFlow, one line where TensorFlow is missing, no C++ start-up noise by default."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from typing import Any

import pytest

from client_part import cli as client_cli
from server_part import cli as server_cli
from splitlearning import demo

NOISE = ("absl::InitializeLog", "oneDNN custom operations")


@pytest.mark.processes
@pytest.mark.parametrize("module", ["client_part", "server_part", "splitlearning.demo"])
def test_help_does_not_load_tensorflow(module: str) -> None:
    probe = (
        "import runpy, sys\n"
        f"sys.argv = ['prog', '--help']\n"
        "try:\n"
        f"    runpy.run_module({module!r}, run_name='__main__')\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('TENSORFLOW LOADED' if 'tensorflow' in sys.modules else 'NO TENSORFLOW')\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout
    assert result.stdout.rstrip().endswith("NO TENSORFLOW")


@pytest.mark.parametrize(
    ("main", "program"),
    [(client_cli.main, "split-client"), (server_cli.main, "split-server"), (demo.main, "split-demo")],
)
def test_without_tensorflow_one_line_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], main: Any, program: str
) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "tensorflow" else find_spec(name, *a)
    )
    assert main([]) == 2
    err = capsys.readouterr().err
    assert err == f"{program} needs TensorFlow, which is not installed: pip install 'splitlearning[cpu]' " + (
        "(or 'splitlearning[gpu]' for CUDA)\n"
    )


@pytest.mark.processes
def test_no_tensorflow_start_up_noise_by_default(client_without_server: subprocess.CompletedProcess[str]) -> None:
    result = client_without_server  # without TF_CPP_MIN_LOG_LEVEL; also read by tests/test_processes.py
    assert result.returncode == 1, result.stderr
    assert "no server answered at 127.0.0.1:9" in result.stderr
    for noise in NOISE:
        assert noise not in result.stderr
