"""TensorBoard event files from both sides: read back, sane, and lined up by step."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from client_part import SplitClient
from client_part.tensorboard_log import TensorBoardLogger
from splitlearning.events import ScalarWriter, read_scalars
from tests.conftest import StartServer, make_data

BATCH = 16
EPOCHS = 2
STEPS_PER_EPOCH = 4  # 50 samples in batches of 16


def train(split_pair: StartServer, log_dir: Path, log_every: int) -> tuple[dict, dict, SplitClient, dict]:
    split = split_pair("plain", 5, log_dir=log_dir, log_every=log_every)
    x, y = make_data()
    x_val, y_val = make_data(n=20, seed=9)
    with SplitClient(split.bottom, "sgd", target=split.target, connect_timeout=10) as client:
        logger = TensorBoardLogger(client, log_dir, log_every)
        history = client.fit(
            x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=False, validation_data=(x_val, y_val),
            verbose=0, callbacks=[logger],
        )  # fmt: skip
        logger.close()
    split.server.stop(grace=1)  # closes the server's event file
    # The server's run is the session's own.
    server_run = log_dir / "server" / client.session_id
    return read_scalars(log_dir / "client"), read_scalars(server_run), client, history.history


def steps(series: list[tuple[int, float]]) -> list[int]:
    return [step for step, _ in series]


def values(series: list[tuple[int, float]]) -> np.ndarray:
    return np.array([v for _, v in series])


def test_both_runs_hold_sane_scalars_that_line_up_by_step(split_pair: StartServer, tmp_path: Path) -> None:
    client_run, server_run, client, history = train(split_pair, tmp_path, log_every=1)
    every_step = list(range(1, EPOCHS * STEPS_PER_EPOCH + 1))
    for tag in ("step/loss", "step/accuracy", "time/step_ms", "time/compute_ms", "bytes/sent", "bytes/received"):
        assert steps(client_run[tag]) == every_step, tag
        assert steps(server_run[tag]) == every_step, tag
        assert all(math.isfinite(v) and v >= 0 for v in values(client_run[tag])), tag
    assert steps(client_run["time/network_ms"]) == every_step
    assert steps(server_run["time/wait_ms"]) == every_step[1:]  # no wait before the first request

    # The same numbers on both sides of the wire, at the same steps.
    np.testing.assert_allclose(values(client_run["step/loss"]), values(server_run["step/loss"]), rtol=1e-6)
    np.testing.assert_array_equal(values(client_run["bytes/sent"]), values(server_run["bytes/received"]))
    np.testing.assert_array_equal(values(client_run["bytes/received"]), values(server_run["bytes/sent"]))
    # At least the raw tensors: a float32 IV of 5 values and an int64 label per sample (batches of 16, 16, 16, 2).
    samples = np.array([16, 16, 16, 2] * EPOCHS)
    payload = samples * (5 * 4 + 8)
    assert (values(client_run["bytes/sent"]) >= payload).all()
    assert (values(client_run["bytes/sent"]) < payload + 200).all()  # and little framing
    assert (values(client_run["bytes/received"]) >= samples * 5 * 4).all()  # dLoss/dIV
    # Client: compute + network is the step; server: the trainer's time is part of serving the request.
    np.testing.assert_allclose(
        values(client_run["time/compute_ms"]) + values(client_run["time/network_ms"]),
        values(client_run["time/step_ms"]),
        rtol=1e-5,
    )
    assert (values(server_run["time/compute_ms"]) <= values(server_run["time/step_ms"]) + 1e-3).all()
    # The running loss drops from its start within the run, as training should.
    assert values(client_run["step/loss"])[-1] < values(client_run["step/loss"])[0]
    for run in (client_run, server_run):
        np.testing.assert_allclose(values(run["optimizer/learning_rate"]), 0.01, rtol=1e-6)  # SGD's default

    # Epoch scalars at the step count where each epoch ended, equal to the history.
    epoch_ends = [STEPS_PER_EPOCH * (e + 1) for e in range(EPOCHS)]
    for name in ("loss", "accuracy", "val_loss", "val_accuracy"):
        assert steps(client_run[f"epoch/{name}"]) == epoch_ends, name
        np.testing.assert_allclose(values(client_run[f"epoch/{name}"]), history[name], rtol=1e-6, err_msg=name)
    for name in ("loss", "accuracy"):
        assert steps(server_run[f"epoch/{name}"]) == epoch_ends, name
        np.testing.assert_allclose(values(server_run[f"epoch/{name}"]), history[name], rtol=1e-6, err_msg=name)
    assert values(client_run["epoch/index"]).tolist() == [0, 1]
    assert (values(client_run["epoch/samples_per_s"]) > 0).all()
    assert client.step == epoch_ends[-1]


def test_log_every_writes_every_nth_step(split_pair: StartServer, tmp_path: Path) -> None:
    client_run, server_run, _, _ = train(split_pair, tmp_path, log_every=3)
    expected = [3, 6]
    for run in (client_run, server_run):
        assert steps(run["step/loss"]) == expected
        assert steps(run["time/step_ms"]) == expected
        assert steps(run["epoch/loss"]) == [4, 8]


def test_scalar_writer_round_trip(tmp_path: Path) -> None:
    writer = ScalarWriter(tmp_path)
    writer.scalars(1, {"a/x": 1.5, "a/y": -2})
    writer.scalars(7, {"a/x": 3})
    writer.close()
    assert read_scalars(tmp_path) == {"a/x": [(1, 1.5), (7, 3.0)], "a/y": [(1, -2.0)]}
    with pytest.raises(ValueError, match="log-every"):
        TensorBoardLogger(None, tmp_path, 0)  # type: ignore[arg-type]
