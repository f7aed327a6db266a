"""`ClientTrainer` (the first part of a standard cut, a vertical feature party): a step whose exchange fails
changes nothing, so the step done again (after a retry, a rejoin) is the step as if it had never failed."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from splitlearning.training.first_part import ClientTrainer


def trainer() -> ClientTrainer:
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    return ClientTrainer(model, keras.optimizers.Adam(0.01, weight_decay=0.1), "/CPU:0")


def test_a_failed_exchange_changes_nothing_and_the_step_done_again_is_exact() -> None:
    x, labels = np.linspace(-1, 1, 12, dtype=np.float32).reshape(4, 3), np.zeros(4, np.int32)

    def gradient(iv: np.ndarray, _labels: np.ndarray) -> np.ndarray:
        return np.full_like(iv, 0.25)

    def gone(_iv: np.ndarray, _labels: np.ndarray) -> np.ndarray:
        raise ConnectionError("the label party went away")

    failing = trainer()
    before = [w.copy() for w in failing.model.get_weights()]
    failing.exchange_with(gone)
    for _ in range(3):
        with pytest.raises(ConnectionError):
            failing.train(x, labels)
    # Not the step count (Adam's bias correction reads it), not the weights (decay needs no gradient), nothing.
    assert failing.iterations == 0
    for a, b in zip(failing.model.get_weights(), before, strict=True):
        np.testing.assert_array_equal(a, b)
    failing.exchange_with(gradient)
    failing.train(x, labels)
    clean = trainer()
    clean.exchange_with(gradient)
    clean.train(x, labels)
    for a, b in zip(failing.model.get_weights(), clean.model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert failing.iterations == clean.iterations == 1
