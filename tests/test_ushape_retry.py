"""U-shape: a step whose backward exchange fails is retried without updating the client's head twice, and one
whose answers were lost after the middle's update is answered again without a second update."""

from __future__ import annotations

from typing import Any

import grpc
import numpy as np

from client_part import RemoteError, SplitClient
from client_part.retry import RetryPolicy
from server_part import SplitServer
from server_part.middle_trainer import MiddleTrainer
from server_part.session import Limits, Session
from tests.conftest import CUT_DIM, build_bottom, make_data, make_loss
from tests.faults_support import CuttingProxy, assert_weights_close
from tests.ushape_support import MIDDLE_DIM, build_head, build_middle


def ushape_client(target: str, optimizer: str) -> SplitClient:
    """A seeded U-shape client (bottom and head) that retries quickly."""
    return SplitClient(
        build_bottom("plain", 0),
        optimizer,
        target=target,
        head=build_head(0),
        loss=make_loss(),
        metrics=["accuracy"],
        max_batch_size=16,
        retry=RetryPolicy(timeout=30, initial=0.01, maximum=0.2),
        rpc_timeout=10,
    )


def test_a_retried_step_updates_the_head_once() -> None:
    server = SplitServer(build_middle("plain", 0), optimizer="sgd", cut="ushape", max_batch_size=16)
    port = server.start("127.0.0.1:0")
    client = ushape_client(f"127.0.0.1:{port}", "sgd")
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
    state = Session("s", middle, Limits(8))
    before = [v.numpy().copy() for v in middle.model.variables]
    iv = np.random.default_rng(0).normal(size=(4, CUT_DIM)).astype("float32")
    half = state.begin_step("c", 0, iv)
    assert any(not np.array_equal(b, v.numpy()) for b, v in zip(before, middle.model.variables, strict=True))
    state.abandon(half)
    for b, v in zip(before, middle.model.variables, strict=True):
        np.testing.assert_array_equal(b, v.numpy())
    assert middle.iterations == 0 and state.next_step == 0
    state.finish_step("c", state.begin_step("c", 0, iv), 0, np.ones((4, MIDDLE_DIM), "float32"))
    assert middle.iterations == 1 and state.next_step == 1


def train_ushape_through_proxy(cut_every: int | None) -> tuple[SplitClient, SplitServer, CuttingProxy]:
    """A fresh seeded U-shaped model trained for 3 epochs, the client reaching the middle through a proxy that
    drops an answer and cuts the connection every `cut_every` bytes of answers (never with None)."""
    server = SplitServer(build_middle("plain", 0), optimizer="adam", cut="ushape", max_batch_size=16)
    proxy = CuttingProxy(server.start("127.0.0.1:0"), cut_every)
    client = ushape_client(f"127.0.0.1:{proxy.port}", "adam")
    try:
        x, y = make_data(40)
        client.fit(x, y, batch_size=4, epochs=3, shuffle=True, seed=1, verbose=0)
    finally:
        client.close()
        proxy.close()
        server.stop(grace=1.0)
    return client, server, proxy


def test_a_ushape_step_whose_answers_were_lost_after_its_update_is_answered_again() -> None:
    plain, plain_server, _ = train_ushape_through_proxy(None)
    cut, cut_server, proxy = train_ushape_through_proxy(900)
    assert proxy.cuts >= 3, "the proxy never cut: this test proved nothing"
    assert cut_server.session().resent >= 1, "no answer was lost after its step was applied"
    assert cut.step == cut_server.trainer.iterations == plain_server.trainer.iterations == 30
    assert cut.head is not None and plain.head is not None
    assert cut.head.iterations == plain.head.iterations == 30  # (reading it applies each head's last update)
    assert_weights_close(cut.model.get_weights(), plain.model.get_weights(), "bottom")
    assert_weights_close(cut_server.model.get_weights(), plain_server.model.get_weights(), "middle")
    assert_weights_close(cut.head.model.get_weights(), plain.head.model.get_weights(), "head")
