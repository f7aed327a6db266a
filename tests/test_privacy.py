"""The leakage meters against direct computations on crafted batches, the label defences and NoPeek doing what
docs/security.md says, and each of them off leaving training bit for bit as it was."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import keras
import numpy as np
import pytest
import tensorflow as tf

from client_part import cli as client_cli
from client_part.client import SplitClient
from server_part import SplitServer
from splitlearning import label_defences, leakage
from splitlearning.label_defences import Kind, LabelDefence, marvell_variances, symmetric_kl
from splitlearning.training.first_part import ClientTrainer
from splitlearning.training.nopeek import distance_correlation as tf_dcor
from tests.conftest import build_bottom, make_data, make_loss
from tests.ushape_support import build_head, build_middle

# -- the meters ----------------------------------------------------------------------------------------------


def test_auc_matches_a_direct_count_over_pairs() -> None:
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, size=60).astype(float)  # many ties
    positives = rng.random(60) < 0.3
    pairs = [(s, t) for s in scores[positives] for t in scores[~positives]]
    expected = sum(1.0 if s > t else 0.5 if s == t else 0.0 for s, t in pairs) / len(pairs)
    assert leakage.auc(scores, positives) == pytest.approx(expected, abs=1e-12)
    assert leakage.leak_auc(-scores, positives) == pytest.approx(max(expected, 1 - expected), abs=1e-12)
    assert np.isnan(leakage.auc(scores, np.ones(60, bool)))


def crafted(positive_norm: float, negative_norm: float, rows: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Gradients of one logit's IV: positives along +v, negatives along -v, each with the norm given."""
    labels = np.zeros((rows, 1), np.float32)
    labels[::4] = 1.0  # 25% positives
    v = np.array([3.0, 4.0], np.float32) / 5.0
    grads = np.where(labels == 1, positive_norm * v, -negative_norm * v).astype(np.float32)
    return grads, labels


def test_label_attacks_score_one_when_the_gradients_tell_and_one_half_when_they_do_not() -> None:
    meter = leakage.LabelLeakMeter()
    meter.add(*crafted(2.0, 1.0))  # larger norm for positives, opposite directions: both attacks see everything
    assert meter.result() == {leakage.NORM: 1.0, leakage.DIRECTION: 1.0}
    meter.reset()
    grads, labels = crafted(1.0, 1.0)
    meter.add(np.abs(grads), labels)  # one gradient for everyone: nothing to tell
    assert meter.result() == {leakage.NORM: 0.5, leakage.DIRECTION: 0.5}


def test_distance_correlation_of_related_and_unrelated_rows() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(32, 5))
    rotation, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    assert leakage.distance_correlation(x, 3.0 * x @ rotation + 1.0) == pytest.approx(1.0, abs=1e-9)
    assert leakage.distance_correlation(x, np.ones((32, 3))) == 0.0
    unrelated = leakage.distance_correlation(x, rng.normal(size=(32, 4)))
    assert 0.0 < unrelated < 0.6
    # NoPeek's differentiable TensorFlow version computes the same statistic (float32).
    z = np.tanh(x @ rng.normal(size=(5, 3)))
    assert float(tf_dcor(tf.constant(x, tf.float32), tf.constant(z, tf.float32))) == pytest.approx(
        leakage.distance_correlation(x, z), rel=1e-4
    )


def test_the_meter_reads_about_zero_for_an_unrelated_iv_where_the_sample_statistic_does_not() -> None:
    rng = np.random.default_rng(4)
    x, unrelated = rng.normal(size=(64, 64)), rng.normal(size=(64, 32))
    assert leakage.distance_correlation(x, unrelated) > 0.7  # the sample statistic's bias at 64 rows
    assert abs(leakage.unbiased_distance_correlation(x, unrelated)) < 0.1
    rotation, _ = np.linalg.qr(rng.normal(size=(64, 64)))
    assert leakage.unbiased_distance_correlation(x, 2.0 * x @ rotation - 1.0) == pytest.approx(1.0, abs=1e-9)


def test_input_meter_samples_the_first_batches_of_each_epoch() -> None:
    meter = leakage.InputLeakMeter(samples=2)
    x = np.arange(24.0).reshape(8, 3)
    for value in (x, 2 * x):
        assert meter.due()
        meter.add(x, value)
    assert not meter.due()
    assert meter.result() == {leakage.DCOR: pytest.approx(1.0)}
    meter.reset()
    assert meter.due() and np.isnan(meter.result()[leakage.DCOR])


