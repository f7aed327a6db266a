"""Reply first, update after: the server answers a step before its optimizer update runs, and nothing that
reads the weights (the next step, evaluate, predict, a checkpoint, `SplitServer.model`) ever sees the step
half applied."""

from __future__ import annotations

import queue
import threading
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from server_part import SplitServer
from server_part.checkpoints import ServerCheckpoints
from splitlearning.training.loss_trainer import LossTrainer
from tests.conftest import CUT_DIM, build_top, make_loss
from tests.raw_support import connect, handshake, train_request


def _trainer(seed: int = 3) -> LossTrainer:
    return LossTrainer(build_top("plain", seed), make_loss(), "adam", ["accuracy"])


def _batch(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(4, CUT_DIM)).astype("float32"), rng.integers(0, 3, 4).astype("int64")


def _raw_iterations(trainer: LossTrainer) -> int:
    return int(trainer.optimizer.iterations.numpy())  # the variable itself: no settling


def test_train_leaves_the_update_pending_until_settle() -> None:
    trainer = _trainer()
    before = [w.copy() for w in trainer.model.get_weights()]
    trainer.train(*_batch(0), reset_metrics=True)
    assert _raw_iterations(trainer) == 0
    assert all(np.array_equal(a, b) for a, b in zip(before, trainer.model.get_weights(), strict=True))
    assert trainer.settle() is True
    assert _raw_iterations(trainer) == 1
    assert trainer.settle() is False  # applied once only
    assert not all(np.array_equal(a, b) for a, b in zip(before, trainer.model.get_weights(), strict=True))


def test_every_reader_of_the_weights_settles_first(tmp_path: Path) -> None:
    x, y = _batch(1)
    reference = _trainer()
    reference.train(x, y, reset_metrics=True)
    reference.settle()
    expected = reference.predict(x)

    for read in ("predict", "evaluate", "iterations", "train", "checkpoint"):
        trainer = _trainer()
        trainer.train(x, y, reset_metrics=True)
        if read == "predict":
            np.testing.assert_allclose(trainer.predict(x), expected, rtol=1e-6)
        elif read == "evaluate":
            trainer.evaluate(x, y, reset_metrics=True)
            assert _raw_iterations(trainer) == 1
        elif read == "iterations":
            assert trainer.iterations == 1
        elif read == "train":  # the next step computes its gradients on the updated weights
            trainer.train(x, y, reset_metrics=False)
            assert _raw_iterations(trainer) == 1
        else:
            ServerCheckpoints(tmp_path / read, trainer, every=1).after_step(1)
            restored = _trainer()
            ServerCheckpoints(tmp_path / read, restored, every=1).restore(1)
            np.testing.assert_allclose(restored.predict(x), expected, rtol=1e-6)
        if read != "train":
            np.testing.assert_allclose(trainer.predict(x), expected, rtol=1e-6)


def test_the_reply_does_not_wait_for_the_update_and_the_next_step_does() -> None:
    server = SplitServer(build_top("plain", 5), make_loss(), "adam", ["accuracy"])
    port = server.start("127.0.0.1:0")
    trainer = server.trainer
    assert isinstance(trainer, LossTrainer)
    release, started = threading.Event(), threading.Event()
    apply = trainer._apply_fn

    def held_apply(*grads: tf.Tensor) -> None:
        started.set()
        assert release.wait(timeout=30), "the test never released the update"
        apply(*grads)

    trainer._apply_fn = held_apply
    try:
        channel, stub = connect(f"127.0.0.1:{port}")
        with channel:
            session = handshake(stub, client_id="a").session_id
            requests: queue.SimpleQueue[object] = queue.SimpleQueue()
            replies = stub.Train(iter(requests.get, None), timeout=30)
            requests.put(train_request(session, 0, seed=0))
            first = next(replies)  # arrives although step 0's update is held
            assert first.step == 0
            assert started.wait(timeout=10)
            assert _raw_iterations(trainer) == 0
            requests.put(train_request(session, 1, seed=1))
            second: list[object] = []
            reader = threading.Thread(target=lambda: second.append(next(replies)))
            reader.start()
            reader.join(timeout=0.5)
            assert not second, "step 1 was answered before step 0's update was applied"
            release.set()
            reader.join(timeout=10)
            assert second and second[0].step == 1  # type: ignore[attr-defined]
            requests.put(None)
        assert server.trainer.iterations == 2
    finally:
        release.set()
        server.stop(grace=1.0)


def test_a_failed_update_refuses_everything_after_it() -> None:
    trainer = _trainer()
    x, y = _batch(2)
    trainer.train(x, y, reset_metrics=True)

    def broken(*grads: tf.Tensor) -> None:
        raise tf.errors.ResourceExhaustedError(None, None, "out of memory")

    trainer._apply_fn = broken
    with pytest.raises(RuntimeError, match="restart it from a checkpoint"):
        trainer.settle()
    for call in (lambda: trainer.train(x, y, reset_metrics=False), lambda: trainer.predict(x), trainer.settle):
        with pytest.raises(RuntimeError, match="update of an answered step failed"):
            call()
