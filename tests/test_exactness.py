"""Split training over loopback gRPC equals training the uncut model with `keras.Model.fit`."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import keras
import numpy as np
import pytest
import tensorflow as tf

from client_part import SplitClient
from tests.conftest import KINDS, StartServer, build_pair, make_data, make_loss

RTOL, ATOL = 1e-5, 1e-6
BATCH = 16  # 50 samples: three full batches and a partial one of 2
EPOCHS = 2

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


def assert_weights_equal(actual: list[np.ndarray], expected: list[np.ndarray], what: str) -> None:
    assert len(actual) == len(expected), what
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        np.testing.assert_allclose(a, e, rtol=RTOL, atol=ATOL, err_msg=f"{what}[{i}]")


def assert_logs_equal(actual: dict[str, Any], expected: dict[str, Any]) -> None:
    assert sorted(actual) == sorted(expected)
    for key in expected:
        np.testing.assert_allclose(actual[key], expected[key], rtol=RTOL, err_msg=key)


def test_pairs_are_seeded() -> None:
    for kind in KINDS:
        a, b = build_pair(kind, 3), build_pair(kind, 3)
        for left, right in zip(a, b, strict=True):
            assert_weights_equal(left.get_weights(), right.get_weights(), f"{kind} {left.name}")
    # A different seed gives different weights, or the comparisons below would prove little.
    assert not np.allclose(build_pair("plain", 3)[0].get_weights()[0], build_pair("plain", 4)[0].get_weights()[0])


@pytest.mark.parametrize(
    ("kind", "optimizer"),
    [(kind, optimizer) for kind in KINDS for optimizer in ("sgd", "adam")] + [("regularized", "sgd_momentum")],
)
def test_split_fit_equals_uncut_fit(split_pair: StartServer, kind: str, optimizer: str) -> None:
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
    assert_weights_equal(client.model.get_weights(), uncut_bottom.get_weights(), "bottom")
    assert_weights_equal(split.server.model.get_weights(), uncut_top.get_weights(), "top")

    assert sorted(history.history) == sorted(expected.history)
    for key, values in expected.history.items():
        assert len(history.history[key]) == EPOCHS, key
        np.testing.assert_allclose(history.history[key], values, rtol=RTOL, err_msg=key)

    assert_logs_equal(split_eval, uncut.evaluate(x_val, y_val, batch_size=BATCH, return_dict=True, verbose=0))
    np.testing.assert_allclose(split_pred, uncut.predict(x_val, batch_size=BATCH, verbose=0), rtol=RTOL, atol=ATOL)


def test_regularizer_penalty_is_in_the_loss(split_pair: StartServer) -> None:
    """The client's kernel_regularizer must count: without it the loss (and the weights) would differ."""
    x, y = make_data()
    plain = split_pair("plain", 7)
    regularized = split_pair("regularized", 7)
    losses = []
    for split in (plain, regularized):
        with SplitClient(split.bottom, OPTIMIZERS["sgd"](), target=split.target, connect_timeout=10) as client:
            losses.append(client.evaluate(x, y, batch_size=BATCH)["loss"])
    penalty = float(sum(float(v) for v in regularized.bottom.losses))
    assert penalty > 0
    np.testing.assert_allclose(losses[1] - losses[0], penalty, rtol=1e-4)


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

    assert_weights_equal(client.model.get_weights(), uncut_bottom.get_weights(), "bottom")
    assert_weights_equal(split.server.model.get_weights(), uncut_top.get_weights(), "top")
    assert_logs_equal({k: v[-1] for k, v in history.history.items()}, {k: v[-1] for k, v in expected.history.items()})
    assert_logs_equal(split_eval, uncut.evaluate(x, y, batch_size=BATCH, return_dict=True, verbose=0))
    np.testing.assert_allclose(split_pred, uncut.predict(x, batch_size=BATCH, verbose=0), rtol=RTOL, atol=ATOL)


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


def test_column_labels_are_accepted_like_keras(split_pair: StartServer) -> None:
    x, y = make_data()
    split = split_pair("plain", 7, optimizer=OPTIMIZERS["sgd"]())
    with SplitClient(split.bottom, OPTIMIZERS["sgd"](), target=split.target, connect_timeout=10) as client:
        history = client.fit(x, y[:, None], batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    uncut = uncut_model("plain", 7, "sgd")
    expected = uncut.fit(x, y[:, None], batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    np.testing.assert_allclose(history.history["loss"], expected.history["loss"], rtol=RTOL)


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
    assert_weights_equal(bottom_weights, uncut.layers[0].get_weights(), "the user's bottom")
    assert_weights_equal(split.server.model.get_weights(), uncut.layers[1].get_weights(), "top")
