"""The CLIs' default configuration, split, against Keras `fit` (issue 26): `split-server` and `split-client` as
they start with no flags (the digits-mlp pair, Adam at 3e-3, seed 0) on the bundled digits, one epoch.

`split-server --exact` applies the server's updates as `fit` does (a plain graph): bit for bit without oneDNN,
within float32 round-off with it. The default, XLA-compiled update is within float32 round-off only (without
oneDNN it differs from the second step on: 1.5e-8 after it, 6e-8 after this epoch). What each claim means
and how the tolerance is derived: tests/exactness_support.py.
"""

from __future__ import annotations

from collections.abc import Iterator

import keras
import numpy as np
import pytest
import tensorflow as tf

from client_part import SplitClient
from client_part import cli as client_cli
from server_part import cli as server_cli
from server_part.middle_trainer import MiddleTrainer
from splitlearning import data
from splitlearning.models import BUILTIN, make_optimizer
from splitlearning.training.loss_trainer import LossTrainer
from tests.exactness_support import ONEDNN, assert_close, assert_logs_equal, assert_weights_equal, roundoff

BATCH = 32  # 1,437 training images: 44 full batches and one of 29
EPOCHS = 1
STEPS = 45
TOLERANCE = roundoff(BATCH, STEPS * EPOCHS)


@pytest.fixture(autouse=True)
def on_cpu() -> Iterator[None]:
    """The uncut reference runs where both parts run by default (/CPU:0), as in tests/test_exactness.py."""
    with tf.device("/CPU:0"):
        yield


def split_and_uncut(server_flags: list[str]) -> tuple[dict[str, object], dict[str, object]]:
    """Train the default pair split (a server built as `split-server [server_flags]` builds it, a client with
    `split-client`'s defaults) and uncut (`keras.Model.fit`, the same seed and batch order); return what each
    ends with: weights of both parts, per-epoch history, evaluation and predictions."""
    client_config = client_cli.parse_args([])
    server_config = server_cli.parse_args(["--address", "127.0.0.1:0", *server_flags])
    assert (client_config.model, client_config.optimizer, client_config.learning_rate) == ("digits-mlp", "adam", 3e-3)
    assert (server_config.model, server_config.optimizer, server_config.learning_rate) == ("digits-mlp", "adam", 3e-3)
    assert client_config.seed == server_config.seed == 0
    pair, seed = BUILTIN[client_config.model], client_config.seed
    digits = data.load("digits")
    x, y, x_test, y_test = digits.x_train, digits.y_train, digits.x_test, digits.y_test

    server = server_cli.build(server_config)
    port = server.start("127.0.0.1:0")
    try:
        optimizer = make_optimizer(client_config.optimizer, client_config.learning_rate)
        with SplitClient(pair.client(seed), optimizer, target=f"127.0.0.1:{port}", connect_timeout=10) as client:
            history = client.fit(x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=False, verbose=0)
            split = {
                "steps": client.step,
                "bottom": client.model.get_weights(),
                "top": server.model.get_weights(),
                "history": history.history,
                "evaluation": client.evaluate(x_test, y_test, batch_size=BATCH),
                "predictions": client.predict(x_test, batch_size=BATCH),
            }
    finally:
        server.stop(grace=1.0)

    uncut_model = keras.Sequential([pair.client(seed), pair.server(seed)])
    uncut_optimizer = make_optimizer(server_config.optimizer, server_config.learning_rate)
    # jit_compile=False: what "auto" is on a CPU-only machine (Keras turns XLA off there), on a GPU one too.
    uncut_model.compile(optimizer=uncut_optimizer, loss=pair.loss, metrics=list(pair.metrics), jit_compile=False)
    expected = uncut_model.fit(x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=False, verbose=0)
    uncut = {
        "steps": int(uncut_model.optimizer.iterations.numpy()),
        "bottom": uncut_model.layers[0].get_weights(),
        "top": uncut_model.layers[1].get_weights(),
        "history": expected.history,
        "evaluation": uncut_model.evaluate(x_test, y_test, batch_size=BATCH, return_dict=True, verbose=0),
        "predictions": uncut_model.predict(x_test, batch_size=BATCH, verbose=0),
    }
    return split, uncut


def check(split: dict[str, object], uncut: dict[str, object], exact: bool) -> None:
    assert split["steps"] == uncut["steps"] == STEPS * EPOCHS
    for part in ("bottom", "top"):
        assert_weights_equal(split[part], uncut[part], part, exact, TOLERANCE)  # type: ignore[arg-type]
    for logs in ("history", "evaluation"):
        assert_logs_equal(split[logs], uncut[logs], exact, sum_of_means=False)  # type: ignore[arg-type]
    assert_close(split["predictions"], uncut["predictions"], "predictions", exact, TOLERANCE)


def test_split_server_exact_equals_fit() -> None:
    """`--exact`: bit for bit without oneDNN; within float32 round-off with it."""
    check(*split_and_uncut(["--exact"]), exact=not ONEDNN)


def test_split_server_default_update_is_within_roundoff_of_fit() -> None:
    """The default (XLA-compiled updates): within float32 round-off of `fit`, and training really happened."""
    split, uncut = split_and_uncut([])
    check(split, uncut, exact=False)
    initial = BUILTIN["digits-mlp"].server(0).get_weights()
    for before, after in zip(initial, split["top"], strict=True):  # type: ignore[call-overload]
        assert np.max(np.abs(before - after)) > 100 * TOLERANCE * np.max(np.abs(after))


def test_exact_reaches_every_update_of_every_session() -> None:
    """`exact` compiles no update with XLA, in the trainer a server is given and in each session's copy."""
    pair = BUILTIN["digits-mlp"]
    assert pair.middle is not None
    for exact in (False, True):
        top = LossTrainer(pair.server(0), pair.loss, make_optimizer("adam", 3e-3), ["accuracy"], exact=exact)
        middle = MiddleTrainer(pair.middle(0), make_optimizer("adam", 3e-3), exact=exact)
        for loss_trainer in (top, top.copy(pair.server(0), "/CPU:0")):
            assert loss_trainer.exact is exact
            assert loss_trainer._apply_fn.jit_compile is not exact  # type: ignore[attr-defined]
            assert loss_trainer._apply_accumulated_fn.jit_compile is not exact
        for middle_trainer in (middle, middle.copy(pair.middle(0), "/CPU:0")):
            assert middle_trainer.exact is exact
            assert middle_trainer._apply_fn.jit_compile is not exact


def test_split_server_flag() -> None:
    assert not server_cli.parse_args([]).exact
    assert server_cli.parse_args(["--exact"]).exact
    assert server_cli.build(server_cli.parse_args(["--exact"])).trainer.exact
