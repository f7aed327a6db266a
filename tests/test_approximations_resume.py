"""A client that trains with stale gradients or a local loss and stops after an epoch resumes from its checkpoint
with the same arguments, and ends where an uninterrupted run ends: no step lost or repeated (the steps in flight
were drained before the checkpoint). A server restarted during top-k training resumes its session with the error
feedback's residual, from the same checkpoint as its part, and ends where an uninterrupted run ends."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import keras
import pytest

from client_part import SplitClient
from server_part import SplitServer
from splitlearning.approximations import Approximations
from tests.conftest import CUT_DIM, NUM_CLASSES, StartServer, build_pair, make_data, make_loss
from tests.exactness_support import assert_weights_equal

BATCH = 8  # 40 samples: five steps an epoch
EPOCHS = 3
CASES = {
    "stale-gradients": Approximations(stale_gradients=True),
    "local-loss": Approximations(local_loss=True),
}


def head() -> keras.Model:
    keras.utils.set_random_seed(11)
    return keras.Sequential([keras.Input((CUT_DIM,)), keras.layers.Dense(NUM_CLASSES)])


def client(bottom: keras.Model, target: str, asked: Approximations, checkpoints: Path | None) -> SplitClient:
    extra: dict[str, Any] = {"local_head": head()} if asked.local_loss else {}
    return SplitClient(
        bottom,
        keras.optimizers.SGD(0.1),
        target=target,
        connect_timeout=10,
        approximations=asked,
        checkpoint_dir=checkpoints,
        checkpoint_every=2,
        **extra,
    )


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_stopped_client_resumes_where_it_stopped(split_pair: StartServer, tmp_path: Path, name: str) -> None:
    asked = CASES[name]
    x, y = make_data(40)

    def serve() -> Any:
        return split_pair("plain", 5, optimizer=keras.optimizers.SGD(0.1), allow_approximations="all")

    whole = serve()
    # With the same checkpoints: stale gradients drain at each one, which is part of what the run computes.
    with client(whole.bottom, whole.target, asked, tmp_path / "uninterrupted") as uninterrupted:
        uninterrupted.fit(x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=True, seed=4, verbose=0)
        expected = [*uninterrupted.model.get_weights(), *whole.server.model.get_weights()]

    split = serve()
    with client(split.bottom, split.target, asked, tmp_path / "stopped") as first:
        first.fit(x, y, batch_size=BATCH, epochs=1, shuffle=True, seed=4, verbose=0)
        assert first.step == split.server.session().next_step == 5
    # A new process would build the part from scratch: weights that the checkpoint must replace.
    keras.utils.set_random_seed(99)
    fresh = keras.models.clone_model(split.bottom)
    with client(fresh, split.target, asked, tmp_path / "stopped") as resumed:
        assert resumed.step == 5  # restored from its checkpoint
        history = resumed.fit(x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=True, seed=4, verbose=0)
        assert len(history.history["loss"]) == EPOCHS - 1  # epochs 2 and 3 only
        assert resumed.step == split.server.session().next_step == EPOCHS * 5
        got = [*resumed.model.get_weights(), *split.server.model.get_weights()]
    assert_weights_equal(got, expected, f"{name}: resumed against uninterrupted", exact=False)


def test_a_restarted_server_resumes_top_k_with_its_residual(tmp_path: Path) -> None:
    """The server stops after the first epoch (saving its session) and a new one on the same port and checkpoints
    takes over; the client retries through it. Its gradients then carry what the stopped server left out."""
    x, y = make_data(40)
    asked = Approximations(top_k=0.25)

    def server(checkpoints: Path, port: int = 0) -> tuple[SplitServer, keras.Model, int]:
        bottom, top = build_pair("plain", 5)
        serving = SplitServer(
            top, make_loss(), keras.optimizers.SGD(0.1), ["accuracy"], checkpoint_dir=checkpoints,
            checkpoint_every=0, allow_approximations="top-k",
        )  # fmt: skip
        return serving, bottom, serving.start(f"127.0.0.1:{port}")

    def run(checkpoints: Path, restart: bool) -> list[Any]:
        first, bottom, port = server(checkpoints)
        serving = first
        try:
            with SplitClient(
                bottom, keras.optimizers.SGD(0.1), target=f"127.0.0.1:{port}", connect_timeout=10, approximations=asked
            ) as split:
                split.fit(x, y, batch_size=BATCH, epochs=1, shuffle=True, seed=4, verbose=0)
                if restart:
                    first.stop(grace=1.0)  # saves the session at step 5, the residual with it
                    serving, _, _ = server(checkpoints, port)
                split.fit(x, y, batch_size=BATCH, epochs=EPOCHS - 1, shuffle=True, seed=4, verbose=0)
                assert split.step == EPOCHS * 5
                session = serving.session(split.session_id)
                session.settle()
                return [*split.model.get_weights(), *session.trainer.model.get_weights()]
        finally:
            first.stop(grace=1.0)
            serving.stop(grace=1.0)

    expected = run(tmp_path / "uninterrupted", restart=False)
    got = run(tmp_path / "restarted", restart=True)
    assert_weights_equal(got, expected, "top-k: restarted server against uninterrupted", exact=False)
