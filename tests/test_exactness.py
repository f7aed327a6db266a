"""Split training over loopback gRPC equals training the uncut model with `keras.Model.fit`.

Bit for bit where the computation order is the same, within float32 round-off where it may not be: what each
means, how the order is made the same, and how the tolerance is derived: tests/exactness_support.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import keras
import numpy as np
import pytest
import tensorflow as tf

from client_part import SplitClient
from tests.conftest import KINDS, StartServer, build_pair, make_data, make_loss
from tests.exactness_support import (
    BATCH,
    EPOCHS,
    ONEDNN,
    assert_close,
    assert_logs_equal,
    assert_weights_equal,
    same_update_as_fit,
    trained_logs,
)

__all__ = ["same_update_as_fit"]  # a fixture, used by name

OPTIMIZERS: dict[str, Callable[[], keras.optimizers.Optimizer]] = {
    "sgd": lambda: keras.optimizers.SGD(learning_rate=0.1),
    "sgd_momentum": lambda: keras.optimizers.SGD(learning_rate=0.05, momentum=0.9),
    "adam": lambda: keras.optimizers.Adam(learning_rate=0.01),
}


@pytest.fixture(autouse=True)
def on_cpu() -> Iterator[None]:
    """The uncut reference runs where both parts run by default (/CPU:0), so a GPU host compares like with like."""
    with tf.device("/CPU:0"):
        yield


def uncut_model(kind: str, seed: int, optimizer: str) -> keras.Model:
    bottom, top = build_pair(kind, seed)
    model = keras.Sequential([bottom, top])
    model.compile(optimizer=OPTIMIZERS[optimizer](), loss=make_loss(), metrics=["accuracy"], jit_compile=False)
    return model


def test_pairs_are_seeded() -> None:
    for kind in KINDS:
        a, b = build_pair(kind, 3), build_pair(kind, 3)
        for left, right in zip(a, b, strict=True):
            assert_weights_equal(left.get_weights(), right.get_weights(), f"{kind} {left.name}", exact=True)
    # A different seed gives different weights, or the comparisons below would prove little.
    assert not np.allclose(build_pair("plain", 3)[0].get_weights()[0], build_pair("plain", 4)[0].get_weights()[0])


def check_split_fit_equals_uncut_fit(split_pair: StartServer, kind: str, optimizer: str, exact: bool) -> None:
    seed = 7
    x, y = make_data()
    x_val, y_val = make_data(n=20, seed=5)
    split = split_pair(kind, seed, optimizer=OPTIMIZERS[optimizer]())
    with SplitClient(split.bottom, OPTIMIZERS[optimizer](), target=split.target, connect_timeout=10) as client:
        history = client.fit(
            x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=False, validation_data=(x_val, y_val), verbose=0
        )
        split_eval = client.evaluate(x_val, y_val, batch_size=BATCH)
        split_pred = client.predict(x_val, batch_size=BATCH)
        steps = client.step

    uncut = uncut_model(kind, seed, optimizer)
    # Same starting point on both sides of the cut.
    expected = uncut.fit(
        x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=False, validation_data=(x_val, y_val), verbose=0
    )
    uncut_bottom, uncut_top = uncut.layers

    assert steps == EPOCHS * 4
    assert split.server.trainer.iterations == EPOCHS * 4
    assert int(client.trainer.optimizer.iterations.numpy()) == int(uncut.optimizer.iterations.numpy())
    # get_weights() includes the non-trainable BatchNormalization moving statistics.
    assert_weights_equal(client.model.get_weights(), uncut_bottom.get_weights(), "bottom", exact)
    assert_weights_equal(split.server.model.get_weights(), uncut_top.get_weights(), "top", exact)

    assert sorted(trained_logs(history.history)) == sorted(expected.history)
    for key in expected.history:
        assert len(history.history[key]) == EPOCHS, key
    regularized = kind == "regularized"
    assert_logs_equal(history.history, expected.history, exact, sum_of_means=regularized)
    expected_eval = uncut.evaluate(x_val, y_val, batch_size=BATCH, return_dict=True, verbose=0)
    assert_logs_equal(split_eval, expected_eval, exact, sum_of_means=regularized)
    assert_close(split_pred, uncut.predict(x_val, batch_size=BATCH, verbose=0), "predictions", exact)


@pytest.mark.usefixtures("same_update_as_fit")
@pytest.mark.parametrize(
    ("kind", "optimizer"),
    [(kind, optimizer) for kind in KINDS for optimizer in ("sgd", "adam")] + [("regularized", "sgd_momentum")],
)
def test_split_fit_equals_uncut_fit(split_pair: StartServer, kind: str, optimizer: str) -> None:
    """Bit for bit without oneDNN (the update as a plain graph, as in `fit`); within round-off with it."""
    check_split_fit_equals_uncut_fit(split_pair, kind, optimizer, exact=not ONEDNN)


@pytest.mark.parametrize(("kind", "optimizer"), [("batchnorm", "adam"), ("regularized", "sgd_momentum")])
def test_split_fit_with_the_compiled_update_is_within_roundoff(
    split_pair: StartServer, kind: str, optimizer: str
) -> None:
    """As deployed: the server's update XLA-compiled, which may contract and reorder its arithmetic."""
    check_split_fit_equals_uncut_fit(split_pair, kind, optimizer, exact=False)