def test_one_hot_labels_are_scored_by_their_class() -> None:
    one_hot = np.eye(3, dtype=np.float32)[[2, 0, 2, 1, 2]]
    assert leakage.positive_class(one_hot) == 2
    np.testing.assert_array_equal(leakage.positives_of(one_hot, 2), [True, False, True, False, True])
    grads = np.where(leakage.positives_of(one_hot, 2)[:, None], 1.0, -1.0) * np.ones((5, 4))
    meter = leakage.LabelLeakMeter(positive=2)
    meter.add(grads, one_hot)
    assert meter.result()[leakage.DIRECTION] == 1.0


def test_positive_class() -> None:
    assert leakage.positive_class(np.array([[0.0], [1.0]], np.float32)) == 1
    assert leakage.positive_class(np.array([0, 1, 1, 1])) == 1
    assert leakage.positive_class(np.array([2, 0, 2, 1, 2])) == 2  # one class against the rest: the most frequent


# -- the defences ----------------------------------------------------------------------------------------------


def test_defences_move_the_norm_attack_towards_a_coin() -> None:
    rng = np.random.default_rng(2)
    labels = (rng.random((400, 1)) < 0.1).astype(np.float32)
    v = rng.normal(size=16)
    grads = np.where(labels == 1, 1.0, -0.1) * v * (1 + 0.05 * rng.normal(size=(400, 1)))
    grads = grads.astype(np.float32)
    undefended = leakage.leak_auc(leakage.norm_scores(grads), labels[:, 0] == 1)
    assert undefended > 0.99
    for kind, strength in ((Kind.MAX_NORM, 0.0), (Kind.MARVELL, 4.0), (Kind.GAUSSIAN, 10.0)):
        defence = LabelDefence(kind, strength, seed=3)
        sent = np.concatenate([defence.apply(grads[i : i + 50], labels[i : i + 50], (i,)) for i in range(0, 400, 50)])
        assert sent.shape == grads.shape and sent.dtype == grads.dtype
        defended = leakage.leak_auc(leakage.norm_scores(sent), labels[:, 0] == 1)
        assert defended < undefended - 0.1, (kind, defended)


def test_max_norm_evens_the_expected_squared_norms() -> None:
    grads = np.array([[3.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]], np.float32)
    defence = LabelDefence(Kind.MAX_NORM, seed=0)
    draws = np.stack([defence.apply(grads, np.array([[1.0], [0.0]]), (step,)) for step in range(4000)])
    squared = (draws.astype(np.float64) ** 2).sum(axis=2).mean(axis=0)
    np.testing.assert_allclose(squared, [9.0, 9.0], rtol=0.05)
    np.testing.assert_array_equal(draws[:, 0], np.broadcast_to(grads[0], draws[:, 0].shape))  # the largest: as is


def test_marvell_noise_lies_along_the_class_gap_and_minimises_its_objective() -> None:
    gap, share, power = 4.0, 0.2, 8.0
    b0, b1 = marvell_variances(gap, share, power)
    assert share * b1 + (1 - share) * b0 == pytest.approx(power)
    best = symmetric_kl(gap, b0, b1)
    for t in np.linspace(0.05, 0.95, 19) * power / share:  # no split of the budget does better
        assert best <= symmetric_kl(gap, (power - share * t) / (1 - share), t) + 1e-6
    rows = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    labels = np.array([[1.0], [0.0], [0.0]])
    noise = LabelDefence(Kind.MARVELL, 2.0, seed=1).apply(rows, labels) - rows
    delta = rows[0] - rows[1:].mean(axis=0)
    for row in noise:  # every example's noise is a multiple of the gap between the class means
        np.testing.assert_allclose(np.cross(row, delta), 0.0, atol=1e-12)
    one_class = LabelDefence(Kind.MARVELL, 2.0).apply(rows, np.ones((3, 1)))
    np.testing.assert_array_equal(one_class, rows)
    # The same key draws the same noise (a resend, a restart); another key other noise.
    again = LabelDefence(Kind.MARVELL, 2.0, seed=1)
    np.testing.assert_array_equal(again.apply(rows, labels, (5,)), again.apply(rows, labels, (5,)))
    assert not np.array_equal(again.apply(rows, labels, (5,)), again.apply(rows, labels, (6,)))


