"""The U-shape through the command lines: `split-server --cut ushape` and `split-client --cut ushape`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.security_support import ServerProcess, run_client, start_server

pytestmark = pytest.mark.processes  # every test here starts OS processes


@pytest.fixture(scope="module")
def middle_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = start_server(
        tmp_path_factory.mktemp("ushape"), "--cut", "ushape", "--model", "digits-mlp", "--learning-rate", "0.01"
    )
    yield server
    server.stop()


def test_ushape_trains_across_two_processes(middle_server: ServerProcess, tmp_path: Path) -> None:
    history = tmp_path / "history.json"
    result = run_client(
        middle_server.target, "--cut", "ushape", "--epochs", "2", "--batch-size", "64", "--learning-rate", "0.01",
        "--history-json", str(history),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    payload = json.loads(history.read_text())
    losses = payload["history"]["loss"]
    assert len(losses) == 2 and losses[1] < losses[0]
    assert payload["test"]["accuracy"] > 0.5  # 10 classes: chance is 0.1
    assert "ushape cut" in middle_server.log_text()
