"""Data shards (splitlearning.shards, split-client --shard K/N --shard-by): disjoint parts that together hold
every sample once, cut at random or by label; the flags; a real sharded run (a split-client process, its server in
this process)."""

from __future__ import annotations

import argparse
import itertools
import json
import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from client_part.cli import parse_args as client_args
from server_part import cli as server_cli
from splitlearning import data, shards
from splitlearning.shards import Shard
from tests import faults_support

BALANCED = np.repeat(np.arange(10), 23)  # 10 classes of 23 samples, grouped by class
MIXED = np.random.default_rng(5).permutation(np.arange(103) % 10)  # 10 classes, unequal, shuffled


def cut(y: np.ndarray, count: int, by: str, seed: int = 0) -> list[np.ndarray]:
    """The indices each of `count` shards takes (x is arange: its values are the indices)."""
    x = np.arange(len(y))
    return [shards.take(x, y, Shard(k, count), by, seed)[0] for k in range(1, count + 1)]


@pytest.mark.parametrize("by", shards.BY)
@pytest.mark.parametrize("count", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("y", [BALANCED, MIXED], ids=["balanced", "mixed"])
def test_shards_are_disjoint_cover_every_sample_and_differ_in_size_by_at_most_one(
    y: np.ndarray, count: int, by: str
) -> None:
    parts = cut(y, count, by)
    joined = np.concatenate(parts)
    assert len(joined) == len(y)  # no sample twice...
    assert sorted(joined.tolist()) == list(range(len(y)))  # ...and every sample once
    sizes = [len(part) for part in parts]
    assert max(sizes) - min(sizes) <= 1, sizes


@pytest.mark.parametrize("by", shards.BY)
def test_each_shard_keeps_its_labels_with_its_samples(by: str) -> None:
    x = np.arange(len(MIXED)) * 10
    for k in (1, 2, 3):
        xs, ys = shards.take(x, MIXED, Shard(k, 3), by, seed=4)
        np.testing.assert_array_equal(MIXED[xs // 10], ys)


@pytest.mark.parametrize("by", shards.BY)
def test_the_same_seed_gives_the_same_shards(by: str) -> None:
    for first, second in zip(cut(MIXED, 3, by, seed=7), cut(MIXED, 3, by, seed=7), strict=True):
        np.testing.assert_array_equal(first, second)


def test_random_shards_differ_with_the_seed_and_are_not_the_dataset_order() -> None:
    first, other = cut(MIXED, 3, "random", seed=0), cut(MIXED, 3, "random", seed=1)
    assert any(not np.array_equal(a, b) for a, b in zip(first, other, strict=True))
    assert not np.array_equal(np.concatenate(first), np.arange(len(MIXED)))


def test_random_shards_are_the_permutation_of_the_seed_cut_in_order() -> None:
    order = np.random.default_rng(11).permutation(len(MIXED))
    expected = np.array_split(order, 4)
    for got, want in zip(cut(MIXED, 4, "random", seed=11), expected, strict=True):
        np.testing.assert_array_equal(got, want)


def test_random_shards_of_a_balanced_set_hold_every_class() -> None:
    for part in cut(BALANCED, 3, "random"):
        assert set(BALANCED[part].tolist()) == set(range(10))


@pytest.mark.parametrize("count", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("y", [BALANCED, MIXED], ids=["balanced", "mixed"])
def test_label_shards_hold_contiguous_ranges_of_classes(y: np.ndarray, count: int) -> None:
    parts = cut(y, count, "label", seed=9)
    labels = [y[part] for part in parts]
    for before, after in itertools.pairwise(labels):
        assert before.max() <= after.min(), "the next shard's classes come after this one's"


def test_label_shards_hold_the_same_samples_for_every_seed_in_an_order_drawn_from_it() -> None:
    """The cut is a stable sort (no seed); the order inside a shard is drawn from the seed, so a validation
    hold-out from its end holds every class of the shard, not only its last one."""
    zero, one = cut(MIXED, 3, "label", seed=0), cut(MIXED, 3, "label", seed=1)
    for a, b in zip(zero, one, strict=True):
        np.testing.assert_array_equal(np.sort(a), np.sort(b))
    assert any(not np.array_equal(a, b) for a, b in zip(zero, one, strict=True))
    stable = np.argsort(MIXED, kind="stable")
    for part, want in zip(zero, np.array_split(stable, 3), strict=True):
        np.testing.assert_array_equal(np.sort(part), np.sort(want))
        tail = MIXED[part][-max(1, len(part) // 5) :]
        assert len(np.unique(tail)) > 1 or len(np.unique(MIXED[part])) == 1


def test_five_label_shards_of_ten_balanced_classes_hold_about_two_classes_each() -> None:
    y = np.tile(np.arange(10), 20)  # balanced, classes interleaved
    for k, part in enumerate(cut(y, 5, "label"), start=1):
        assert sorted(set(y[part].tolist())) == [2 * k - 2, 2 * k - 1]


@pytest.mark.parametrize(
    "form",
    [
        pytest.param(lambda y: y[:, None], id="column"),
        pytest.param(lambda y: np.eye(10, dtype="float32")[y], id="one-hot"),
    ],
)
def test_label_shards_of_column_and_one_hot_labels_are_those_of_the_plain_labels(
    form: Callable[[np.ndarray], np.ndarray],
) -> None:
    y = form(MIXED)
    x = np.arange(len(MIXED))
    for k in (1, 2, 3):
        xs, ys = shards.take(x, y, Shard(k, 3), "label")
        np.testing.assert_array_equal(xs, shards.take(x, MIXED, Shard(k, 3), "label")[0])
        np.testing.assert_array_equal(ys, y[xs])


def test_label_shards_of_float_labels_are_ordered_by_value() -> None:
    y = np.array([0.5, -1.0, 2.0, 0.25])
    assert shards.take(y, y, Shard(1, 2), "label")[0].tolist() == [-1.0, 0.25]
    assert shards.take(y, y, Shard(2, 2), "label")[0].tolist() == [0.5, 2.0]


def test_each_sample_may_be_a_shard_but_not_fewer() -> None:
    y = np.arange(4)
    assert sorted(shards.take(y, y, Shard(k, 4))[0].item() for k in range(1, 5)) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match=r"^cannot cut 4 samples into 5 shards: each shard needs at least one sample$"):
        shards.take(y, y, Shard(5, 5))


def test_an_unknown_cut_labels_of_another_length_or_shape_are_refused() -> None:
    y = np.arange(6)
    with pytest.raises(ValueError, match=r"^shards are cut by random or label, got 'class'$"):
        shards.take(y, y, Shard(1, 2), "class")
    with pytest.raises(ValueError, match="cannot shard 6 samples with 5 labels"):
        shards.take(y, y[:5], Shard(1, 2))
    with pytest.raises(ValueError, match=r"got labels of shape \[6, 2, 2\]"):
        shards.take(y, np.zeros((6, 2, 2)), Shard(1, 2), "label")


@pytest.mark.parametrize(("text", "expected"), [("1/1", Shard(1, 1)), ("2/3", Shard(2, 3)), ("12/12", Shard(12, 12))])
def test_parse_reads_k_of_n(text: str, expected: Shard) -> None:
    assert shards.parse(text) == expected
    assert str(shards.parse(text)) == text


@pytest.mark.parametrize("text", ["0/3", "4/3", "3", "a/b", "1/0", "", "-1/3", "1/3/3", "2/3x"])
def test_parse_refuses_anything_else_saying_what_it_expected_and_got(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError) as refused:
        shards.parse(text)
    assert str(refused.value) == f"expected K/N with 1 <= K <= N (the K-th of N shards), got {text!r}"


def test_a_shard_made_directly_is_checked() -> None:
    with pytest.raises(ValueError, match="1 <= K <= N, got 4/3"):
        Shard(4, 3)


def test_describe_names_the_shard_the_size_and_the_classes() -> None:
    assert shards.describe(np.array([6, 3, 4, 5, 3]), Shard(2, 3), "label") == (
        "shard 2/3 by label: 5 samples, classes 3, 4, 5, 6"
    )
    assert shards.describe(np.array([[7], [7]]), Shard(1, 2), "random") == "shard 1/2 at random: 2 samples, class 7"
    assert shards.describe(np.eye(3)[[0, 2]], Shard(1, 1), "label") == "shard 1/1 by label: 2 samples, classes 0, 2"
    assert shards.describe(np.arange(21), Shard(1, 4), "random") == "shard 1/4 at random: 21 samples, 21 classes"
    assert shards.describe(np.array([0.5, 1.5, 0.5]), Shard(1, 4), "label") == (
        "shard 1/4 by label: 3 samples, 2 distinct labels"
    )


@pytest.mark.processes
def test_the_client_cli_still_parses_without_importing_numpy() -> None:
    probe = "import sys, client_part.cli\nprint('numpy' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_the_client_takes_a_shard_and_how_to_cut_it(monkeypatch: pytest.MonkeyPatch) -> None:
    config = client_args([])
    assert (config.shard, config.shard_by) == (None, "random")
    config = client_args(["--shard", "2/3"])
    assert (config.shard, config.shard_by) == (Shard(2, 3), "random")
    config = client_args(["--shard", "3/3", "--shard-by", "label"])
    assert (config.shard, config.shard_by) == (Shard(3, 3), "label")
    monkeypatch.setenv("SPLIT_SHARD", "1/4")
    monkeypatch.setenv("SPLIT_SHARD_BY", "label")
    config = client_args([])
    assert (config.shard, config.shard_by) == (Shard(1, 4), "label")


def error_lines(err: str) -> list[str]:
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if "error:" in line]


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--shard", "4/3"], "argument --shard: expected K/N with 1 <= K <= N (the K-th of N shards), got '4/3'"),
        (["--shard", "2"], "argument --shard: expected K/N with 1 <= K <= N (the K-th of N shards), got '2'"),
        (["--shard", "1/2", "--shard-by", "class"], "argument --shard-by: invalid choice: 'class'"),
        (["--shard-by", "label"], "--shard-by label needs --shard K/N (which of the N parts to train on)"),
        (["--shard-by", "random"], "--shard-by random needs --shard K/N (which of the N parts to train on)"),
    ],
)
def test_shard_mistakes_end_in_one_line_naming_the_flag(
    capsys: pytest.CaptureFixture[str], flags: list[str], expected: str
) -> None:
    with pytest.raises(SystemExit) as exited:
        client_args(flags)
    assert exited.value.code == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert line.startswith("split-client: error: ")
    assert expected in line


@pytest.mark.processes
def test_the_client_program_refuses_a_shard_past_the_count_before_loading_tensorflow() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "client_part", "--shard", "4/3"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    (line,) = error_lines(result.stderr)
    assert line.endswith("argument --shard: expected K/N with 1 <= K <= N (the K-th of N shards), got '4/3'")


@pytest.mark.processes
def test_more_shards_than_samples_end_the_run_in_one_line(tmp_path: Path) -> None:
    dataset = faults_support.make_npz(tmp_path / "tiny.npz", n_train=4, n_test=4)
    log = tmp_path / "client.log"
    flags = ["--dataset", str(dataset), "--shard", "5/5", "--target", "127.0.0.1:1", "--connect-timeout", "1"]
    client = faults_support.spawn("client_part", flags, log)
    assert client.wait(timeout=120) == 2
    text = log.read_text()
    assert "Traceback" not in text, text
    (line,) = [line for line in text.splitlines() if " ERROR " in line]
    assert line.endswith(
        "--shard 5/5 --shard-by random: cannot cut 4 samples into 5 shards: each shard needs at least one sample"
    )


@pytest.mark.processes
def test_a_client_trains_on_its_shard_against_a_real_server(tmp_path: Path) -> None:
    history, client_log = tmp_path / "history.json", tmp_path / "client.log"
    server = server_cli.build(server_cli.parse_args(["--seed", "3"]))  # `split-server --seed 3`, in this process
    port = server.start("127.0.0.1:0")
    try:
        flags = ["--target", f"127.0.0.1:{port}", "--seed", "3", "--epochs", "1"]
        flags += ["--batch-size", "64", "--shard", "2/3", "--history-json", str(history)]
        client = faults_support.spawn("client_part", flags, client_log)
        try:
            assert client.wait(timeout=300) == 0, client_log.read_text()[-3000:]
        finally:
            faults_support.stop(client)
    finally:
        server.stop(grace=1.0)
    log = client_log.read_text()
    digits = data.load("digits", seed=3)
    _, y_shard = shards.take(digits.x_train, digits.y_train, Shard(2, 3), "random", seed=3)
    assert len(y_shard) == 479  # a third of the 1,437 training samples
    assert shards.describe(y_shard, Shard(2, 3), "random") in log
    train = int(479 * 0.9)  # the validation hold-out comes out of the shard
    assert f"431 of shard 2/3 to train on and {479 - train} to validate" in log
    report = json.loads(history.read_text())
    unsharded = math.ceil(int(1437 * 0.9) / 64)  # 21 steps an epoch on the whole training split
    assert report["steps"] == math.ceil(train / 64) == 7 == unsharded // 3
    assert len(report["history"]["loss"]) == 1 and "val_loss" in report["history"]
