"""Vertical split training (`FuseTrainer` and k feature parties, each with its own optimizer) equals training the
uncut model of the same parties with `keras.Model.fit` on the joined table, in the same batch order.

Bit for bit without oneDNN where the label party's update runs as a plain graph, as in `fit`; within float32
round-off otherwise. What each means and how the tolerance is derived: tests/exactness_support.py (the same
BATCH, EPOCHS and ROUNDOFF); docs/vertical.md, "Training", states the claim.
"""

from __future__ import annotations

from collections.abc import Iterator

import keras
import numpy as np
import pytest
import tensorflow as tf

from splitlearning.errors import InvalidRequest
from splitlearning.training.vertical import FuseTrainer
from tests.exactness_support import (
    BATCH,
    EPOCHS,
    ONEDNN,
    STEPS,
    assert_close,
    assert_logs_equal,
    assert_weights_equal,
    same_update_as_fit,
)
from tests.vertical_support import (
    OPTIMIZERS,
    Case,
    FeatureParties,
    Parties,
    make_table,
    spec,
    uncut_inputs,
    uncut_model,
)

__all__ = ["same_update_as_fit"]  # a fixture, used by name

SEED = 7


@pytest.fixture(autouse=True)
def on_cpu() -> Iterator[None]:
    """The uncut reference runs where the parts run (/CPU:0), so a GPU host compares like with like."""
    with tf.device("/CPU:0"):
        yield


def make_loss() -> keras.losses.Loss:
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def label_party(case: Case, parties: Parties) -> FuseTrainer:
    return FuseTrainer(
        parties.top,
        make_loss(),
        OPTIMIZERS[case.optimizer](),
        ["accuracy"],
        iv_specs=[spec(case.iv_dim(i)) for i in range(case.parties)],
        fuse=case.fuse,
        bottom=parties.own,
    )


def feature_parties(case: Case, parties: Parties, fuse: FuseTrainer) -> FeatureParties:
    optimizers = [OPTIMIZERS[case.optimizer]() for _ in parties.feature]  # each party its own, configured alike
    return FeatureParties(parties.feature, optimizers, fuse)


def check_vertical_fit_equals_uncut_fit(case: Case, exact: bool) -> None:
    xs, own_x, y = make_table(case, n=50, seed=123)  # 50 rows: three full batches of 16 and one of 2
    vx, vown, vy = make_table(case, n=20, seed=5)

    split = Parties.build(case, SEED)
    initial = [m.get_weights() for m in [*split.feature, split.top]]
    fuse = label_party(case, split)
    features = feature_parties(case, split, fuse)
    history: dict[str, list[float]] = {name: [] for name in fuse.metric_names}
    for _ in range(EPOCHS):
        for start in range(0, len(y), BATCH):
            rows = slice(start, start + BATCH)
            own = None if own_x is None else own_x[rows]
            features.train([x[rows] for x in xs], y[rows], own, reset=start == 0)
        for name, value in zip(fuse.metric_names, features.metrics, strict=True):
            history[name].append(value)
    assert fuse.iterations == STEPS
    assert all(int(o.iterations.numpy()) == STEPS for o in features.optimizers)
    split_eval: dict[str, float] = {}
    predictions = []
    for start in range(0, len(vy), BATCH):
        rows = slice(start, start + BATCH)
        ivs, own = features.forward([x[rows] for x in vx]), None if vown is None else vown[rows]
        split_eval = dict(zip(fuse.metric_names, fuse.evaluate(ivs, vy[rows], own, start == 0), strict=True))
        predictions.append(fuse.predict(ivs, own))

    reference = Parties.build(case, SEED)  # the same starting weights
    uncut = uncut_model(reference, make_loss(), OPTIMIZERS[case.optimizer]())
    expected = uncut.fit(uncut_inputs(xs, own_x), y, batch_size=BATCH, epochs=EPOCHS, shuffle=False, verbose=0)

    assert int(uncut.optimizer.iterations.numpy()) == STEPS
    for i, (party, uncut_party) in enumerate(zip(split.feature, reference.feature, strict=True)):
        assert_weights_equal(party.get_weights(), uncut_party.get_weights(), f"feature party {i}", exact)
    assert_weights_equal(fuse.top.get_weights(), reference.top.get_weights(), "top", exact)
    if case.own_bottom:
        assert fuse.bottom is not None and reference.own is not None
        assert_weights_equal(fuse.bottom.get_weights(), reference.own.get_weights(), "label party's bottom", exact)
    # Guards the comparisons: every party's weights moved (a no-op training would also be "equal").
    for before, model in zip(initial, [*split.feature, split.top], strict=True):
        assert all(not np.allclose(b, a) for b, a in zip(before, model.get_weights(), strict=True)), model.name

    assert_logs_equal(history, expected.history, exact, sum_of_means=False)
    uncut_val = uncut_inputs(vx, vown)
    expected_eval = uncut.evaluate(uncut_val, vy, batch_size=BATCH, return_dict=True, verbose=0)
    assert_logs_equal(split_eval, expected_eval, exact, sum_of_means=False)
    expected_pred = uncut.predict(uncut_val, batch_size=BATCH, verbose=0)
    assert_close(np.concatenate(predictions), expected_pred, "predictions", exact)


