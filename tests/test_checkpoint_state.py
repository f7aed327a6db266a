"""Rolling step checkpoints back rewrites TensorFlow's `checkpoint` state file itself: the same text format, the
same relative paths and timestamps, atomically, and without TensorFlow's deprecated writer (which logged a
deprecation warning on every rollback)."""

from __future__ import annotations

import logging
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from splitlearning.checkpoint import StepCheckpoints


def test_a_rollback_lists_only_the_kept_steps(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    weight = keras.Variable(0.0)
    checkpoints = StepCheckpoints(tmp_path, {"model": [weight]}, max_to_keep=5)
    for step in (1, 2, 3, 4):
        weight.assign(float(step))
        checkpoints.save(step)
    before = tf.train.get_checkpoint_state(str(tmp_path))

    with caplog.at_level(logging.WARNING):
        checkpoints.restore(2)
    assert "deprecat" not in caplog.text.lower()
    assert float(weight.numpy()) == 2.0
    assert checkpoints.steps() == [1, 2]

    text = (tmp_path / "checkpoint").read_text()
    assert 'model_checkpoint_path: "ckpt-2"' in text
    assert str(tmp_path) not in text, "relative paths: the folder may be mounted elsewhere"
    after = tf.train.get_checkpoint_state(str(tmp_path))
    assert list(after.all_model_checkpoint_timestamps) == list(before.all_model_checkpoint_timestamps)[:2]
    assert after.last_preserved_timestamp == before.last_preserved_timestamp
    assert not list(tmp_path.glob("ckpt-3.*")) and not list(tmp_path.glob(".checkpoint.tmp"))

    # A new manager (a restarted process) sees the same steps, and saving goes on from there.
    reopened = StepCheckpoints(tmp_path, {"model": [weight]}, max_to_keep=5)
    assert reopened.steps() == [1, 2]
    reopened.save(3)
    assert reopened.steps() == [1, 2, 3]


def test_an_optional_variable_is_saved_and_may_be_absent_from_an_earlier_checkpoint(tmp_path: Path) -> None:
    weight = keras.Variable(0.0)
    earlier = StepCheckpoints(tmp_path, {"model": [weight]}, max_to_keep=5)  # a version without the variable
    weight.assign(1.0)
    earlier.save(1)

    residual = tf.Variable(np.zeros((0,), np.float32), shape=tf.TensorShape(None), trainable=False)
    checkpoints = StepCheckpoints(tmp_path, {"model": [weight]}, max_to_keep=5, optional={"residual": residual})
    weight.assign(2.0)
    residual.assign(np.arange(6, dtype=np.float32).reshape(2, 3))  # any shape: it follows the batch
    checkpoints.save(2)

    weight.assign(0.0)
    residual.assign(np.zeros((0,), np.float32))
    checkpoints.restore(2)
    assert float(weight.numpy()) == 2.0 and checkpoints.absent == []
    np.testing.assert_array_equal(residual.numpy(), np.arange(6, dtype=np.float32).reshape(2, 3))

    residual.assign(np.full((1,), 7.0, np.float32))
    checkpoints.restore(1)  # written without it: the rest restores, the variable is left as it was
    assert float(weight.numpy()) == 1.0 and checkpoints.absent == ["residual"]
    np.testing.assert_array_equal(residual.numpy(), [7.0])