def test_regularizer_penalty_is_in_the_loss(split_pair: StartServer) -> None:
    """The client's kernel_regularizer must count: without it the loss (and the weights) would differ."""
    x, y = make_data()
    plain = split_pair("plain", 7, optimizer=OPTIMIZERS["sgd"]())
    regularized = split_pair("regularized", 7, optimizer=OPTIMIZERS["sgd"]())
    losses = []
    for split in (plain, regularized):
        with SplitClient(split.bottom, OPTIMIZERS["sgd"](), target=split.target, connect_timeout=10) as client:
            losses.append(client.evaluate(x, y, batch_size=BATCH)["loss"])
    penalty = float(sum(float(v) for v in regularized.bottom.losses))
    assert penalty > 0
    np.testing.assert_allclose(losses[1] - losses[0], penalty, rtol=1e-4)


@pytest.mark.usefixtures("same_update_as_fit")
def test_dataset_input_equals_numpy_input(split_pair: StartServer) -> None:
    seed, optimizer = 11, "adam"
    x, y = make_data()
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)
    split = split_pair("batchnorm", seed, optimizer=OPTIMIZERS[optimizer]())
    with SplitClient(split.bottom, OPTIMIZERS[optimizer](), target=split.target, connect_timeout=10) as client:
        history = client.fit(dataset, epochs=EPOCHS, verbose=0)
        split_eval = client.evaluate(dataset)
        split_pred = client.predict(dataset)

    uncut = uncut_model("batchnorm", seed, optimizer)
    expected = uncut.fit(x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=False, verbose=0)
    uncut_bottom, uncut_top = uncut.layers

    exact = not ONEDNN
    assert_weights_equal(client.model.get_weights(), uncut_bottom.get_weights(), "bottom", exact)
    assert_weights_equal(split.server.model.get_weights(), uncut_top.get_weights(), "top", exact)
    last = {k: v[-1] for k, v in history.history.items()}
    assert_logs_equal(last, {k: v[-1] for k, v in expected.history.items()}, exact, sum_of_means=False)
    expected_eval = uncut.evaluate(x, y, batch_size=BATCH, return_dict=True, verbose=0)
    assert_logs_equal(split_eval, expected_eval, exact, sum_of_means=False)
    assert_close(split_pred, uncut.predict(x, batch_size=BATCH, verbose=0), "predictions", exact)


def test_training_changes_both_sides(split_pair: StartServer) -> None:
    """Guards the comparisons above: a no-op training would leave the initial weights, which is not 'equal'."""
    x, y = make_data()
    split = split_pair("plain", 7, optimizer=OPTIMIZERS["sgd"]())
    initial_bottom, initial_top = split.bottom.get_weights(), split.top.get_weights()
    with SplitClient(split.bottom, OPTIMIZERS["sgd"](), target=split.target, connect_timeout=10) as client:
        client.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    for before, after in zip(initial_bottom, split.bottom.get_weights(), strict=True):
        assert not np.allclose(before, after)
    for before, after in zip(initial_top, split.server.model.get_weights(), strict=True):
        assert not np.allclose(before, after)


@pytest.mark.usefixtures("same_update_as_fit")
def test_column_labels_are_accepted_like_keras(split_pair: StartServer) -> None:
    x, y = make_data()
    split = split_pair("plain", 7, optimizer=OPTIMIZERS["sgd"]())
    with SplitClient(split.bottom, OPTIMIZERS["sgd"](), target=split.target, connect_timeout=10) as client:
        history = client.fit(x, y[:, None], batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    uncut = uncut_model("plain", 7, "sgd")
    expected = uncut.fit(x, y[:, None], batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    assert_close(history.history["loss"], expected.history["loss"], "loss", exact=not ONEDNN)


def test_the_users_own_bottom_holds_its_trained_weights_when_fit_returns(split_pair: StartServer) -> None:
    """The standard cut: `bottom` as the user passed it, read directly after `fit`, equals the uncut model's
    (issue 16, item 6; the server's part is read through `SplitServer.model`, which settles its update)."""
    seed = 11
    x, y = make_data()
    split = split_pair("plain", seed, optimizer=OPTIMIZERS["adam"]())
    with SplitClient(split.bottom, OPTIMIZERS["adam"](), target=split.target, connect_timeout=10) as client:
        client.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
        bottom_weights = split.bottom.get_weights()

    uncut = uncut_model("plain", seed, "adam")
    uncut.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    # The deployed (XLA-compiled) update: within float32 round-off, see tests/exactness_support.py.
    assert_weights_equal(bottom_weights, uncut.layers[0].get_weights(), "the user's bottom", exact=False)
    assert_weights_equal(split.server.model.get_weights(), uncut.layers[1].get_weights(), "top", exact=False)
