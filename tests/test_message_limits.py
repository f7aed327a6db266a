"""gRPC message-size limits: a full batch allowed by the handshake must fit through both ends of the channel."""

from __future__ import annotations

import keras
import numpy as np

from client_part import SplitClient
from server_part import SplitServer
from tests.conftest import INPUT_DIM, StartServer, build_bottom, make_data

MAX_BATCH = 256
WIDE = 200  # outputs / one-hot labels per sample: far wider than the 5-float IV


def wide_top(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((5,)), keras.layers.Dense(WIDE)])


def test_full_batch_round_trips(split_pair: StartServer) -> None:
    """The ordinary case: IV, labels and outputs all small; a batch of exactly the maximum goes through."""
    split = split_pair("plain", 0, max_batch_size=MAX_BATCH)
    x, y = make_data(n=MAX_BATCH)
    with SplitClient(split.bottom, target=split.target, max_batch_size=MAX_BATCH, connect_timeout=10) as client:
        client.fit(x, y, batch_size=MAX_BATCH, epochs=1, verbose=0)
        assert client.predict(x, batch_size=MAX_BATCH).shape == (MAX_BATCH, 3)
        assert set(client.evaluate(x, y, batch_size=MAX_BATCH)) == {"loss", "accuracy"}


def test_predict_full_batch_of_wide_outputs() -> None:
    server = SplitServer(
        wide_top(), keras.losses.SparseCategoricalCrossentropy(from_logits=True), max_batch_size=MAX_BATCH
    )
    port = server.start("127.0.0.1:0")
    try:
        x = np.random.default_rng(0).normal(size=(MAX_BATCH, INPUT_DIM)).astype("float32")
        with SplitClient(build_bottom(), target=f"127.0.0.1:{port}", max_batch_size=MAX_BATCH) as client:
            assert client.predict(x, batch_size=MAX_BATCH).shape == (MAX_BATCH, WIDE)
    finally:
        server.stop(grace=1.0)


def test_fit_full_batch_of_wide_labels() -> None:
    server = SplitServer(wide_top(), keras.losses.CategoricalCrossentropy(from_logits=True), max_batch_size=MAX_BATCH)
    port = server.start("127.0.0.1:0")
    try:
        rng = np.random.default_rng(0)
        x = rng.normal(size=(MAX_BATCH, INPUT_DIM)).astype("float32")
        y = np.eye(WIDE, dtype="float32")[rng.integers(0, WIDE, MAX_BATCH)]
        with SplitClient(build_bottom(), target=f"127.0.0.1:{port}", max_batch_size=MAX_BATCH) as client:
            client.fit(x, y, batch_size=MAX_BATCH, epochs=1, verbose=0)
            assert client.step == 1
    finally:
        server.stop(grace=1.0)
