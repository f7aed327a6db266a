"""Micro-batch pipelining: one update per batch on both sides, equal to the unpipelined run."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from client_part import SplitClient
from client_part.transport import RemoteError, Transport
from splitlearning.contract import Spec
from tests.conftest import Split, StartServer, assert_same_snapshot, make_data, server_snapshot

RTOL, ATOL = 1e-5, 1e-6


def joined(split: Split, session: str = "") -> tuple[Transport, np.ndarray, np.ndarray]:
    """A raw transport that has joined `session` (naming none: a new one), with the IVs and labels of 8 samples."""
    x, y = make_data(n=8)
    iv = np.asarray(split.bottom(x), dtype="float32")
    transport = Transport(split.target, 1 << 20, rpc_timeout=10)
    try:
        transport.wait_ready(10)
        transport.handshake(Spec((iv.shape[1],), np.dtype("float32")), None, 8, session_id=session)
    except BaseException:
        transport.close()
        raise
    return transport, iv, y


def fit(split_pair: StartServer, kind: str, micro_batches: int) -> tuple[list[np.ndarray], dict[str, list[float]], int]:
    split = split_pair(kind, 11, optimizer=keras.optimizers.Adam(0.01))
    x, y = make_data(n=50)  # batches of 16, 16, 16 and 2: the last is smaller than some micro-batch counts
    client = SplitClient(
        split.bottom,
        keras.optimizers.Adam(0.01),
        target=split.target,
        connect_timeout=10,
        micro_batches=micro_batches,
    )
    with client:
        history = client.fit(x, y, batch_size=16, epochs=2, shuffle=True, seed=3, verbose=0)
        steps = client.step
    assert split.server.trainer.iterations == steps
    return [*split.bottom.get_weights(), *split.top.get_weights()], history.history, steps


@pytest.mark.parametrize("kind", ["plain", "regularized"])
@pytest.mark.parametrize("micro_batches", [3, 4])
def test_pipelined_weights_equal_unpipelined(split_pair: StartServer, kind: str, micro_batches: int) -> None:
    expected, expected_history, expected_steps = fit(split_pair, kind, 1)
    weights, history, steps = fit(split_pair, kind, micro_batches)
    assert steps == expected_steps == 8  # one update per batch, not per micro-batch
    for i, (a, e) in enumerate(zip(weights, expected, strict=True)):
        np.testing.assert_allclose(a, e, rtol=RTOL, atol=ATOL, err_msg=f"weights[{i}]")
    assert sorted(history) == sorted(expected_history)
    for key, values in expected_history.items():
        np.testing.assert_allclose(history[key], values, rtol=RTOL, err_msg=key)
    # And training did move the weights, so equality means something.
    initial = [*split_pair("plain", 11).bottom.get_weights()]
    assert not np.allclose(weights[0], initial[0])


@pytest.mark.parametrize(
    ("second", "fragment"),
    [
        ({"micro_batch": 0, "micro_batches": 2, "step_samples": 8}, "micro-batch 0 of step 0 is out of order"),  # 1 due
        ({"micro_batch": 1, "micro_batches": 3, "step_samples": 8}, "breaks the step's plan"),  # plan changed mid-step
        ({"micro_batch": 1, "micro_batches": 2, "step_samples": 12}, "breaks the step's plan"),  # shares don't add to 1
    ],
    ids=["out-of-order", "parts-changed", "samples-changed"],
)
def test_a_micro_batch_out_of_order_or_off_plan_is_refused_and_changes_nothing(
    split_pair: StartServer, second: dict[str, int], fragment: str
) -> None:
    split = split_pair("plain", 2)
    transport, iv, y = joined(split)
    try:
        before = server_snapshot(split.server)
        transport.send(0, iv[:4], y[:4], True, micro_batch=0, micro_batches=2, step_samples=8)
        transport.receive(0)
        transport.send(0, iv[4:], y[4:], False, **second)
        with pytest.raises(RemoteError, match=fragment) as refused:
            transport.receive(0)
        assert refused.value.code.name == "FAILED_PRECONDITION"
        # The dropped step leaves nothing behind: no weight, slot or step moved, and what its first micro-batch
        # added to the running metrics is taken back.
        assert_same_snapshot(before, server_snapshot(split.server))
    finally:
        transport.close()


def test_a_malformed_micro_batch_keeps_the_steps_partial_gradients(split_pair: StartServer) -> None:
    split = split_pair("plain", 2)
    transport, iv, y = joined(split)
    try:
        transport.send(0, iv[:4], y[:4], True, micro_batch=0, micro_batches=2, step_samples=8)
        transport.receive(0)
        transport.send(0, iv[4:], y[4:], False, micro_batch=5, micro_batches=2, step_samples=8)
        with pytest.raises(RemoteError, match=r"micro_batch 5 does not lie in \[0, 2\)") as refused:
            transport.receive(0)
        assert refused.value.code.name == "INVALID_ARGUMENT"
        # The step goes on from where it was: micro-batch 1 is still the one due, and completes the step.
        transport.send(0, iv[4:], y[4:], False, micro_batch=1, micro_batches=2, step_samples=8)
        transport.receive(0)
        assert split.server.session().next_step == 1 == split.server.trainer.iterations
    finally:
        transport.close()


def send_step(transport: Transport, iv: np.ndarray, y: np.ndarray) -> list[tuple[np.ndarray, list[float]]]:
    """Step 0 in two micro-batches of 4 samples; their answers."""
    answers = []
    for part in range(2):
        rows = slice(4 * part, 4 * part + 4)
        transport.send(0, iv[rows], y[rows], part == 0, micro_batch=part, micro_batches=2, step_samples=8)
        answers.append(transport.receive(0))
    return answers


def test_a_rejoining_client_starts_an_unfinished_step_over_and_a_finished_one_is_answered_again(
    split_pair: StartServer,
) -> None:
    split = split_pair("plain", 2)
    transport, iv, y = joined(split)
    before = server_snapshot(split.server)
    transport.send(0, iv[:4], y[:4], True, micro_batch=0, micro_batches=2, step_samples=8)
    transport.receive(0)
    transport.close()  # the stream is cut after the first micro-batch
    session = transport.session_id
    transport, _, _ = joined(split, session)  # the client rejoins: the unfinished step is dropped, as if never sent
    try:
        assert split.server.session().restarted == 1
        assert_same_snapshot(before, server_snapshot(split.server))
        answers = send_step(transport, iv, y)
        applied = server_snapshot(split.server)
        assert applied["next_step"] == 1 == applied["iterations"]
    finally:
        transport.close()  # the answers were lost: the client rejoins and sends the applied step again, whole
    transport, _, _ = joined(split, session)
    try:
        for (gradient, metrics), (first_gradient, first_metrics) in zip(
            send_step(transport, iv, y), answers, strict=True
        ):
            np.testing.assert_array_equal(gradient, first_gradient)
            assert metrics == first_metrics
        assert split.server.session().resent == 1
        assert_same_snapshot(applied, server_snapshot(split.server))  # answered from the replies: no second update
        transport.send(0, iv[:4], y[:4], True, micro_batch=0, micro_batches=4, step_samples=8)
        with pytest.raises(RemoteError, match="applied in 2 micro-batches and is resent in 4") as refused:
            transport.receive(0)
        assert refused.value.code.name == "FAILED_PRECONDITION"
    finally:
        transport.close()
