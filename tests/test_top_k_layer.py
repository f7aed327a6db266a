"""Top-k inside a saved first part (splitlearning/top_k_layer.py): the `TopK` layer chooses, bit for bit, the
entries the client's own top-k sends (splitlearning/top_k.py), ties included; a first part saved after top-k
training holds it, so predicting with that file over the cut, or with the joined model, gives what the trained
client gives."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest

from client_part import SplitClient
from server_part import SplitServer
from splitlearning.approximations import Approximations
from splitlearning.checkpoint import save_model
from splitlearning.joined import join
from splitlearning.models import load_part
from splitlearning.top_k import keep_count, sparsify
from splitlearning.top_k_layer import TopK, with_top_k
from tests.conftest import StartServer, make_data, make_loss

NAMES = (("first.keras", "client"), ("second.keras", "server"))


def tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    normal = rng.normal(size=(64, 4, 5)).astype("float32")
    return {
        "normal": normal,
        "relu": np.maximum(normal, 0),  # many zeros: fewer than k entries are not zero in some rows
        "ties": rng.integers(-3, 4, size=(64, 20)).astype("float32"),  # magnitudes tie at the k-th
        "flat": rng.normal(size=(3, 1)).astype("float32"),  # one entry a row: k = 1 keeps it
        "float64": rng.normal(size=(16, 7)),  # chosen and kept in float64, by both
    }


@pytest.mark.parametrize("fraction", [0.05, 0.25, 0.5, 0.9])
@pytest.mark.parametrize("name", sorted(tensors()))
def test_the_layer_chooses_what_the_client_sends(name: str, fraction: float) -> None:
    tensor = tensors()[name]
    expected = sparsify(tensor, fraction)
    got = keras.ops.convert_to_numpy(TopK(fraction)(tensor))
    assert got.dtype == expected.dtype
    np.testing.assert_array_equal(got, expected)
    rows = expected.reshape(len(expected), -1)
    k = keep_count(fraction, rows.shape[1])
    for row, kept in zip(tensor.reshape(len(tensor), -1), rows, strict=True):
        kth = np.sort(np.abs(row))[-k]
        assert np.array_equal(kept != 0, (np.abs(row) >= kth) & (row != 0))  # the k largest, and ties with the k-th


def test_ties_with_the_kth_are_kept() -> None:
    row = np.array([[3.0, -3.0, 1.0, 3.0, 0.5]], np.float32)
    expected = np.array([[3.0, -3.0, 0.0, 3.0, 0.0]], np.float32)  # k = 1 of 5, three magnitudes tie at 3
    np.testing.assert_array_equal(sparsify(row, 0.2), expected)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(TopK(0.2)(row)), expected)


def test_a_part_saved_with_it_loads_and_gives_the_sparse_iv(tmp_path: Path) -> None:
    keras.utils.set_random_seed(2)
    part = keras.Sequential([keras.Input((6,)), keras.layers.Dense(12, activation="relu")], name="first")
    x = np.random.default_rng(1).normal(size=(32, 6)).astype("float32")
    chained = with_top_k(part, 0.25)
    assert chained.layers[1] is part.layers[0]  # the same layer and weights, not a copy
    save_model(tmp_path / "first.keras", chained)
    loaded = load_part(str(tmp_path / "first.keras"), "client", 0)()  # what `--model FILE` loads
    assert isinstance(loaded.layers[-1], TopK) and loaded.layers[-1].fraction == 0.25
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), sparsify(part.predict(x, verbose=0), 0.25))
    assert with_top_k(loaded, 0.25) is loaded  # a part that holds its top-k (trained on again) is saved as it is
    save_model(tmp_path / "again.keras", with_top_k(loaded, 0.1))  # another fraction: a second, named apart
    with pytest.raises(ValueError, match=r"a fraction in \(0, 1\)"):
        TopK(1.0)


def test_predicting_with_the_saved_part_gives_the_trained_clients_outputs(
    split_pair: StartServer, tmp_path: Path
) -> None:
    split = split_pair("plain", 3, optimizer=keras.optimizers.SGD(0.1), allow_approximations="top-k")
    x, y = make_data(n=48)
    asked = Approximations(top_k=0.4)
    with SplitClient(split.bottom, keras.optimizers.SGD(0.1), split.target, approximations=asked) as trained:
        trained.fit(x, y, batch_size=16, epochs=2, verbose=0)
        expected = trained.predict(x)  # the client sparsifies the IV itself
        assert trained.inference_model is not trained.model
        save_model(tmp_path / "first.keras", trained.inference_model)
        save_model(tmp_path / "second.keras", split.server.model)  # the first session's part: this client's
    first, second = (load_part(str(tmp_path / name), side, 0)() for name, side in NAMES)
    # The parts served as README's "After training" does; a client of the saved file asks for no top-k.
    served = SplitServer(second, make_loss(), keras.optimizers.SGD(0.1), ["accuracy"], serve_only=True)
    try:
        target = f"127.0.0.1:{served.start('127.0.0.1:0')}"
        with SplitClient(first, keras.optimizers.SGD(0.1), target) as predicting:
            assert predicting.inference_model is predicting.model
            np.testing.assert_array_equal(predicting.predict(x), expected)  # its part applies the top-k
    finally:
        served.stop(grace=1.0)
    joined = join([first, second])
    np.testing.assert_allclose(joined.predict(x, verbose=0), expected, rtol=1e-5, atol=1e-6)