def test_a_defence_needs_a_strength_where_it_uses_one() -> None:
    with pytest.raises(ValueError, match="needs a strength > 0"):
        LabelDefence(Kind.GAUSSIAN)
    assert label_defences.KINDS == client_cli.LABEL_DEFENCES


# -- NoPeek ----------------------------------------------------------------------------------------------------


def trained(alpha: float | None, steps: int = 5) -> tuple[ClientTrainer, np.ndarray, np.ndarray]:
    """A bottom trained a few steps against a zero gradient from the cut: only NoPeek (if any) moves it."""
    x, _ = make_data(n=32)
    kwargs: dict[str, Any] = {} if alpha is None else {"nopeek_alpha": alpha}
    trainer = ClientTrainer(build_bottom(seed=2), keras.optimizers.SGD(0.5), "/CPU:0", **kwargs)
    trainer.exchange_with(lambda iv, labels: np.zeros_like(iv) + 0.01)
    before = leakage.distance_correlation(x, trainer.forward(x))
    for _ in range(steps):
        trainer.train(x, np.zeros(32, np.int64))
    return trainer, np.array(before), np.array(leakage.distance_correlation(x, trainer.forward(x)))


def test_nopeek_lowers_the_distance_correlation_and_off_changes_nothing() -> None:
    plain, _, _ = trained(None)
    off, _, _ = trained(0.0)
    for a, b in zip(plain.model.get_weights(), off.model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    _, before, after = trained(5.0, steps=20)
    assert after < before - 0.05


# -- a U-shaped run: the meters in the logs, and off changing nothing -------------------------------------


def ushape_fit(**kwargs: Any) -> tuple[list[np.ndarray], dict[str, list[float]]]:
    x, y = make_data(n=64)
    server = SplitServer(build_middle(seed=4), optimizer="sgd", cut="ushape")
    target = f"127.0.0.1:{server.start('127.0.0.1:0')}"
    try:
        with SplitClient(
            build_bottom(seed=4),
            "sgd",
            target=target,
            connect_timeout=10,
            head=build_head(seed=4),
            loss=make_loss(),
            metrics=["accuracy"],
            **kwargs,
        ) as client:
            history = client.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
            return client.model.get_weights(), history.history
    finally:
        server.stop(grace=1.0)


def test_meters_join_each_epochs_logs_and_change_no_weight() -> None:
    metered, history = ushape_fit()
    plain, quiet = ushape_fit(leakage_meters=False)
    for a, b in zip(metered, plain, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not {leakage.NORM, leakage.DIRECTION, leakage.DCOR} & set(quiet)
    for key in (leakage.NORM, leakage.DIRECTION, leakage.DCOR):
        assert len(history[key]) == 2 and all(0.0 <= v <= 1.0 for v in history[key]), (key, history[key])
    none, _ = ushape_fit(label_defence=LabelDefence(Kind.NONE))
    for a, b in zip(metered, none, strict=True):
        np.testing.assert_array_equal(a, b)
    defended, _ = ushape_fit(label_defence=LabelDefence(Kind.GAUSSIAN, 1.0))
    assert any(not np.array_equal(a, b) for a, b in zip(metered, defended, strict=True))


def test_a_label_defence_needs_the_ushape() -> None:
    with pytest.raises(ValueError, match="U-shaped client"):
        SplitClient(build_bottom(), "sgd", label_defence=LabelDefence(Kind.MAX_NORM))


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--label-defence", "max-norm"], "only --cut ushape sends gradients about its labels"),
        (["--cut", "ushape", "--label-defence", "marvell"], "needs --label-defence-strength > 0"),
        (["--cut", "ushape", "--label-defence-strength", "1"], "applies to gaussian and marvell"),
        (["--nopeek-alpha", "-1"], "argument --nopeek-alpha: expected a number >= 0"),
    ],
)
def test_privacy_flags(capsys: pytest.CaptureFixture[str], flags: list[str], expected: str) -> None:
    with pytest.raises(SystemExit):
        client_cli.parse_args(flags)
    assert expected in capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.processes
def test_the_client_cli_still_parses_without_numpy() -> None:
    code = (
        "import sys; from client_part.cli import parse_args; "
        "parse_args(['--cut', 'ushape', '--label-defence', 'max-norm']); "
        "assert 'numpy' not in sys.modules, 'numpy imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
