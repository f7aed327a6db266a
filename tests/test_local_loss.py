"""The local auxiliary loss on the client (Han et al., 2021) against a real server: both halves equal an in-process
reference, replies carry no gradient and are not waited for, a broken stream loses and repeats nothing, and the
refusals."""

from __future__ import annotations

from typing import Any

import grpc
import keras
import numpy as np
import pytest
import tensorflow as tf

from client_part import SplitClient
from client_part.retry import RetryPolicy
from client_part.transport import RemoteError
from splitlearning.approximations import Approximations
from splitlearning.v1 import split_learning_pb2 as pb
from tests.conftest import CUT_DIM, NUM_CLASSES, StartServer, build_pair, make_data, make_loss
from tests.faults_support import CuttingProxy, assert_weights_close
from tests.raw_support import connect, handshake

LOCAL = Approximations(local_loss=True)
FAST_RETRY = RetryPolicy(timeout=30.0, initial=0.01, maximum=0.2)
BATCH = 4
SAMPLES = 48  # 12 steps an epoch: more than the window of 8


def make_head(seed: int = 7) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((CUT_DIM,)), keras.layers.Flatten(), keras.layers.Dense(NUM_CLASSES)])


def local_client(target: str, bottom: keras.Model, optimizer: Any = "adam", **kwargs: Any) -> SplitClient:
    kwargs.setdefault("local_head", make_head())
    return SplitClient(
        bottom, optimizer, target=target, approximations=LOCAL, max_batch_size=16, retry=FAST_RETRY, **kwargs
    )