CASES = [
    Case(2, own_bottom=False, fuse="concat", optimizer="adam"),
    Case(3, own_bottom=False, fuse="concat", optimizer="sgd"),
    Case(2, own_bottom=True, fuse="concat", optimizer="adam"),
    Case(3, own_bottom=True, fuse="concat", optimizer="sgd_momentum"),
    Case(2, own_bottom=True, fuse="sum", optimizer="sgd_momentum"),
    Case(3, own_bottom=False, fuse="mean", optimizer="adam"),
]


@pytest.mark.usefixtures("same_update_as_fit")
@pytest.mark.parametrize("case", CASES, ids=str)
def test_vertical_fit_equals_uncut_fit(case: Case) -> None:
    """Bit for bit without oneDNN (the label party's update as a plain graph, as in `fit`); within round-off
    with it."""
    check_vertical_fit_equals_uncut_fit(case, exact=not ONEDNN)


@pytest.mark.parametrize("case", [Case(3, own_bottom=True, fuse="concat", optimizer="adam")], ids=str)
def test_vertical_fit_with_the_compiled_update_is_within_roundoff(case: Case) -> None:
    """As deployed: the label party's update XLA-compiled, which may contract and reorder its arithmetic."""
    check_vertical_fit_equals_uncut_fit(case, exact=False)


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_an_optimizer_per_party_updates_as_one_optimizer_over_all_weights(optimizer: str) -> None:
    """Why k+1 optimizers can equal the uncut model's one: Keras updates each variable from its own gradient
    and its own slots (Adam's moments, momentum), with one shared step count that every party's optimizer
    advances once per step too. Bit for bit, with or without oneDNN (elementwise work only)."""
    rng = np.random.default_rng(0)
    shapes = [(3, 4), (4,), (2, 2), (5,)]
    groups = [[0, 1], [2], [3]]  # three parties' variables
    start = [rng.normal(size=s).astype("float32") for s in shapes]
    steps = [[rng.normal(size=s).astype("float32") for s in shapes] for _ in range(4)]

    together = [tf.Variable(v) for v in start]
    one = OPTIMIZERS[optimizer]()
    apart = [tf.Variable(v) for v in start]
    each = [OPTIMIZERS[optimizer]() for _ in groups]
    for grads in steps:
        one.apply([tf.constant(g) for g in grads], together)
        for group, opt in zip(groups, each, strict=True):
            opt.apply([tf.constant(grads[i]) for i in group], [apart[i] for i in group])
    for i, (a, b) in enumerate(zip(apart, together, strict=True)):
        assert_close(a.numpy(), b.numpy(), f"variable {i}", exact=True)
        assert not np.array_equal(a.numpy(), start[i])


