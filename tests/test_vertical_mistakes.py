"""What a user can type wrong on `split-label-party` and `split-feature-party` ends in one line naming it, before
anything is served or sent."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from feature_party import cli as feature_cli
from label_party import cli as label_cli

LABEL = ["--data", "label.csv", "--id-column", "id", "--label-column", "y", "--parties", "a,b"]
FEATURE = ["--name", "a", "--data", "a.csv", "--id-column", "id", "--server", "127.0.0.1:50061"]


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ([*LABEL[:-1], ""], "--parties: name at least one feature party"),
        ([*LABEL[:-1], "a,a"], "--parties: names must be unique"),
        (["--data", "label.csv", "--parties", "a"], "a .csv table needs --id-column"),
        (["--data", "label.csv", "--id-column", "id", "--parties", "a"], "needs --label-column"),
        (["--data", "label.npz", "--id-column", "id", "--parties", "a"], "apply to .csv/.parquet tables"),
        ([*LABEL, "--fuse", "max"], "argument --fuse: invalid choice: 'max'"),
        ([*LABEL, "--test-fraction", "1"], "argument --test-fraction: expected a number >= 0 and < 1, got 1"),
        ([*LABEL, "--batch-size", "0"], "argument --batch-size: expected an integer >= 1, got 0"),
        ([*LABEL, "--party-token", "a"], "--party-token 'a': expected NAME=FILE"),
        ([*LABEL, "--party-token", "c=t"], "--party-token c: not one of --parties"),
        ([*LABEL, "--party-token", "a=t"], "give every party a token, or none (missing: ['b'])"),
        ([*LABEL, "--tls-cert", "c.pem"], "--tls-cert and --tls-key go together"),
        ([*LABEL, "--top", "top.h5"], "argument --top: expected a path ending in .keras"),
        ([*LABEL, "--deadline", "0"], "argument --deadline: expected a number > 0, got 0"),
    ],
)
def test_label_party_flags(capsys: pytest.CaptureFixture[str], flags: list[str], expected: str) -> None:
    with pytest.raises(SystemExit) as exited:
        label_cli.parse_args(flags)
    assert exited.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert expected in error


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (FEATURE[2:], "the following arguments are required: --name"),
        ([*FEATURE[:-1], "nowhere"], "--server: expected host:port"),
        (["--name", "a", "--data", "a.parquet", "--server", "h:1"], "a .parquet table needs --id-column"),
        (["--name", "a", "--data", "a.npz", "--id-column", "id", "--server", "h:1"], "--id-column applies to"),
        ([*FEATURE, "--seed", "-1"], "argument --seed: expected an integer >= 0, got -1"),
        ([*FEATURE, "--fuse", "max"], "argument --fuse: invalid choice: 'max'"),
        ([*FEATURE, "--retry-timeout", "0"], "argument --retry-timeout: expected a number > 0, got 0"),
        ([*FEATURE, "--bottom", "b.h5"], "argument --bottom: expected a path ending in .keras"),
    ],
)
def test_feature_party_flags(capsys: pytest.CaptureFixture[str], flags: list[str], expected: str) -> None:
    with pytest.raises(SystemExit) as exited:
        feature_cli.parse_args(flags)
    assert exited.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert expected in error


def test_tables_that_do_not_fit_a_role_end_in_one_line(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    np.savez(tmp_path / "features.npz", ids=np.arange(4), x=np.ones((4, 2), np.float32))
    np.savez(tmp_path / "labels.npz", ids=np.arange(4), y=np.arange(4))
    runs = [
        (label_cli.main, [*LABEL[:6], "--data", str(tmp_path / "no.csv"), "--parties", "a"], "no.csv: no such file"),
        (label_cli.main, ["--data", str(tmp_path / "features.npz"), "--parties", "a"], "holds no labels"),
        (feature_cli.main, ["--name", "a", "--data", str(tmp_path / "labels.npz"), "--server", "h:1"],
         "no feature columns"),
    ]  # fmt: skip
    for main, argv, expected in runs:
        assert main(argv) == 2
        errors = [line for line in capfd.readouterr().err.splitlines() if " ERROR " in line]
        assert len(errors) == 1 and expected in errors[0], errors
