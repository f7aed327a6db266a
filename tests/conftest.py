"""Shared helpers: tiny seeded model pairs, seeded data, and a real `SplitServer` on 127.0.0.1 port 0."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import pytest

from server_part import SplitServer

INPUT_DIM = 6
CUT_DIM = 5
NUM_CLASSES = 3
KINDS = ("plain", "regularized", "batchnorm")


def build_bottom(kind: str = "plain", seed: int = 0) -> keras.Model:
    """The client's part (input -> cut), built from `seed` alone."""
    keras.utils.set_random_seed(seed)
    regularizer = keras.regularizers.L2(1e-2) if kind == "regularized" else None
    layers: list[Any] = [
        keras.Input((INPUT_DIM,), name="features"),
        keras.layers.Dense(8, activation="relu", kernel_regularizer=regularizer),
    ]
    if kind == "batchnorm":
        layers.append(keras.layers.BatchNormalization())
    layers.append(keras.layers.Dense(CUT_DIM, activation="tanh"))
    return keras.Sequential(layers, name="bottom")


def build_top(kind: str = "plain", seed: int = 0) -> keras.Model:
    """The server's part (cut -> logits), built from `seed` alone."""
    keras.utils.set_random_seed(seed + 1)
    layers: list[Any] = [keras.Input((CUT_DIM,), name="cut"), keras.layers.Dense(8, activation="relu")]
    if kind == "batchnorm":
        layers.append(keras.layers.BatchNormalization())
    layers.append(keras.layers.Dense(NUM_CLASSES))
    return keras.Sequential(layers, name="top")


def build_pair(kind: str = "plain", seed: int = 0) -> tuple[keras.Model, keras.Model]:
    """(bottom, top): the same seed always gives the same weights."""
    return build_bottom(kind, seed), build_top(kind, seed)


def make_loss() -> keras.losses.Loss:
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def make_data(n: int = 50, seed: int = 123) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, INPUT_DIM)).astype("float32")
    y = rng.integers(0, NUM_CLASSES, size=n).astype("int64")
    return x, y


@dataclass
class Split:
    """A started server holding `top`, plus the `bottom` a client would train."""

    bottom: keras.Model
    top: keras.Model
    server: SplitServer
    port: int

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


StartServer = Callable[..., Split]


@pytest.fixture
def split_pair() -> Iterator[StartServer]:
    """A factory: `split_pair(kind, seed, optimizer=..., ...)` builds a seeded pair and serves its top.

    Every server it starts is stopped when the test ends.
    """
    servers: list[SplitServer] = []

    def start(
        kind: str = "plain",
        seed: int = 0,
        optimizer: Any = "sgd",
        metrics: Sequence[Any] = ("accuracy",),
        loss: Any = None,
        **server_kwargs: Any,
    ) -> Split:
        bottom, top = build_pair(kind, seed)
        server = SplitServer(top, loss or make_loss(), optimizer, list(metrics), **server_kwargs)
        servers.append(server)
        port = server.start("127.0.0.1:0")
        return Split(bottom, top, server, port)

    yield start
    for server in servers:
        server.stop(grace=1.0)


def server_snapshot(server: SplitServer) -> dict[str, Any]:
    """Everything a refused request must leave alone: weights, optimizer slots, metrics, the step."""
    trainer = server.trainer
    return {
        "weights": [np.array(w) for w in server.model.get_weights()],  # settles the last step's update first
        "optimizer": [np.array(v.numpy()) for v in trainer.optimizer.variables],
        "iterations": trainer.iterations,
        "metrics": [np.array(v.numpy()) for v in trainer.model.metrics_variables],
        "next_step": server.session().next_step if server.sessions.first is not None else None,
        "sessions": sorted(session.id for session in server.sessions.sessions()),  # a refusal opens none
    }


def assert_same_snapshot(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert after["iterations"] == before["iterations"]
    assert after["next_step"] == before["next_step"]
    assert after["sessions"] == before["sessions"]
    for key in ("weights", "optimizer", "metrics"):
        assert len(after[key]) == len(before[key]), key
        for a, b in zip(after[key], before[key], strict=True):
            np.testing.assert_array_equal(a, b, err_msg=key)


@pytest.fixture
def cli_logs() -> Iterator[None]:
    """A CLI's `main` run in-process sends the logs to this test's stderr: restore the root logger after it."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def listening() -> Iterator[int]:
    """The port of a socket this test holds open (a port in use)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield int(taken.getsockname()[1])


@pytest.fixture(scope="session")
def client_without_server() -> subprocess.CompletedProcess[str]:
    """`split-client --target 127.0.0.1:9 --connect-timeout 1 --epochs 1` where nothing listens, run to its end
    as a process of its own, with this environment less TF_CPP_MIN_LOG_LEVEL (as a user starts it): one run that
    every test reading what it said and its exit status shares."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    flags = ["--target", "127.0.0.1:9", "--connect-timeout", "1", "--epochs", "1"]
    return subprocess.run(
        [sys.executable, "-m", "client_part", *flags], env=env, capture_output=True, text=True, timeout=120
    )


# -- running on two workers (pytest-xdist, `-n 2 --dist loadgroup`, as the README's test command does) ----------

# Modules whose tests share machine-wide things that are not made per test (the throw-away Docker engine with its
# image tags and compose projects, network namespaces, root-only system settings): one work unit, so one worker
# runs them one at a time, as a run without workers does.
SYSTEM_MODULES = frozenset({"test_deploy_engine", "test_deploy_two_hosts", "test_deploy_compose"})

# Modules whose tests share a module-scoped fixture (a reference run, a server process, a data set): each worker
# makes such a fixture for itself, so each of these modules is one work unit, and its fixtures are made once.
# pytest_collection_modifyitems below refuses a module that has one and is missing here.
SHARED_FIXTURE_MODULES = frozenset(
    {
        "test_approximations_processes",
        "test_bad_requests",
        "test_faults_resume",
        "test_faults_robustness",
        "test_faults_rollback",
        "test_group_dropouts",
        "test_group_faults",
        "test_hostile_strings",
        "test_security_tls",
        "test_sessions_processes",
        "test_ushape_processes",
        "test_vertical_data",
        "test_vertical_processes",
    }
)


def work_unit(nodeid: str) -> str:
    """What `--dist loadgroup` hands to one worker at once: a test alone, or every test of its group."""
    path = nodeid.split("::", 1)[0]
    module = path.rpartition("/")[2].removesuffix(".py")
    if module in SYSTEM_MODULES:
        return "system"
    if module in SHARED_FIXTURE_MODULES:
        return path
    return nodeid


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A module with a module-scoped fixture that is not in SHARED_FIXTURE_MODULES would make it once per worker
    (and, for a fixture that holds a fixed resource, twice at once): say so, with or without workers."""
    missing = set()
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        module = item.nodeid.split("::", 1)[0].rpartition("/")[2].removesuffix(".py")
        if info is None or module in SYSTEM_MODULES or module in SHARED_FIXTURE_MODULES:
            continue
        if any(d.scope == "module" for defs in info.name2fixturedefs.values() for d in defs):
            missing.add(module)
    if missing:
        raise pytest.UsageError(f"tests/conftest.py: add {sorted(missing)} to SHARED_FIXTURE_MODULES")


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist, which a run without workers may lack
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """`--dist loadgroup` with the work units of `work_unit`. xdist's own loadgroup (3.8) groups by `xdist_group`
    marks through `item._nodeid`, which pytest 9.2 no longer reads (its tests would be spread over the workers);
    the scheduler is given the test ids only, so the groups are named by module here."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    return GroupScheduling(config, log)