def test_each_party_gets_its_slice_of_the_fused_gradient() -> None:
    """concat: party i's dLoss/dIV is columns [offset_i, offset_i + width_i) of dLoss/d(fused), the label
    party's own bottom's columns coming first; checked on a crafted batch against a tape on the fused vector."""
    case = Case(3, own_bottom=True, fuse="concat", optimizer="sgd")
    parties = Parties.build(case, SEED)
    fuse = label_party(case, parties)
    own_bottom = parties.own
    assert own_bottom is not None
    rows = 5
    ivs = [np.linspace(-1, 1, rows * case.iv_dim(i), dtype="float32").reshape(rows, -1) * (i + 1) for i in range(3)]
    own_x = np.arange(rows * 2, dtype="float32").reshape(rows, 2) / 10
    labels = np.array([0, 1, 2, 1, 0], "int64")

    @tf.function
    def fused_gradient(own_x: tf.Tensor, ivs: list[tf.Tensor], labels: tf.Tensor) -> tf.Tensor:
        fused = tf.concat([own_bottom(own_x, training=True), *ivs], axis=-1)
        with tf.GradientTape() as tape:
            tape.watch(fused)
            loss = make_loss()(labels, parties.top(fused, training=True))
        return tape.gradient(loss, fused)

    expected = fused_gradient(own_x, [tf.constant(iv) for iv in ivs], labels).numpy()  # before the update
    grads, _ = fuse.train(ivs, labels, own_x)
    offset = case.iv_dim(-1)  # the label party's own part comes first
    for i, grad in enumerate(grads):
        width = case.iv_dim(i)
        assert grad.shape == (rows, width)
        assert_close(grad, expected[:, offset : offset + width], f"party {i}'s gradient", exact=not ONEDNN)
        assert np.all(np.any(grad != 0, axis=1)), "a crafted batch reaches every column"
        offset += width
    assert offset == expected.shape[1]


BAD_BATCHES = {
    "wrong width": (1, lambda iv: iv[:, :-1], "party 1 iv: shape"),
    "fewer rows": (2, lambda iv: iv[:-1], "party 2 iv: 3 rows"),
    "wrong dtype": (0, lambda iv: iv.astype("float64"), "party 0 iv: dtype float64"),
    "no batch axis": (1, lambda iv: iv[0], "party 1 iv: shape"),
}


@pytest.mark.parametrize("bad", sorted(BAD_BATCHES))
def test_a_party_whose_iv_does_not_fit_is_named_and_nothing_changes(bad: str) -> None:
    case = Case(3, own_bottom=True, fuse="concat", optimizer="adam")
    parties = Parties.build(case, SEED)
    fuse = label_party(case, parties)
    _, own_x, y = make_table(case, n=4, seed=1)
    ivs = [np.full((4, case.iv_dim(i)), 0.5 * (i + 1), "float32") for i in range(case.parties)]
    fuse.train(ivs, y, own_x)  # its update pending: a refused step must not even apply that
    weights = [w.copy() for w in fuse.model.get_weights()]
    optimizer_state = [v.numpy().copy() for v in fuse.optimizer.variables]
    metrics = [v.numpy().copy() for v in fuse.model.metrics_variables]

    party, broken, message = BAD_BATCHES[bad]
    wrong = list(ivs)
    wrong[party] = broken(ivs[party])
    with pytest.raises(InvalidRequest, match=message):
        fuse.train(wrong, y, own_x, reset_metrics=True)

    assert int(fuse.optimizer.iterations.numpy()) == 0  # the raw variable: nothing settled, nothing applied
    assert_weights_equal(fuse.model.get_weights(), weights, "label party", exact=True)
    assert_weights_equal([v.numpy() for v in fuse.optimizer.variables], optimizer_state, "optimizer", exact=True)
    assert_weights_equal([v.numpy() for v in fuse.model.metrics_variables], metrics, "metrics", exact=True)
    assert fuse.iterations == 1


def test_a_batch_missing_a_party_or_the_own_columns_is_refused() -> None:
    case = Case(2, own_bottom=True, fuse="concat", optimizer="sgd")
    fuse = label_party(case, Parties.build(case, SEED))
    ivs = [np.zeros((4, case.iv_dim(i)), "float32") for i in range(2)]
    own, y = np.zeros((4, 2), "float32"), np.zeros(4, "int64")
    with pytest.raises(InvalidRequest, match="expected 2 IVs"):
        fuse.train(ivs[:1], y, own)
    with pytest.raises(InvalidRequest, match="own_x"):
        fuse.train(ivs, y)
    with pytest.raises(InvalidRequest, match="labels: 3 rows"):
        fuse.train(ivs, y[:3], own)
    assert fuse.iterations == 0


def test_sum_and_mean_need_equal_iv_shapes() -> None:
    parties = Parties.build(Case(2, own_bottom=False, fuse="concat", optimizer="sgd"), SEED)  # widths 4 and 3
    for method in ("sum", "mean"):
        with pytest.raises(ValueError, match=f"fuse={method} needs equal IV shapes"):
            FuseTrainer(parties.top, make_loss(), "sgd", iv_specs=[spec(4), spec(3)], fuse=method)
