"""`split-demo --vertical`: its flags, and the demo run for real (a label party and two feature parties as three
processes, then the uncut model in the demo's own): the alignment's sizes, the label party's epochs, and the
vertical model's held-out accuracy beside the uncut model's, equal but for float32 round-off."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest

from splitlearning import demo, vertical_data
from splitlearning.batch_order import split_rows

DEMO_TIMEOUT = 300.0  # four processes loading TensorFlow on a busy machine; about 35 s on 2 idle cores
# The uncut model's held-out accuracy may differ from the vertical one's only where round-off flips a prediction
# whose two largest logits are within about 1e-5 of each other: at most one held-out row, allowed here.
FLIPPED_ROWS = 1
PSI = re.compile(
    r"^private set intersection \(sizes only\): ids per party: (.+); aligned rows (\d+) \(train (\d+), held out "
    r"(\d+)\); row k is the same id at every party",
    re.MULTILINE,
)
EPOCH = re.compile(r"split-label-party: epoch (\d+)/(\d+) \(step (\d+)\): loss ([0-9.]+) .*test_accuracy ([0-9.]+)\b")
ROW = re.compile(r"^ +(\d+)  ([0-9.]+) / ([0-9.]+) ", re.MULTILINE)  # epoch, then the loss: vertical / uncut
ACCURACY = re.compile(r"^held-out accuracy: vertical ([0-9.]+), uncut ([0-9.]+)$", re.MULTILINE)
AUC = re.compile(r"^held-out AUC: vertical ([0-9.]+), uncut ([0-9.]+)$", re.MULTILINE)
OUTPUTS = re.compile(r"^held-out outputs \(logits\): the largest difference (\S+), within float32 round-off", re.M)


def test_vertical_flags_and_their_defaults() -> None:
    assert demo.vertical_flags([]) is None and demo.vertical_flags(["--epochs", "3"]) is None  # the standard demo
    assert demo.vertical_flags(["--vertical"]) == demo.Vertical("digits", 5, 32, 0, "adam", 3e-3)
    given = ["--vertical", "breast-cancer", "--epochs", "2", "--batch-size", "16", "--seed", "4", "--optimizer", "sgd"]
    assert demo.vertical_flags([*given, "--learning-rate", "0.1"]) == demo.Vertical(
        "breast-cancer", 2, 16, 4, "sgd", 0.1
    )
    assert demo.vertical_flags(["--epochs=1", "--vertical=digits"]) == demo.Vertical("digits", 1, 32, 0, "adam", 3e-3)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--vertical", "iris"], "argument --vertical: invalid choice: 'iris'"),
        (["--vertical", "--model", "digits-cnn"], "--model and --cut choose the standard demo's pair"),
        (["--vertical", "--cut", "ushape"], "--model and --cut choose the standard demo's pair"),
        (["--vertical", "--dataset", "d.npz"], "unrecognized arguments: --dataset d.npz"),
        (["--vertical", "digits", "breast-cancer"], "unrecognized arguments: breast-cancer"),
        (["--vertical", "--epochs", "0"], "argument --epochs: expected an integer >= 1, got 0"),
        (["--vertical", "--batch-size", "x"], "argument --batch-size: expected an integer >= 1, got 'x'"),
        (["--vertical", "--seed", "-1"], "argument --seed: expected an integer >= 0, got -1"),
        (["--vertical", "--learning-rate", "0"], "argument --learning-rate: expected a number > 0, got 0"),
    ],
)
def test_a_wrong_combination_is_refused_in_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        demo.main(argv)
    assert exited.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines[-1].startswith("split-demo: error: ") and message in lines[-1], lines
    assert lines[0].startswith("usage: split-demo") and all(line.startswith(" ") for line in lines[1:-1]), lines


def test_the_help_names_the_vertical_demo(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        demo.parser().parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--vertical [{digits,breast-cancer}]" in out and "With --vertical:" in out


def run_demo(*flags: str) -> str:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "splitlearning.demo", "--vertical", *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=DEMO_TIMEOUT,
        check=False,
    )
    output = result.stdout
    assert result.returncode == 0, output[-5000:]
    assert "Traceback" not in output, output
    print(f"split-demo --vertical {' '.join(flags)}: {time.monotonic() - started:.1f} s")
    return output


def check_run(output: str, dataset: vertical_data.VerticalDataset, epochs: int, batch: int) -> float:
    """The printout's sizes, epochs and comparison; returns the vertical model's held-out accuracy."""
    # The alignment: every party's id count, and the ids all of them hold, split into training and held-out rows.
    (psi,) = PSI.findall(output)
    sizes, aligned, train, test = psi[0], int(psi[1]), int(psi[2]), int(psi[3])
    expected = ", ".join(f"{name} {len(table.ids)}" for name, table in zip(dataset.names, dataset.tables, strict=True))
    assert sizes == expected
    common = set(dataset.tables[0].ids).intersection(*(table.ids for table in dataset.feature_parties))
    assert aligned == len(common)
    assert (train, test) == split_rows(aligned, dataset.test_fraction)
    steps = -(-train // batch)

    # The label party's epochs (its own log), then the same epochs of both models side by side.
    epoch_lines = EPOCH.findall(output)
    assert [(int(e), int(of), int(step)) for e, of, step, _, _ in epoch_lines] == [
        (e, epochs, e * steps) for e in range(1, epochs + 1)
    ]
    rows = ROW.findall(output)
    assert [int(epoch) for epoch, _, _ in rows] == list(range(1, epochs + 1)), output[-3000:]
    for (_, _, _, loss, _), (_, vertical_loss, uncut_loss) in zip(epoch_lines, rows, strict=True):
        assert vertical_loss == loss
        assert abs(float(vertical_loss) - float(uncut_loss)) <= 2e-4, rows  # 4 decimals printed: round-off at most

    # The held-out accuracy of both, the outputs within round-off of each other.
    (accuracy,) = ACCURACY.findall(output)
    vertical, uncut = float(accuracy[0]), float(accuracy[1])
    assert vertical == float(epoch_lines[-1][4])
    assert abs(vertical - uncut) <= FLIPPED_ROWS / test + 1e-4, accuracy
    (difference,) = OUTPUTS.findall(output)
    assert float(difference) < 1e-3
    return vertical


@pytest.mark.processes
def test_the_vertical_demo_on_the_digits() -> None:
    output = run_demo()
    assert "label.npz (1797 ids), left.npz (1617 ids), right.npz (1617 ids)" in output
    pattern = r"^left: aligned rows \d+ of its 1617; steps 185 \(final step 185\)"
    assert re.search(pattern, output, re.MULTILINE), output[-5000:]
    accuracy = check_run(output, vertical_data.digits_halves(), epochs=5, batch=32)
    assert accuracy >= 0.8  # about 0.93; chance is 0.1
    assert not AUC.findall(output), "AUC is the binary case's"


@pytest.mark.processes
def test_the_vertical_demo_on_breast_cancer_with_its_flags() -> None:
    output = run_demo("breast-cancer", "--epochs", "2", "--batch-size", "64", "--seed", "3", "--learning-rate", "0.01")
    assert "label.csv (569 ids), error.csv (569 ids), worst.csv (569 ids)" in output
    assert "adam at 0.01" in output and "the same 455 training rows in the same 16 batches of 64 (2 epochs)" in output
    accuracy = check_run(output, vertical_data.breast_cancer_split(), epochs=2, batch=64)
    assert accuracy >= 0.85  # about 0.97; the majority class is 0.63
    (auc,) = AUC.findall(output)
    assert abs(float(auc[0]) - float(auc[1])) <= 1e-3 and float(auc[0]) >= 0.9, auc
