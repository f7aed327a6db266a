"""The end-of-run summary says what this run trained and, after a resume, what the session holds in all."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from client_part import cli as client_cli
from client_part import summary
from client_part.telemetry import StepTotals
from server_part import cli as server_cli
from tests.faults_support import make_npz

BATCH, TRAIN = 8, 96  # 86 samples to train on (--validation-split 0.1): 11 steps an epoch


def test_a_resumed_run_says_what_it_trained_and_what_the_session_holds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], cli_logs: None
) -> None:
    dataset = make_npz(tmp_path / "data.npz", n_train=TRAIN)
    server = server_cli.build(server_cli.parse_args(["--checkpoint-dir", str(tmp_path / "server")]))
    port = server.start("127.0.0.1:0")
    flags = ["--target", f"127.0.0.1:{port}", "--dataset", str(dataset), "--batch-size", str(BATCH)]
    flags += ["--checkpoint-dir", str(tmp_path / "client"), "--history-json", str(tmp_path / "h.json")]
    try:
        assert client_cli.main([*flags, "--epochs", "2"]) == 0
        first = capsys.readouterr().out
        assert client_cli.main([*flags, "--epochs", "5"]) == 0  # the same session, resumed for 3 more epochs
        second = capsys.readouterr().out
    finally:
        server.stop(grace=0)
    assert re.search(r"^trained 2 epochs, 22 steps, in [\d.]+ s \([\d,]+ samples/s\)$", first, re.M), first
    assert "session steps" not in first
    assert re.search(
        r"^trained 3 epochs, 33 steps, in [\d.]+ s \([\d,]+ samples/s\) in this run \(epochs 3-5, resumed at "
        r"step 22\); the session holds 5 epochs, 55 steps$",
        second,
        re.M,
    ), second
    rows = dict(re.findall(r"^(\S.*?)\s{3,}(\S.*)$", second, re.M))
    assert rows["epochs (this run)"] == "3" and rows["steps (this run)"] == "33"
    assert rows["session epochs"] == "5" and rows["session steps"] == "55"
    written = json.loads((tmp_path / "h.json").read_text())
    assert written["steps"] == written["summary"]["session_steps"] == 55
    assert written["summary"]["steps"] == 33 and written["summary"]["epochs"] == 3
    assert len(written["history"]["loss"]) == 3


def test_a_fresh_run_says_it_once() -> None:
    totals = StepTotals(steps=230, samples=14_720, seconds=9.0)
    result = summary.summarize({"loss": [0.5]}, {"loss": 0.4}, totals, range(10), 10.0, 10, 230)
    assert summary.headline(result) == "trained 10 epochs, 230 steps, in 10.0 s (1,472 samples/s)"
    assert "session" not in summary.table(result) and "this run" not in summary.table(result)
    assert result["approximations"] == [] and "approximations" not in summary.table(result)
    approximate = summary.summarize({}, {}, totals, range(10), 10.0, 10, 230, approximations=("stale-gradients",))
    assert approximate["approximations"] == ["stale-gradients"]
    assert re.search(r"^approximations \(not exact\)\s+stale-gradients$", summary.table(approximate), re.M)


def test_a_finished_run_resumed_says_there_was_nothing_left() -> None:
    """A finished pair started again (compose `up` after a completed run) trains no step: it says so."""
    result = summary.summarize({}, {"loss": 0.4}, StepTotals(), range(10, 10), 0.01, 10, 210, start_step=210)
    assert summary.headline(result) == (
        "nothing left to train: the session already holds 10 epochs, 210 steps (resumed at step 210, its end)"
    )
