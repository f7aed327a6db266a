"""Common mistakes end with one line naming the cause and the fix, before anything heavy starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from client_part import cli as client_cli
from client_part.cli import parse_args as client_args
from server_part import SplitServer
from server_part import cli as server_cli
from server_part.cli import parse_args as server_args
from splitlearning import addresses, data, models
from tests.conftest import build_top, make_loss


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--batch-size", "0"], "argument --batch-size: expected an integer >= 1, got 0"),
        (["--epochs", "-1"], "argument --epochs: expected an integer >= 1, got -1"),
        (["--epochs", "two"], "argument --epochs: expected an integer >= 1, got 'two'"),
        (["--validation-split", "1"], "argument --validation-split: expected a number >= 0 and < 1, got 1"),
        (["--connect-timeout", "0"], "argument --connect-timeout: expected a number > 0, got 0"),
        (["--learning-rate", "-0.1"], "argument --learning-rate: expected a number > 0, got -0.1"),
        (["--checkpoint-keep", "1"], "argument --checkpoint-keep: expected an integer >= 2, got 1"),
    ],
)
def test_client_numbers_are_checked_when_parsed(
    capsys: pytest.CaptureFixture[str], flags: list[str], expected: str
) -> None:
    with pytest.raises(SystemExit) as exited:
        client_args(flags)
    assert exited.value.code == 2
    assert expected in capsys.readouterr().err


def test_server_numbers_and_environment_defaults_are_checked(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(SystemExit):
        server_args(["--max-workers", "0"])
    assert "argument --max-workers: expected an integer >= 1, got 0" in capsys.readouterr().err
    monkeypatch.setenv("SPLIT_BATCH_SIZE", "0")
    with pytest.raises(SystemExit):
        client_args([])
    assert "SPLIT_BATCH_SIZE (the default of --batch-size): expected an integer >= 1, got 0" in capsys.readouterr().err


def test_a_port_in_use_is_named(listening: int) -> None:
    with pytest.raises(OSError, match=f"port {listening} is already in use .* choose another port"):
        addresses.check_bindable(f"127.0.0.1:{listening}")


def test_an_address_that_does_not_resolve_is_named() -> None:
    with pytest.raises(OSError, match=r"the host 'no-such-host\.invalid' does not resolve"):
        addresses.check_bindable("no-such-host.invalid:50051")


def test_a_second_server_on_the_port_of_a_running_one_is_refused() -> None:
    first = SplitServer(build_top(), make_loss(), "sgd")
    second = SplitServer(build_top(), make_loss(), "sgd")
    port = first.start("127.0.0.1:0")
    try:
        with pytest.raises(OSError, match="already in use"):
            second.start(f"127.0.0.1:{port}")
    finally:
        first.stop(grace=0)


@pytest.mark.processes
def test_the_server_cli_reports_a_port_in_use_in_one_line(listening: int) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "server_part", "--address", f"127.0.0.1:{listening}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"port {listening} is already in use" in result.stderr


def test_a_dataset_that_is_not_an_npz_is_named(tmp_path: Path) -> None:
    path = tmp_path / "mnist.csv"
    path.write_text("1,2,3\n")
    with pytest.raises(ValueError, match=f"--dataset {path}: not an .npz archive"):
        data.load(str(path))


def test_a_model_module_in_the_current_folder_is_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_split_model_17.py").write_text("def build(seed=0):\n    return seed + 1\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    assert models.load_part("my_split_model_17:build", "client", 4)() == 5


def error_lines(text: str) -> list[str]:
    """The lines a failed run printed, with no traceback and no terminal colour codes among them."""
    assert "Traceback" not in text and "\x1b[" not in text and "in user code" not in text, text
    return [line for line in text.splitlines() if " ERROR " in line]


def test_data_that_does_not_fit_the_model_names_both_shapes_and_the_pairs_that_fit(
    capfd: pytest.CaptureFixture[str], cli_logs: None
) -> None:
    code = client_cli.main(["--model", "mnist-cnn", "--target", "127.0.0.1:1", "--connect-timeout", "1"])
    assert code == 2
    (line,) = error_lines(capfd.readouterr().err)
    assert line.endswith(
        "--dataset digits has samples of shape [8, 8, 1], but --model mnist-cnn takes [28, 28, 1]; "
        "use --model digits-mlp or --model digits-cnn on both processes"
    )


def test_an_mnist_shaped_npz_with_a_digits_model_is_pointed_to_the_mnist_pairs(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], cli_logs: None
) -> None:
    path = tmp_path / "mnist.npz"  # the layout of Keras's mnist.npz: uint8 images without a channel axis
    images, labels = np.zeros((4, 28, 28), "uint8"), np.arange(4, dtype="uint8")
    np.savez(path, x_train=images, y_train=labels, x_test=images, y_test=labels)
    code = client_cli.main(["--dataset", str(path), "--validation-split", "0", "--target", "127.0.0.1:1"])
    assert code == 2
    (line,) = error_lines(capfd.readouterr().err)
    assert line.endswith(
        f"--dataset {path} has samples of shape [28, 28, 1], but --model digits-mlp takes [8, 8, 1]; "
        "use --model mnist-cnn or --model mnist-wide on both processes"
    )


@pytest.mark.parametrize("name", sorted(models.BUILTIN))
def test_the_pairs_declared_input_shapes_are_their_first_parts(name: str) -> None:
    pair = models.BUILTIN[name]
    assert pair.client(0).input_shape[1:] == pair.input_shape


def test_client_and_server_with_different_models_are_told_to_use_the_same_model(
    capfd: pytest.CaptureFixture[str], cli_logs: None
) -> None:
    server = server_cli.build(server_args(["--model", "digits-cnn"]))
    port = server.start("127.0.0.1:0")
    try:
        code = client_cli.main(["--model", "digits-mlp", "--target", f"127.0.0.1:{port}", "--connect-timeout", "30"])
    finally:
        server.stop(grace=0)
    assert code == 1
    (line,) = error_lines(capfd.readouterr().err)
    assert "cut mismatch: the server part expects iv [batch, 512] float32, the client sends [batch, 64]" in line
    assert line.endswith("start both processes with the same --model (this client: --model digits-mlp)")


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--rounds", "3"], "--rounds: only with --group NAME"),
        (["--scheme", "round-robin", "--member", "2"], "--scheme, --member: only with --group NAME"),
        (["--group", "g"], "--group needs --member K (or --shard K/N, whose K is the member)"),
        (["--group", "g", "--member", "1", "--epochs", "3"], "--epochs: with --group, a member trains --local-epochs"),
        (["--group", "g", "--member", "1", "--session", "abc"], "--session: not with --group"),
        (["--group", "g", "--member", "1", "--checkpoint-dir", "ckpt"], "--checkpoint-dir: not with --group"),
        (["--group", "g", "--member", "1", "--handover-dir", "d"], "--handover-dir: only with --scheme round-robin"),
        (["--group", "g", "--member", "0"], "argument --member: expected an integer >= 1, got 0"),
        (["--group", "g", "--shard", "4/3"], "argument --shard: expected K/N with 1 <= K <= N"),
    ],
)
def test_group_flags_that_do_not_fit_end_in_one_line(
    capsys: pytest.CaptureFixture[str], flags: list[str], expected: str
) -> None:
    with pytest.raises(SystemExit) as exited:
        client_args(flags)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert expected in err, err
    assert err.count("error:") == 1


def test_a_group_member_takes_its_number_from_its_shard_and_the_defaults() -> None:
    config = client_args(["--group", "g", "--shard", "2/3"])
    assert (config.member, config.scheme, config.rounds, config.local_epochs, config.epochs) == (2, "splitfed", 5, 1, 5)
    assert client_args([]).epochs == 10 and client_args([]).group is None


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--aggregator", "--members", "2", "--min-members", "3"], "--min-members 3 is more than --members 2"),
        (["--aggregator", "--members", "5", "--max-sessions", "4"], "--members 5 is more than --max-sessions 4"),
    ],
)
def test_aggregator_round_flags_that_do_not_fit_end_in_one_line(
    capsys: pytest.CaptureFixture[str], flags: list[str], expected: str
) -> None:
    with pytest.raises(SystemExit) as exited:
        server_args(flags)
    assert exited.value.code == 2
    assert expected in capsys.readouterr().err
