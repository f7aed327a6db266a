"""One-step-stale gradients with weight stashing (docs/performance.md, "Beyond exact"): the client's weights follow
the stale rule exactly, two steps are really in flight, a broken stream loses and repeats nothing, and the
pipeline drains where the two sides must agree."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import grpc
import keras
import numpy as np
import pytest
import tensorflow as tf

from client_part import SplitClient
from client_part.retry import RetryPolicy
from client_part.transport import RemoteError
from server_part import session as server_session
from splitlearning.approximations import Approximations
from tests.conftest import StartServer, build_pair, make_data, make_loss
from tests.exactness_support import ROUNDOFF, assert_weights_equal
from tests.faults_support import CuttingProxy

BATCH = 16  # 50 samples: four steps an epoch, the last of 2
EPOCHS = 2
LR = 0.1
STALE = Approximations(stale_gradients=True)


def sgd() -> keras.optimizers.Optimizer:
    return keras.optimizers.SGD(learning_rate=LR)


def serve(split_pair: StartServer, seed: int = 7, **kwargs: Any) -> Any:
    return split_pair("plain", seed, optimizer=sgd(), allow_approximations="stale-gradients", **kwargs)


def fit(split: Any, target: str | None = None, stale: bool = True, **kwargs: Any) -> SplitClient:
    x, y = make_data()
    approximations = STALE if stale else Approximations()
    client = SplitClient(
        split.bottom, sgd(), target=target or split.target, connect_timeout=10, approximations=approximations, **kwargs
    )
    with client:
        client.fit(x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=False, verbose=0)
    return client


def copy_of(model: keras.Model) -> keras.Model:
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    return clone


def stale_reference(seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The stale rule on the uncut model, in this process, without gRPC: step s's forward runs on the weights that
    hold the updates of steps up to s-2; step s-1's gradient is taken at the weights its own forward used (a copy
    kept per step) and applied after step s's forward; the top trains exactly, in step order; each epoch's last
    step is applied before the next epoch begins."""
    bottom, top = build_pair("plain", seed)
    stashed = copy_of(bottom)  # holds the weights a pending step's forward ran on
    bottom_opt, top_opt, loss_fn = sgd(), sgd(), make_loss()
    x, y = make_data()

    def apply(pending: tuple[np.ndarray, list[np.ndarray], tf.Tensor]) -> None:
        xb, weights, grad_iv = pending
        stashed.set_weights(weights)
        with tf.GradientTape() as tape:
            iv = stashed(xb, training=True)
        grads = tape.gradient(iv, stashed.trainable_variables, output_gradients=grad_iv)
        bottom_opt.apply(grads, bottom.trainable_variables)

    for _ in range(EPOCHS):
        pending = None
        for begin in range(0, len(x), BATCH):
            xb, yb = x[begin : begin + BATCH], y[begin : begin + BATCH]
            weights = bottom.get_weights()
            iv = tf.constant(bottom(xb, training=True))
            with tf.GradientTape() as tape:  # the server's step, exact
                tape.watch(iv)
                loss = loss_fn(yb, top(iv, training=True))
            top_grads, grad_iv = tape.gradient(loss, [top.trainable_variables, iv])
            top_opt.apply(top_grads, top.trainable_variables)
            if pending is not None:
                apply(pending)
            pending = (xb, weights, grad_iv)
        assert pending is not None
        apply(pending)  # the epoch's end drains
    return bottom.get_weights(), top.get_weights()


def test_weights_follow_the_stale_rule_and_differ_from_exact(split_pair: StartServer) -> None:
    split = serve(split_pair)
    client = fit(split)
    expected_bottom, expected_top = stale_reference(7)
    assert client.step == EPOCHS * 4
    assert_weights_equal(client.model.get_weights(), expected_bottom, "bottom", exact=False)
    assert_weights_equal(split.server.model.get_weights(), expected_top, "top", exact=False)

    exact_split = serve(split_pair)
    exact = fit(exact_split, stale=False)
    differences = [
        float(np.max(np.abs(a - b))) for a, b in zip(exact.model.get_weights(), client.model.get_weights(), strict=True)
    ]
    # Staleness moves the weights by order learning rate x gradient, far beyond round-off.
    assert max(differences) > 100 * ROUNDOFF, differences


