"""U-shaped split training (bottom + head on the client, middle on the server) equals the uncut model's fit.

Bit for bit where the computation order is the same, within float32 round-off where it may not be:
tests/exactness_support.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc
import keras
import numpy as np
import pytest

from client_part import RemoteError, SplitClient
from server_part import SplitServer
from tests.conftest import NUM_CLASSES, build_bottom, build_top, make_data, make_loss
from tests.exactness_support import (
    BATCH,
    EPOCHS,
    ONEDNN,
    assert_close,
    assert_logs_equal,
    assert_weights_equal,
    same_update_as_fit,
)
from tests.ushape_support import MIDDLE_DIM, build_head, build_middle

__all__ = ["same_update_as_fit"]  # a fixture, used by name

Servers = Callable[..., tuple[SplitServer, str]]

OPTIMIZERS: dict[str, Callable[[], keras.optimizers.Optimizer]] = {
    "sgd": lambda: keras.optimizers.SGD(learning_rate=0.1),
    "adam": lambda: keras.optimizers.Adam(learning_rate=0.01),
}


def build_triple(kind: str, seed: int) -> tuple[keras.Model, keras.Model, keras.Model]:
    return build_bottom(kind, seed), build_middle(kind, seed), build_head(seed)


@pytest.fixture
def servers() -> Iterator[Servers]:
    started: list[SplitServer] = []

    def start(model: keras.Model, **kwargs: Any) -> tuple[SplitServer, str]:
        server = SplitServer(model, **kwargs)
        started.append(server)
        return server, f"127.0.0.1:{server.start('127.0.0.1:0')}"

    yield start
    for server in started:
        server.stop(grace=1.0)


# SGD and Adam; BatchNormalization (state updated by the forward) on both sides of the server's middle. "fit":
# the middle's update as a plain graph, as in `fit` (bit for bit without oneDNN); "compiled": as deployed.
@pytest.mark.parametrize(
    ("kind", "optimizer", "update"),
    [("plain", "sgd", "fit"), ("batchnorm", "adam", "fit"), ("batchnorm", "adam", "compiled")],
)
def test_ushape_fit_equals_uncut_fit(
    request: pytest.FixtureRequest, servers: Servers, kind: str, optimizer: str, update: str
) -> None:
    if update == "fit":
        request.getfixturevalue("same_update_as_fit")
    exact = update == "fit" and not ONEDNN
    seed = 7
    x, y = make_data()
    x_val, y_val = make_data(n=20, seed=5)
    bottom, middle, head = build_triple(kind, seed)
    server, target = servers(middle, optimizer=OPTIMIZERS[optimizer](), cut="ushape")
    with SplitClient(
        bottom, OPTIMIZERS[optimizer](), target=target, head=head, loss=make_loss(), metrics=["accuracy"]
    ) as client:
        history = client.fit(
            x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=False, validation_data=(x_val, y_val), verbose=0
        )
        split_eval = client.evaluate(x_val, y_val, batch_size=BATCH)
        split_pred = client.predict(x_val, batch_size=BATCH)
        assert client.step == EPOCHS * 4

    uncut = keras.Sequential(list(build_triple(kind, seed)))
    uncut.compile(optimizer=OPTIMIZERS[optimizer](), loss=make_loss(), metrics=["accuracy"], jit_compile=False)
    expected = uncut.fit(
        x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=False, validation_data=(x_val, y_val), verbose=0
    )
    uncut_bottom, uncut_middle, uncut_head = uncut.layers

    assert server.trainer.iterations == EPOCHS * 4
    assert_weights_equal(client.model.get_weights(), uncut_bottom.get_weights(), "bottom", exact)
    assert_weights_equal(server.model.get_weights(), uncut_middle.get_weights(), "middle", exact)
    assert client.head is not None
    assert_weights_equal(client.head.model.get_weights(), uncut_head.get_weights(), "head", exact)
    assert_logs_equal(history.history, expected.history, exact, sum_of_means=False)
    expected_eval = uncut.evaluate(x_val, y_val, batch_size=BATCH, return_dict=True, verbose=0)
    assert_logs_equal(split_eval, expected_eval, exact, sum_of_means=False)
    assert_close(split_pred, uncut.predict(x_val, batch_size=BATCH, verbose=0), "predictions", exact)


def test_ushape_training_changes_all_three_parts(servers: Servers) -> None:
    """Guards the comparison above: a no-op step would leave the initial weights."""
    x, y = make_data()
    bottom, middle, head = build_triple("plain", 7)
    initial = [m.get_weights() for m in (bottom, middle, head)]
    _, target = servers(middle, optimizer="sgd", cut="ushape")
    with SplitClient(bottom, "sgd", target=target, head=head, loss=make_loss()) as client:
        client.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
        assert client.head is not None
        final = [client.model.get_weights(), middle.get_weights(), client.head.model.get_weights()]
    for before, after in zip(initial, final, strict=True):
        assert not np.allclose(before[0], after[0])


def test_the_server_counts_each_ushape_step_once(servers: Servers) -> None:
    """Two exchanges per step on the stream, one step in the server's telemetry."""
    x, y = make_data()
    server, target = servers(build_middle(), optimizer="sgd", cut="ushape")
    with SplitClient(build_bottom(), "sgd", target=target, head=build_head(), loss=make_loss()) as client:
        client.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    assert server.telemetry.registry.get_sample_value("split_server_steps_total") == 4
    assert server.session().compute_seconds > 0


