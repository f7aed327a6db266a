"""After training, from the command lines alone (README, "After training"): both sides write their trained
parts as .keras files, a server serves its part for predictions only, `split-client --predict` writes the
outputs over the cut, and `split-join` makes one uncut model whose outputs are those."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import keras
import numpy as np
import pytest

from client_part import cli as client_cli
from tests.faults_support import make_npz, spawn, stop, wait_for_port_file

START_TIMEOUT = 120.0
FLAGS = ["--model", "digits-mlp", "--optimizer", "adam", "--learning-rate", "0.01"]


def serve(tmp_path: Path, name: str, *flags: str) -> tuple[subprocess.Popen[bytes], int]:
    """`split-server FLAGS` in a process of its own on a free loopback port: the process and its port."""
    port_file = tmp_path / f"{name}.port"
    process = spawn(
        "server_part", ["--address", "127.0.0.1:0", "--port-file", str(port_file), *flags], tmp_path / f"{name}.log"
    )
    return process, wait_for_port_file(port_file, process, START_TIMEOUT)


@pytest.mark.processes
def test_train_save_serve_predict_and_join(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = make_npz(tmp_path / "data.npz", n_train=96, n_test=40)
    with np.load(data) as arrays:
        x = arrays["x_test"]
    np.savez(tmp_path / "new.npz", x=x)
    first, second = tmp_path / "first.keras", tmp_path / "second.keras"

    trainer, port = serve(tmp_path, "train", *FLAGS, "--save-model", str(second))
    try:
        client_flags = ["--target", f"127.0.0.1:{port}", *FLAGS, "--dataset", str(data), "--epochs", "2"]
        assert client_cli.main([*client_flags, "--batch-size", "16", "--save-model", str(first)]) == 0
    finally:
        assert stop(trainer, signal.SIGTERM) == 0
    assert first.is_file() and second.is_file()

    server, port = serve(tmp_path, "serve", "--model", str(second), "--serve-only", "--optimizer", "adam",
                         "--learning-rate", "0.01")  # fmt: skip
    try:
        target = [
            "--target",
            f"127.0.0.1:{port}",
            "--model",
            str(first),
            "--optimizer",
            "adam",
            "--learning-rate",
            "0.01",
        ]
        capsys.readouterr()
        for out in (tmp_path / "p.npy", tmp_path / "p.csv"):
            assert client_cli.main([*target, "--predict", str(tmp_path / "new.npz"), "--predictions", str(out)]) == 0
        assert "predicted 40 samples" in capsys.readouterr().out
        # the served part is not trained by a client that tries
        assert client_cli.main([*target, "--dataset", str(data), "--epochs", "1"]) == 1
        assert "serves predictions only" in capsys.readouterr().err
    finally:
        assert stop(server, signal.SIGTERM) == 0

    split = np.load(tmp_path / "p.npy")
    assert split.shape == (40, 10)
    np.testing.assert_allclose(np.loadtxt(tmp_path / "p.csv", delimiter=",", skiprows=1), split, rtol=1e-6)
    joined = tmp_path / "joined.keras"
    from splitlearning import joined as join_cli

    assert join_cli.main([str(first), str(second), "--output", str(joined)]) == 0
    np.testing.assert_allclose(keras.saving.load_model(joined).predict(x, verbose=0), split, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--predict", "x.npz"], "--predict FILE and --predictions FILE go together"),
        (["--predict", "x.npz", "--predictions", "p.npy", "--epochs", "2"], "--predict trains nothing: drop --epochs"),
        (["--predict", "x.txt", "--predictions", "p.npy"], "--predict x.txt: expected a .npz, .npy or .csv file"),
        (["--predict", "x.npz", "--predictions", "p.npz"], "--predictions p.npz: expected a .npy or .csv file"),
        (["--save-model", "m.h5"], "expected a path ending in .keras, got 'm.h5'"),
    ],
)
def test_predict_and_save_flags_that_do_not_fit_end_in_one_line(
    flags: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        client_cli.parse_args(flags)
    assert exited.value.code == 2
    assert expected in capsys.readouterr().err.strip().splitlines()[-1]


def test_a_keras_file_that_is_missing_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "gone.keras"
    assert client_cli.main(["--model", str(missing), "--target", "127.0.0.1:1", "--epochs", "1"]) == 2
    assert f"--model {missing}: no such file" in capsys.readouterr().err
