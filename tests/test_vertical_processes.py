"""Vertical split learning between real processes: `split-label-party` and two `split-feature-party` processes
on the bundled breast-cancer table (the label party with 10 columns of its own and a bottom over them, each
feature party 10 more), over gRPC on 127.0.0.1.

- An uninterrupted run (`split-label-party --exact`) equals the uncut model (one Input per party, the same
  bottoms, Concatenate, the top) trained with `fit` on the joined table's aligned rows in the agreed batch order:
  bit for bit without oneDNN, within float32 round-off with it (tests/exactness_support.py).
- kill -9 of any one process mid-training, restarted with the same flags: the run ends with the weights of the
  uninterrupted run (on the same aligned rows: its alignment files are copied in), bit for bit (the same
  processes run the same ops on the same machine; the state comes back from the coordinated checkpoints, the
  step number the common clock).
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np
import pytest

from splitlearning import models, vertical_data
from splitlearning.batch_order import BatchOrder
from splitlearning.files import read_json
from tests.exactness_support import ONEDNN, assert_close, assert_weights_equal, roundoff
from tests.faults_support import exit_code, free_port, saved_steps, spawn, stop, wait_for

pytestmark = pytest.mark.processes

FEATURE_PARTIES = ("error", "worst")
BATCH = 16
EPOCHS = 3
CHECKPOINT_EVERY = 10
HIDDEN, CUT = 8, 4
LEARNING_RATE = 0.01


@dataclass
class Run:
    """One vertical run's folders and processes; `start(name)` (re)starts a process with its fixed flags."""

    root: Path
    data: Path
    port: int = field(default_factory=free_port)
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def state(self, name: str) -> Path:
        return self.root / f"{name}-state"

    def model(self, name: str) -> Path:
        return self.root / f"{name}.keras"

    def log(self, name: str) -> Path:
        return self.root / f"{name}.log"

    def start(self, name: str) -> None:
        common = [
            "--state-dir", str(self.state(name)),
            "--checkpoint-every", str(CHECKPOINT_EVERY),
            "--save-model", str(self.model(name)),
            "--optimizer", "adam",
            "--learning-rate", str(LEARNING_RATE),
            "--hidden", str(HIDDEN),
            "--cut-width", str(CUT),
        ]  # fmt: skip
        if name == "label":
            args = [
                "--data", str(self.data / "label.npz"),
                "--parties", ",".join(FEATURE_PARTIES),
                "--top", str(self.data / "top.keras"),
                "--address", f"127.0.0.1:{self.port}",
                "--batch-size", str(BATCH),
                "--epochs", str(EPOCHS),
                "--seed", "3",
                "--deadline", "20",
                "--predictions", str(self.root / "predictions.csv"),
                "--exact",
            ]  # fmt: skip
            self.processes[name] = spawn("label_party", [*args, *common], self.log(name))
        else:
            args = [
                "--name", name,
                "--data", str(self.data / f"{name}.npz"),
                "--bottom", str(self.data / f"{name}_bottom.keras"),
                "--server", f"127.0.0.1:{self.port}",
                "--seed", "3",
                "--retry-timeout", "90",
            ]  # fmt: skip
            self.processes[name] = spawn("feature_party", [*args, *common], self.log(name))

    def start_all(self) -> None:
        for name in ("label", *FEATURE_PARTIES):
            self.start(name)

    def finish(self, timeout: float = 240) -> None:
        try:
            for name, process in self.processes.items():
                peers = [(other, self.log(n)) for n, other in self.processes.items() if n != name]
                code = exit_code(process, self.log(name), timeout, name, peers)
                assert code == 0, f"{name} exited {code}:\n{self.log(name).read_text()[-3000:]}"
        finally:
            for process in self.processes.values():
                stop(process)

    def weights(self, name: str) -> list[np.ndarray]:
        return keras.saving.load_model(self.model(name), compile=False).get_weights()


def build_parts(folder: Path) -> None:
    """The party files and the models the processes start from: each feature party's bottom and the top, saved."""
    dataset = vertical_data.breast_cancer_split(test_fraction=0.2, seed=0)
    vertical_data.write_party_files(dataset, folder, "npz")
    for index, name in enumerate(FEATURE_PARTIES):
        models.dense_bottom(10, CUT, HIDDEN, 50 + index, f"{name}_bottom").save(folder / f"{name}_bottom.keras")
    keras.utils.set_random_seed(60)
    top = keras.Sequential(
        [keras.Input((CUT * 3,)), keras.layers.Dense(HIDDEN, activation="relu"), keras.layers.Dense(1)], name="top"
    )
    top.save(folder / "top.keras")