def references(seed: int, x: np.ndarray, y: np.ndarray, epochs: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Plain Keras: the bottom and its head trained on the local loss alone, one Adam over both; then the top
    trained (Adam, as the server's) on the IVs that bottom sent, each from the weights before its step's update."""
    bottom, top = build_pair("plain", seed)
    head = make_head()
    optimizer = keras.optimizers.Adam()
    loss_fn = make_loss()
    ivs = []
    for _ in range(epochs):
        for begin in range(0, len(x), BATCH):
            xb, yb = x[begin : begin + BATCH], y[begin : begin + BATCH]
            variables = [*bottom.trainable_variables, *head.trainable_variables]
            with tf.GradientTape() as tape:
                iv = bottom(xb, training=True)
                loss = loss_fn(yb, head(iv, training=True))
            ivs.append((iv.numpy(), yb))
            optimizer.apply(tape.gradient(loss, variables), variables)
    top_optimizer = keras.optimizers.Adam()
    for iv, yb in ivs:
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, top(iv, training=True))
        top_optimizer.apply(tape.gradient(loss, top.trainable_variables), top.trainable_variables)
    return [*bottom.get_weights(), *head.get_weights()], top.get_weights()


def client_weights(client: SplitClient) -> list[np.ndarray]:
    assert client.local_head is not None
    return [*client.model.get_weights(), *client.local_head.get_weights()]


def test_both_halves_equal_their_references(split_pair: StartServer) -> None:
    split = split_pair("plain", 3, optimizer="adam", allow_approximations="local-loss")
    x, y = make_data(SAMPLES)
    with local_client(split.target, split.bottom) as client:
        history = client.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
        assert client.step == split.server.session().next_step == 2 * SAMPLES // BATCH
        ours, theirs = client_weights(client), split.server.model.get_weights()
    expected_client, expected_server = references(3, x, y, epochs=2)
    assert_weights_close(ours, expected_client, "client part and local head")
    assert_weights_close(theirs, expected_server, "server part")
    assert set(history.history) >= {"loss", "accuracy", "local_loss"}
    assert all(np.isfinite(history.history["local_loss"]))


def test_replies_carry_no_gradient_and_are_not_waited_for(split_pair: StartServer) -> None:
    split = split_pair("plain", 0, optimizer="adam", allow_approximations="local-loss")
    x, y = make_data(SAMPLES)
    with local_client(split.target, split.bottom) as client:
        transport: Any = client._transport
        receive = transport._receive
        replies: list[pb.TrainResponse] = []
        unanswered_at_read: list[int] = []

        def recording(what: str) -> Any:
            unanswered_at_read.append(client._window.in_flight if client._window else -1)
            reply = receive(what)
            replies.append(reply.message)
            return reply

        transport._receive = recording
        client.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    steps = SAMPLES // BATCH
    assert len(replies) == steps
    assert all(not reply.HasField("iv_gradient") for reply in replies)
    assert all(len(reply.metrics) == 2 for reply in replies)
    assert [reply.step for reply in replies] == list(range(steps))
    # The client ran 8 steps (the window) ahead before it read the first reply, and read the rest as it went.
    assert unanswered_at_read[0] == 8
    assert client._window is not None and client._window.first_read_after == 8


def test_a_broken_stream_loses_and_repeats_nothing(split_pair: StartServer) -> None:
    x, y = make_data(SAMPLES)
    calm = split_pair("plain", 4, optimizer="adam", allow_approximations="local-loss")
    with local_client(calm.target, calm.bottom) as client:
        client.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
        expected_client, expected_server = client_weights(client), calm.server.model.get_weights()

    split = split_pair("plain", 4, optimizer="adam", allow_approximations="local-loss")
    proxy = CuttingProxy(split.port)
    try:
        with local_client(f"127.0.0.1:{proxy.port}", split.bottom) as client:
            transport: Any = client._transport
            send = transport.send
            cut: list[int] = []

            def breaking(step: int, *args: Any) -> None:
                send(step, *args)
                if step in (5, 17) and step not in cut:  # mid-window: requests in flight die with the connection
                    cut.append(step)
                    proxy.cut()

            transport.send = breaking
            client.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
            assert cut == [5, 17]
            steps = 2 * SAMPLES // BATCH
            assert client.step == split.server.session().next_step == steps
            assert split.server.trainer.iterations == steps, "a step was applied twice on the server"
            assert client.trainer.iterations == steps
            assert_weights_close(client_weights(client), expected_client, "client part after the cuts")
            assert_weights_close(split.server.model.get_weights(), expected_server, "server part after the cuts")
    finally:
        proxy.close()


def test_after_fit_both_agree_and_evaluate_and_predict_work(split_pair: StartServer) -> None:
    split = split_pair("plain", 1, optimizer="adam", allow_approximations="local-loss")
    x, y = make_data(SAMPLES - 2)  # a smaller last batch
    with local_client(split.target, split.bottom, local_head=None) as client:  # the default head, from the labels
        client.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
        assert client.local_head is not None and client.local_head.output_shape == (None, NUM_CLASSES)
        assert client.step == split.server.session().next_step == 12
        scores = client.evaluate(x, y, batch_size=8)
        assert set(scores) == {"loss", "accuracy"} and np.isfinite(scores["loss"])
        outputs = client.predict(x, batch_size=8)
        expected = split.server.model(client.model(x, training=False), training=False).numpy()
        np.testing.assert_allclose(outputs, expected, rtol=1e-5, atol=1e-6)
        client.fit(x, y, batch_size=BATCH, epochs=2, initial_epoch=1, verbose=0)  # fit again after evaluate
        assert client.step == split.server.session().next_step == 24


def test_a_server_that_does_not_allow_it_refuses(split_pair: StartServer) -> None:
    split = split_pair("plain", 0, optimizer="adam", allow_approximations="top-k")
    client = local_client(split.target, split.bottom)
    try:
        with pytest.raises(RemoteError) as refused:
            client.connect()
        assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "local-loss" in refused.value.details
    finally:
        client.close()


def test_local_loss_with_stale_gradients_is_refused(split_pair: StartServer) -> None:
    with pytest.raises(ValueError, match="stale gradients and a local loss"):
        Approximations(stale_gradients=True, local_loss=True)
    split = split_pair("plain", 0, optimizer="adam", allow_approximations="all")
    channel, stub = connect(split.target)
    with channel, pytest.raises(grpc.RpcError) as refused:
        handshake(stub, approximations=pb.Approximations(stale_gradients=True, local_loss=True))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "local loss" in (refused.value.details() or "")


def test_local_loss_with_micro_batches_is_a_value_error() -> None:
    bottom, _ = build_pair("plain", 0)
    with pytest.raises(ValueError, match="micro-batches"):
        SplitClient(bottom, "adam", approximations=LOCAL, micro_batches=2)
    with pytest.raises(ValueError, match="local loss"):
        SplitClient(bottom, "adam", local_classes=3)
