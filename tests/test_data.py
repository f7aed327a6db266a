"""Datasets and model pairs: the bundled digits, the user's .npz, the user's model function."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from splitlearning import data
from splitlearning.models import BUILTIN, load_part


def test_digits_ship_in_the_package_and_split_deterministically() -> None:
    first, second = data.load("digits", seed=0), data.load("digits", seed=0)
    assert first.x_train.shape == (1437, 8, 8, 1) and first.x_test.shape == (360, 8, 8, 1)
    assert first.x_train.dtype == np.float32 and first.x_train.min() >= 0.0 and first.x_train.max() <= 1.0
    assert set(np.unique(first.y_train)) == set(range(10))
    np.testing.assert_array_equal(first.x_test, second.x_test)
    assert not np.array_equal(data.load("digits", seed=1).y_test, first.y_test)


def test_npz_in_the_mnist_layout(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    path = tmp_path / "mnist.npz"
    np.savez(
        path,
        x_train=rng.integers(0, 256, (20, 28, 28), dtype=np.uint8),
        y_train=rng.integers(0, 10, 20, dtype=np.uint8),
        x_test=rng.integers(0, 256, (5, 28, 28), dtype=np.uint8),
        y_test=rng.integers(0, 10, 5, dtype=np.uint8),
    )
    loaded = data.load(str(path))
    assert loaded.x_train.shape == (20, 28, 28, 1) and loaded.x_train.dtype == np.float32
    assert loaded.x_train.max() <= 1.0 and loaded.y_train.dtype == np.int64


def test_npz_errors_name_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such file"):
        data.load(str(tmp_path / "missing.npz"))
    partial = tmp_path / "partial.npz"
    np.savez(partial, x_train=np.zeros((2, 3)), y_train=np.zeros(2))
    with pytest.raises(ValueError, match=r"missing arrays \['x_test', 'y_test'\]"):
        data.load(str(partial))


def test_builtin_pairs_meet_at_the_cut() -> None:
    for name, pair in BUILTIN.items():
        bottom, top = load_part(name, "client", 0)(), load_part(name, "server", 0)()
        assert bottom.outputs[0].shape[1:] == top.inputs[0].shape[1:], name
        assert pair.loss is not None


def test_user_model_function_and_bad_specs() -> None:
    build = load_part("splitlearning.models:_digits_mlp_client", "client", 4)
    assert build().name == "digits_mlp_client"
    with pytest.raises(ValueError, match=r"package\.module:function"):
        load_part("no-such-pair", "client", 0)
    with pytest.raises(ValueError, match="No module named"):
        load_part("no_such_module:f", "client", 0)