@pytest.mark.parametrize("stale", [True, False])
def test_the_next_step_reaches_the_server_before_the_last_reply_is_read(
    split_pair: StartServer, monkeypatch: pytest.MonkeyPatch, stale: bool
) -> None:
    """Each reply is read 0.2 s late; with stale gradients the server meanwhile gets the next step (its request is
    already on the stream), without them it cannot. Step 0 is left out: the server compiles its update after
    answering it, which may take longer than the delay."""
    events: list[tuple[str, int]] = []
    original_train = server_session.Session.train

    def server_train(self: Any, client_id: str, step: int, *args: Any) -> Any:
        events.append(("server", step))
        return original_train(self, client_id, step, *args)

    monkeypatch.setattr(server_session.Session, "train", server_train)
    split = serve(split_pair)
    x, y = make_data(n=5 * BATCH)
    with SplitClient(
        split.bottom,
        sgd(),
        target=split.target,
        connect_timeout=10,
        approximations=STALE if stale else Approximations(),
    ) as client:
        transport = client._transport
        receive = transport.receive

        def late_receive(step: int) -> Any:
            time.sleep(0.2)
            answer = receive(step)
            events.append(("read", step))
            return answer

        monkeypatch.setattr(transport, "receive", late_receive)
        client.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
        assert client.step == 5
    for step in range(1, 4):
        ahead = events.index(("server", step + 1)) < events.index(("read", step))
        assert ahead == stale, events


def test_a_broken_stream_loses_and_repeats_nothing(split_pair: StartServer) -> None:
    undisturbed = fit(serve(split_pair))
    split = serve(split_pair)
    proxy = CuttingProxy(split.port, cut_every=1500)  # replies lost, with two steps in flight, several times
    try:
        policy = RetryPolicy(timeout=60.0, initial=0.01, maximum=0.05)
        client = fit(split, target=f"127.0.0.1:{proxy.port}", retry=policy)
    finally:
        proxy.close()
    assert proxy.cuts >= 2
    assert client.step == split.server.session().next_step == EPOCHS * 4
    assert split.server.trainer.iterations == EPOCHS * 4
    assert_weights_equal(client.model.get_weights(), undisturbed.model.get_weights(), "bottom", exact=True)


def test_the_pipeline_drains_at_checkpoints_and_epoch_ends(split_pair: StartServer, tmp_path: Path) -> None:
    split = serve(split_pair)
    x, y = make_data()
    with SplitClient(
        split.bottom,
        sgd(),
        target=split.target,
        connect_timeout=10,
        approximations=STALE,
        checkpoint_dir=tmp_path,
        checkpoint_every=3,
    ) as client:
        ends: list[tuple[int, int]] = []

        class AtEpochEnd(keras.callbacks.Callback):
            def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
                ends.append((client.step, split.server.session().next_step))

        history = client.fit(x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=False, verbose=0, callbacks=[AtEpochEnd()])
        assert ends == [(4, 4), (8, 8)]
        assert client.step == split.server.session().next_step == EPOCHS * 4
        assert client.trainer.in_flight == 0
        assert client.checkpoints is not None
        assert {3, 6, 8} <= set(client.checkpoints.steps())
        assert len(history.history["loss"]) == EPOCHS
        metrics = client.evaluate(x, y, batch_size=BATCH)
        assert np.isfinite(metrics["loss"])


def test_refusals(split_pair: StartServer) -> None:
    split = split_pair("plain", 7, optimizer=sgd())  # allows no approximation
    with pytest.raises(RemoteError) as refused:
        SplitClient(split.bottom, sgd(), target=split.target, connect_timeout=10, approximations=STALE).connect()
    assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "stale-gradients" in str(refused.value)
    with pytest.raises(ValueError, match="micro-batches"):
        SplitClient(split.bottom, sgd(), target=split.target, approximations=STALE, micro_batches=2)
    with pytest.raises(ValueError, match="NoPeek"):
        SplitClient(split.bottom, sgd(), target=split.target, approximations=STALE, nopeek_alpha=0.5)
