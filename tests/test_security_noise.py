"""Gaussian noise on the IV: clipping, the noise's scale, where it applies, and the gradient's path back."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from client_part import SplitClient
from client_part.cli import parse_args
from client_part.privacy import GaussianNoise, NoisyLink, clip, member_seed
from server_part import SplitServer
from splitlearning.training.first_part import ClientTrainer
from tests.conftest import CUT_DIM, build_bottom, build_top, make_data, make_loss


class Capture:
    """A `Link` that keeps the IVs it is given and answers a fixed gradient."""

    def __init__(self, gradient: np.ndarray | None = None) -> None:
        self.ivs: list[np.ndarray] = []
        self.steps: list[int | None] = []  # the client's step that evaluate and predict pass on
        self.gradient = gradient

    def train(self, step: int, iv: np.ndarray, labels: np.ndarray, reset: bool) -> tuple[np.ndarray, list[float]]:
        self.ivs.append(np.array(iv))
        return (self.gradient if self.gradient is not None else np.zeros_like(iv)), [0.0]

    def evaluate(self, iv: np.ndarray, labels: np.ndarray, reset: bool, step: int | None = None) -> list[float]:
        self.ivs.append(np.array(iv))
        self.steps.append(step)
        return [0.0]

    def predict(self, iv: np.ndarray, step: int | None = None) -> np.ndarray:
        self.ivs.append(np.array(iv))
        self.steps.append(step)
        return iv


def test_clipping_bounds_each_sample_and_keeps_short_ones() -> None:
    iv = np.array([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]], "float32")  # norms 5, 0.5, 0
    clipped = clip(iv, 1.0)
    np.testing.assert_allclose(np.linalg.norm(clipped, axis=1), [1.0, 0.5, 0.0], rtol=1e-6)
    np.testing.assert_allclose(clipped[0], [0.6, 0.8], rtol=1e-6)  # direction kept
    np.testing.assert_array_equal(clipped[1:], iv[1:])
    assert clipped.dtype == iv.dtype


def test_clipping_covers_all_dimensions_of_a_sample() -> None:
    iv = np.ones((2, 4, 4, 2), "float32")  # each sample: 32 ones, norm sqrt(32)
    clipped = clip(iv, 2.0)
    np.testing.assert_allclose(np.linalg.norm(clipped.reshape(2, -1), axis=1), [2.0, 2.0], rtol=1e-6)


def test_noise_has_the_promised_scale_and_is_seeded() -> None:
    noise = GaussianNoise(clip_norm=2.0, noise_multiplier=0.5, seed=1)
    zeros = np.zeros((4000, 25), "float32")
    sent = NoisyLink(Capture(), noise).privatize(zeros)
    assert sent.dtype == zeros.dtype
    assert abs(float(sent.mean())) < 0.01
    np.testing.assert_allclose(float(sent.std()), 1.0, rtol=0.01)  # 0.5 * 2.0, from 100,000 draws
    np.testing.assert_array_equal(sent, NoisyLink(Capture(), noise).privatize(zeros))  # same seed, same noise


def test_every_iv_that_leaves_is_privatized() -> None:
    capture = Capture()
    link = NoisyLink(capture, GaussianNoise(clip_norm=0.5, noise_multiplier=0.0))
    iv = np.full((3, 4), 10.0, "float32")
    link.train(0, iv, np.zeros(3), True)
    link.evaluate(iv, np.zeros(3), True, 7)
    link.predict(iv, 7)
    assert len(capture.ivs) == 3
    assert capture.steps == [7, 7]  # the step the server checks passes through unchanged
    for sent in capture.ivs:
        np.testing.assert_allclose(np.linalg.norm(sent, axis=1), 0.5, rtol=1e-6)


def test_the_gradient_is_applied_to_the_un_noised_forward() -> None:
    """The server's gradient (taken at the noisy IV) back-propagates through the client's clean forward."""
    x, y = make_data(n=8)
    rng = np.random.default_rng(0)
    gradient = rng.normal(size=(8, CUT_DIM)).astype("float32")
    capture = Capture(gradient)
    link = NoisyLink(capture, GaussianNoise(clip_norm=0.1, noise_multiplier=2.0, seed=3))
    trainer = ClientTrainer(
        build_bottom(seed=5), keras.optimizers.SGD(0.5), "/CPU:0", lambda iv, lb: link.train(0, iv, lb, False)[0]
    )
    reference = build_bottom(seed=5)
    with tf.GradientTape() as tape:
        clean = reference(x, training=True)
    expected_grads = tape.gradient(clean, reference.trainable_variables, output_gradients=gradient)
    expected = [w.numpy() - 0.5 * g.numpy() for w, g in zip(reference.trainable_variables, expected_grads, strict=True)]

    trainer.train(x, y)

    sent = capture.ivs[0]
    assert not np.allclose(sent, clean.numpy(), atol=0.05)  # what left was noised ...
    for actual, wanted in zip(trainer.model.trainable_variables, expected, strict=True):  # ... what came back was
        np.testing.assert_allclose(actual.numpy(), wanted, rtol=1e-5, atol=1e-6)  # applied to the clean IV


def test_split_training_with_noise_over_grpc() -> None:
    x, y = make_data(n=64)
    server = SplitServer(build_top(seed=2), make_loss(), "sgd", ["accuracy"])
    target = f"127.0.0.1:{server.start('127.0.0.1:0')}"
    noise = GaussianNoise(clip_norm=1.0, noise_multiplier=0.1, seed=0)
    try:
        with SplitClient(build_bottom(seed=2), "sgd", target=target, noise=noise, connect_timeout=10) as client:
            history = client.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
            assert client.step == 8
    finally:
        server.stop(grace=1.0)
    assert all(np.isfinite(history.history["loss"]))
    assert server.trainer.iterations == 8


def test_noise_options_are_checked() -> None:
    with pytest.raises(ValueError, match="clip norm"):
        GaussianNoise(clip_norm=0.0)
    with pytest.raises(ValueError, match="noise multiplier"):
        GaussianNoise(clip_norm=1.0, noise_multiplier=-1.0)
    config = parse_args(["--clip-norm", "1.5", "--noise-multiplier", "0.8"])
    assert (config.clip_norm, config.noise_multiplier) == (1.5, 0.8)


def test_members_of_a_group_started_with_one_seed_add_different_noise() -> None:
    """Each member's noise stream is its own: the same --seed on every member must not give the same noise."""
    iv = np.zeros((64, CUT_DIM), np.float32)
    seeds = [member_seed(0, member) for member in (1, 2, 3)]
    assert len(set(seeds)) == 3 and member_seed(0, None) == 0 and member_seed(0, 2) == seeds[1]
    noised = [NoisyLink(Capture(), GaussianNoise(1.0, 1.0, seed)).privatize(iv) for seed in seeds]
    for a, b in ((0, 1), (0, 2), (1, 2)):
        assert not np.allclose(noised[a], noised[b]), (a, b)
