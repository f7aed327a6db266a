"""U-shape: a step whose backward exchange fails is retried without updating the client's head twice."""

from __future__ import annotations

from typing import Any

import grpc
import numpy as np

from client_part import RemoteError, SplitClient
from client_part.retry import RetryPolicy
from server_part import SplitServer
from server_part.middle_trainer import MiddleTrainer
from server_part.state import TrainingState
from tests.conftest import CUT_DIM, build_bottom, make_data, make_loss
from tests.ushape_support import MIDDLE_DIM, build_head, build_middle


def test_a_retried_step_updates_the_head_once() -> None:
    server = SplitServer(build_middle("plain", 0), optimizer="sgd", cut="ushape", max_batch_size=16)
    port = server.start("127.0.0.1:0")
    client = SplitClient(
        build_bottom("plain", 0),
        "sgd",
        target=f"127.0.0.1:{port}",
        head=build_head(0),
        loss=make_loss(),
        metrics=["accuracy"],
        max_batch_size=16,
        retry=RetryPolicy(timeout=20, initial=0.01, maximum=0.1),
    )
    try:
        client.connect()
        transport: Any = client._transport
        backward = transport.train_backward
        failures: list[int] = []

        def flaky(step: int, gradient: Any) -> Any:  # the backward of step 1 is lost once, with its stream
            if step == 1 and not failures:
                failures.append(step)
                transport._close_stream()
                raise RemoteError(f"step {step} (backward)", code=grpc.StatusCode.UNAVAILABLE, details="injected")
            return backward(step, gradient)

        transport.train_backward = flaky
        x, y = make_data(48)
        client.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
        assert failures == [1]
        assert client.step == client.trainer.iterations == server.trainer.iterations == 3
        assert client.head is not None and client.head.iterations == 3, "the retried step updated the head twice"
    finally:
        client.close()
        server.stop(grace=1.0)


def test_an_abandoned_forward_is_undone() -> None:
    # A stream cut between a step's forward and its backward: the step runs again later, so the first forward
    # must leave nothing behind, not even BatchNormalization's moving statistics.
    middle = MiddleTrainer(build_middle("batchnorm", 0), "sgd")
    state = TrainingState(middle, 8)
    before = [v.numpy().copy() for v in middle.model.variables]
    iv = np.random.default_rng(0).normal(size=(4, CUT_DIM)).astype("float32")
    half = state.begin_step(state.session_id, 0, iv)
    assert any(not np.array_equal(b, v.numpy()) for b, v in zip(before, middle.model.variables, strict=True))
    state.abandon(half)
    for b, v in zip(before, middle.model.variables, strict=True):
        np.testing.assert_array_equal(b, v.numpy())
    assert middle.iterations == 0 and state.next_step == 0
    state.finish_step(
        state.begin_step(state.session_id, 0, iv), state.session_id, 0, np.ones((4, MIDDLE_DIM), "float32")
    )
    assert middle.iterations == 1 and state.next_step == 1