def test_a_standard_client_is_refused_by_a_ushape_server(servers: Servers) -> None:
    _, target = servers(build_middle(), optimizer="sgd", cut="ushape")
    with pytest.raises(RemoteError) as caught, SplitClient(build_bottom(), target=target, connect_timeout=10):
        pass
    assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "cut mode mismatch" in caught.value.details and "U-shaped" in caught.value.details


def test_a_ushape_client_is_refused_by_a_standard_server(servers: Servers) -> None:
    _, target = servers(build_top(), loss=make_loss(), optimizer="sgd")
    client = SplitClient(build_bottom(), target=target, head=build_head(), loss=make_loss(), connect_timeout=10)
    with pytest.raises(RemoteError) as caught:
        client.connect()
    client.close()
    assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "cut mode mismatch" in caught.value.details


def test_a_head_that_does_not_fit_the_middle_is_refused(servers: Servers) -> None:
    _, target = servers(build_middle(), optimizer="sgd", cut="ushape")
    wrong_head = keras.Sequential([keras.Input((MIDDLE_DIM + 1,)), keras.layers.Dense(NUM_CLASSES)])
    client = SplitClient(build_bottom(), target=target, head=wrong_head, loss=make_loss(), connect_timeout=10)
    with pytest.raises(ValueError, match="U-shape mismatch"):
        client.connect()
    client.close()


def test_a_ushape_middle_takes_no_loss() -> None:
    with pytest.raises(ValueError, match="no loss"):
        SplitServer(build_middle(), loss=make_loss(), cut="ushape")


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_the_users_own_models_hold_their_trained_weights_when_fit_returns(servers: Servers, optimizer: str) -> None:
    """`bottom` and `head` as the user passed them, read directly after `fit` (no validation, evaluate or predict
    in between that would settle a deferred update) equal the uncut model's (issue 16, item 6)."""
    seed = 11
    x, y = make_data()
    bottom, middle, head = build_triple("plain", seed)
    _, target = servers(middle, optimizer=OPTIMIZERS[optimizer](), cut="ushape")
    with SplitClient(bottom, OPTIMIZERS[optimizer](), target=target, head=head, loss=make_loss()) as client:
        client.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
        bottom_weights, head_weights = bottom.get_weights(), head.get_weights()

    uncut = keras.Sequential(list(build_triple("plain", seed)))
    uncut.compile(optimizer=OPTIMIZERS[optimizer](), loss=make_loss(), jit_compile=False)
    uncut.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    uncut_bottom, _, uncut_head = uncut.layers
    # Within float32 round-off (the middle's update is XLA-compiled here, see tests/exactness_support.py): a
    # head one step behind differs by a whole update, far beyond it.
    assert_weights_equal(bottom_weights, uncut_bottom.get_weights(), "the user's bottom", exact=False)
    assert_weights_equal(head_weights, uncut_head.get_weights(), "the user's head", exact=False)