def aligned_rows(state: Path) -> list[int]:
    """A party's table rows in the common order, as its state folder keeps them."""
    saved = read_json(state / "alignment.json")
    assert saved is not None, state
    return list(saved["rows"])


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("vertical-data")
    build_parts(folder)
    return folder


@pytest.fixture(scope="module")
def reference(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    run = Run(tmp_path_factory.mktemp("reference"), data)
    run.start_all()
    run.finish()
    return run


def test_uninterrupted_run_equals_the_uncut_model(reference: Run, data: Path) -> None:
    dataset = vertical_data.breast_cancer_split(test_fraction=0.2, seed=0)
    label_rows = np.array(aligned_rows(reference.state("label")))
    ids = [dataset.label_party.ids[row] for row in label_rows]
    for name in FEATURE_PARTIES:  # every party's rows are the same people, in the same order
        table = dataset.tables[dataset.names.index(name)]
        rows = aligned_rows(reference.state(name))
        assert [table.ids[row] for row in rows] == ids
    xs, y = dataset.joined(ids)
    order = BatchOrder(len(ids) - round(len(ids) * 0.2), round(len(ids) * 0.2), BATCH, EPOCHS, 3)

    own_bottom = models.dense_bottom(10, CUT, HIDDEN, 3 + 100, "own_bottom")  # the label party's built-in bottom
    bottoms = [keras.saving.load_model(data / f"{name}_bottom.keras") for name in FEATURE_PARTIES]
    top = keras.saving.load_model(data / "top.keras")
    inputs = [keras.Input((10,), name=f"x{i}") for i in range(3)]
    parts = [own_bottom(inputs[0]), *(bottom(x) for bottom, x in zip(bottoms, inputs[1:], strict=True))]
    uncut = keras.Model(inputs, top(keras.layers.Concatenate()(parts)))
    uncut.compile(
        keras.optimizers.Adam(LEARNING_RATE), keras.losses.BinaryCrossentropy(from_logits=True), jit_compile=False
    )
    labels = y.astype("float32").reshape(-1, 1)
    for epoch in range(EPOCHS):
        steps = range(epoch * order.steps_per_epoch, (epoch + 1) * order.steps_per_epoch)
        batches = np.concatenate([order.train_rows_of(step) for step in steps])
        uncut.fit([x[batches] for x in xs], labels[batches], batch_size=BATCH, epochs=1, shuffle=False, verbose=0)

    tolerance = roundoff(BATCH, order.total_steps)
    exact = not ONEDNN
    for name, bottom in zip(FEATURE_PARTIES, bottoms, strict=True):
        assert_weights_equal(reference.weights(name), bottom.get_weights(), name, exact, tolerance)
    label_part = keras.saving.load_model(reference.model("label"), compile=False)
    for layer, expected in (("own_bottom", own_bottom), ("top", top)):
        assert_weights_equal(label_part.get_layer(layer).get_weights(), expected.get_weights(), layer, exact, tolerance)
    # The predictions file holds 9 significant digits: float32's round trip, so equal when the outputs are.
    predictions = np.loadtxt(reference.root / "predictions.csv", delimiter=",", skiprows=1, usecols=1)
    held_out = np.arange(order.train_rows, order.train_rows + order.test_rows)
    expected_predictions = uncut.predict([x[held_out] for x in xs], batch_size=BATCH, verbose=0).reshape(-1)
    assert_close(predictions.astype(np.float32), expected_predictions, "predictions", exact, tolerance)


@pytest.mark.parametrize("victim", ["label", *FEATURE_PARTIES])
def test_kill_any_process_and_restart_ends_bit_for_bit(victim: str, reference: Run, data: Path, tmp_path: Path) -> None:
    run = Run(tmp_path, data)
    for name in ("label", *FEATURE_PARTIES):  # the reference's rows and order (a PSI draws the order anew)
        run.state(name).mkdir()
        shutil.copy(reference.state(name) / "alignment.json", run.state(name))
    run.start_all()
    watched = run.state(FEATURE_PARTIES[0]) / "checkpoints"
    wait_for(lambda: max(saved_steps(watched), default=0) >= 3 * CHECKPOINT_EVERY, 120, "the third checkpoint")
    killed_at = max(saved_steps(watched))
    stop(run.processes[victim])  # SIGKILL
    run.start(victim)  # the same flags
    run.finish()
    assert killed_at < BatchOrder(455, 114, BATCH, EPOCHS, 3).total_steps  # it was killed mid-training
    for name in ("label", *FEATURE_PARTIES):
        for actual, expected in zip(run.weights(name), reference.weights(name), strict=True):
            np.testing.assert_array_equal(actual, expected, err_msg=f"{name} after {victim} was killed")
    log = run.log(victim).read_text()  # the restarted process resumed from a checkpoint, not from the start
    assert ("restored the label party's part at step" if victim == "label" else "restored step") in log, log[-2000:]
