"""`split-demo`: the main job. Start `split-server` and `split-client` as two processes on loopback, train the
bundled digits model, print per-epoch progress and the test accuracy.

`split-demo --vertical [digits|breast-cancer]`: vertical split learning instead. Write the bundled vertical
dataset's party files, start `split-label-party` and its two `split-feature-party`s as three processes on
loopback, then train the uncut model here on the joined table of the rows they aligned, in the same batch order
from the same initial weights, and compare the two on the held-out rows (docs/vertical.md)."""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from splitlearning import cli, subprocesses, tensorflow_setup

if TYPE_CHECKING:
    from splitlearning.tables import Format

_SERVER_START_TIMEOUT = 120.0
# The flags that describe the model pair: both processes must be given the same (a U-shaped client needs a
# U-shaped server, both parts come from one --model and --seed, each side trains with the optimizer named).
SHARED_FLAGS = ("--model", "--cut", "--seed", "--optimizer", "--learning-rate")
# --vertical: the bundled vertical datasets (splitlearning/vertical_data.py), the first the default, and the file
# format the demo writes each one's party files in.
VERTICAL_DATASETS = ("digits", "breast-cancer")
VERTICAL_FORMATS: dict[str, Format] = {"digits": "npz", "breast-cancer": "csv"}
VERTICAL_EPOCHS = 5
VERTICAL_BATCH = 32
# The built-in parts' sizes, given to every party and to the uncut model alike: each bottom is its columns ->
# Dense(HIDDEN, relu) -> Dense(CUT_WIDTH, relu), the top the fused vector -> Dense(HIDDEN, relu) -> logits.
HIDDEN = 32
CUT_WIDTH = 16


def parser() -> argparse.ArgumentParser:
    demo = argparse.ArgumentParser(
        prog="split-demo",
        description=__doc__,
        epilog="Every other flag goes to split-client alone (--epochs, --batch-size, --dataset, ...: see "
        "split-client --help). Ctrl-C stops the client as soon as it can, and then the server. "
        "With --vertical: --seed (the batch order and every party's weights), --optimizer and --learning-rate go "
        f"to every party, --epochs (default {VERTICAL_EPOCHS}) and --batch-size (default {VERTICAL_BATCH}) to the "
        "label party; no other flag.",
    )
    demo.add_argument("--model", help="model pair, given to both processes (default: split-client's)")
    demo.add_argument("--cut", choices=["standard", "ushape"], help="cut, given to both processes")
    demo.add_argument("--seed", help="seed of both parts' weights and of the data order, given to both")
    demo.add_argument("--optimizer", help="Keras optimizer name, given to both processes")
    demo.add_argument("--learning-rate", help="the optimizer's learning rate, given to both processes")
    demo.add_argument(
        "--vertical",
        nargs="?",
        const=VERTICAL_DATASETS[0],
        choices=VERTICAL_DATASETS,
        help="the vertical split demo instead, on the bundled digits (the default: the label party holds the "
        "digits, two feature parties the images' left and right halves) or breast cancer (three groups of ten "
        "columns); compared with the uncut model trained in this process",
    )
    return demo


def vertical_parser() -> argparse.ArgumentParser:
    """The flags --vertical takes (it has no split-client to pass the others to)."""
    vertical = argparse.ArgumentParser(
        prog="split-demo",
        usage="%(prog)s --vertical [{digits,breast-cancer}] [--epochs N] [--batch-size N] [--seed N] "
        "[--optimizer NAME] [--learning-rate LR]",
        add_help=False,
    )
    vertical.add_argument("--vertical", nargs="?", const=VERTICAL_DATASETS[0], choices=VERTICAL_DATASETS)
    vertical.add_argument("--epochs", type=cli.POSITIVE_INT, default=VERTICAL_EPOCHS)
    vertical.add_argument("--batch-size", type=cli.POSITIVE_INT, default=VERTICAL_BATCH)
    vertical.add_argument("--seed", type=cli.NON_NEGATIVE_INT, default=0)
    vertical.add_argument("--optimizer", default="adam")
    vertical.add_argument("--learning-rate", type=cli.positive, default=3e-3)
    return vertical


@dataclass(frozen=True)
class Vertical:
    """What `split-demo --vertical` runs: the dataset, and the settings every party trains with."""

    dataset: str
    epochs: int
    batch_size: int
    seed: int
    optimizer: str
    learning_rate: float


def vertical_flags(argv: list[str]) -> Vertical | None:
    """The vertical demo's settings when the command line asks for it (None: the standard demo); a wrong
    combination of flags exits with argparse's one-line error."""
    known, _ = parser().parse_known_args(argv)
    if known.vertical is None:
        return None
    vertical = vertical_parser()
    if known.model is not None or known.cut is not None:
        vertical.error("--model and --cut choose the standard demo's pair; --vertical trains the built-in parts")
    flags = vertical.parse_args(argv)
    return Vertical(flags.vertical, flags.epochs, flags.batch_size, flags.seed, flags.optimizer, flags.learning_rate)


def split_flags(argv: list[str]) -> tuple[list[str], list[str]]:
    """(flags for both processes, flags for the client alone) from the demo's command line."""
    known, client_only = parser().parse_known_args(argv)
    shared: list[str] = []
    for flag in SHARED_FLAGS:
        value = getattr(known, flag.lstrip("-").replace("-", "_"))
        if value is not None:
            shared += [flag, value]
    return shared, client_only


class _Forward:
    """Ctrl-C reaches the demo alone (the children run in their own process groups): pass each SIGINT or SIGTERM
    on to the client, which stops after the step in flight (a second one: at once); before the client runs,
    stop the demo."""

    def __init__(self) -> None:
        self.client: subprocess.Popen[bytes] | None = None
        self.signum: int | None = None

    def __call__(self, signum: int, _frame: FrameType | None) -> None:
        self.signum = signum
        if self.client is None:
            raise KeyboardInterrupt
        self.client.send_signal(signum)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    vertical = vertical_flags(args)
    shared, client_only = split_flags(args) if vertical is None else ([], [])
    absent = tensorflow_setup.missing("split-demo")
    if absent:
        print(absent, file=sys.stderr)
        return 2
    forward = _Forward()
    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    try:
        if vertical is not None:
            return _run_vertical(vertical)
        return _run(shared, client_only, forward)
    except KeyboardInterrupt:
        print("split-demo: stopped on request", file=sys.stderr)
        return 128 + (forward.signum or signal.SIGINT)


def _environment() -> dict[str, str]:
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}


def _wait_for_port(process: subprocess.Popen[bytes], port_file: Path, program: str) -> int | None:
    """The port `process` writes to `port_file` once it serves; None (said on stderr) if it exits or takes too
    long first."""
    deadline = time.monotonic() + _SERVER_START_TIMEOUT
    while not port_file.exists() or not port_file.read_text().strip():
        if process.poll() is not None:
            print(f"{program} exited with status {process.returncode}", file=sys.stderr)
            return None
        if time.monotonic() > deadline:
            print(f"{program} did not start in time", file=sys.stderr)
            return None
        time.sleep(0.1)
    return int(port_file.read_text())


def _run(shared: list[str], client_only: list[str], forward: _Forward) -> int:
    env = _environment()
    with tempfile.TemporaryDirectory(prefix="split-demo-") as tmp:
        port_file = Path(tmp) / "port"
        server_flags = ["--address", "127.0.0.1:0", "--port-file", str(port_file), "--log-level", "WARNING"]
        server = subprocess.Popen(
            [sys.executable, "-m", "server_part", *server_flags, *shared], env=env, process_group=0
        )
        try:
            port = _wait_for_port(server, port_file, "split-server")
            if port is None:
                return 1
            print(f"split-server is listening on 127.0.0.1:{port}; starting split-client", flush=True)
            client_flags = ["--target", f"127.0.0.1:{port}", "--log-level", "WARNING"]
            forward.client = subprocess.Popen(
                [sys.executable, "-m", "client_part", *client_flags, *shared, *client_only], env=env, process_group=0
            )
            while True:
                try:
                    return forward.client.wait()
                except KeyboardInterrupt:  # not raised once the client runs; kept for safety
                    continue
        finally:
            subprocesses.stop(server, timeout=15)


def _run_vertical(config: Vertical) -> int:
    from splitlearning import vertical_data  # numpy, pandas and scikit-learn: TensorFlow only for the comparison

    dataset = vertical_data.digits_halves() if config.dataset == "digits" else vertical_data.breast_cancer_split()
    file_format = VERTICAL_FORMATS[config.dataset]
    table_flags = ["--id-column", vertical_data.ID_COLUMN] if file_format != "npz" else []
    names = dataset.names[1:]
    env = _environment()
    with tempfile.TemporaryDirectory(prefix="split-demo-vertical-") as tmp:
        folder = Path(tmp)
        files = vertical_data.write_party_files(dataset, folder / "data", file_format)
        held = ", ".join(
            f"{path.name} ({len(table.ids)} ids)" for path, table in zip(files, dataset.tables, strict=True)
        )
        print(f"{dataset.name}: one file per party in {folder / 'data'}: {held}", flush=True)
        port_file = folder / "port"
        shared = ["--optimizer", config.optimizer, "--learning-rate", str(config.learning_rate)]
        shared += ["--hidden", str(HIDDEN), "--cut-width", str(CUT_WIDTH), "--checkpoint-every", "0"]
        label_table = ["--label-column", vertical_data.LABEL_COLUMN] if table_flags else []
        label_flags = ["--data", str(files[0]), *table_flags, *label_table, "--parties", ",".join(names)]
        label_flags += ["--test-fraction", str(dataset.test_fraction), "--epochs", str(config.epochs)]
        label_flags += ["--batch-size", str(config.batch_size), "--seed", str(config.seed)]
        label_flags += [
            "--address",
            "127.0.0.1:0",
            "--port-file",
            str(port_file),
            "--state-dir",
            str(folder / dataset.names[0]),
        ]
        label_flags += [
            "--predictions",
            str(folder / "predictions.csv"),
            "--history-json",
            str(folder / "history.json"),
        ]
        processes: dict[str, subprocess.Popen[bytes]] = {}
        try:
            processes["split-label-party"] = label = subprocess.Popen(
                [sys.executable, "-m", "label_party", *label_flags, *shared, "--log-level", "INFO"],
                env=env,
                process_group=0,
            )
            port = _wait_for_port(label, port_file, "split-label-party")
            if port is None:
                return 1
            print(
                f"split-label-party is listening on 127.0.0.1:{port}; starting split-feature-party "
                + " and ".join(f"--name {name}" for name in names),
                flush=True,
            )
            for index, (name, path) in enumerate(zip(names, files[1:], strict=True)):
                feature_flags = ["--name", name, "--data", str(path), *table_flags, "--server", f"127.0.0.1:{port}"]
                seed = _feature_seed(config.seed, index)
                feature_flags += ["--init-seed", str(seed), "--state-dir", str(folder / name)]
                processes[f"split-feature-party {name}"] = subprocess.Popen(
                    [sys.executable, "-m", "feature_party", *feature_flags, *shared, "--log-level", "WARNING"],
                    env=env,
                    process_group=0,
                )
            if not _wait_all(processes):
                return 1
        finally:
            for process in processes.values():
                subprocesses.stop(process, timeout=15)
        return _compare(dataset, config, folder)


def _feature_seed(seed: int, index: int) -> int:
    """The seed of feature party `index`'s built-in bottom (the label party's own bottom and top take seed + 100
    and seed + 200)."""
    return seed + 1 + index


def _wait_all(processes: dict[str, subprocess.Popen[bytes]]) -> bool:
    """Wait until every process has exited 0 (True), or one has failed (False, said on stderr)."""
    while True:
        codes = {name: process.poll() for name, process in processes.items()}
        failed = {name: code for name, code in codes.items() if code not in (None, 0)}
        if failed:
            for name, code in failed.items():
                print(f"{name} exited with status {code}", file=sys.stderr)
            return False
        if all(code == 0 for code in codes.values()):
            return True
        time.sleep(0.1)


def _compare(dataset: Any, config: Vertical, folder: Path) -> int:
    """Print the alignment's sizes, then train the uncut model on the rows the parties aligned, in the same batch
    order, and print it beside the vertical model: per epoch, and on the held-out rows at the end."""
    import numpy as np

    from splitlearning.batch_order import BatchOrder, split_rows
    from splitlearning.files import read_json

    # Each party's table rows in the common order, as it keeps them (alignment.json in its --state-dir). No party
    # can map another's rows to ids; the demo wrote every file, so it checks that row k is one person everywhere.
    rows = {}
    for name in dataset.names:
        saved = read_json(folder / name / "alignment.json")
        assert saved is not None, f"{name} kept no alignment"
        rows[name] = saved["rows"]
    aligned = [dataset.label_party.ids[row] for row in rows[dataset.names[0]]]
    for name, table in zip(dataset.names[1:], dataset.feature_parties, strict=True):
        if [table.ids[row] for row in rows[name]] != aligned:
            print(f"the label party's and {name}'s alignments name different ids", file=sys.stderr)
            return 1
    train, test = split_rows(len(aligned), dataset.test_fraction)
    order = BatchOrder(train, test, config.batch_size, config.epochs, config.seed)
    sizes = ", ".join(f"{name} {len(table.ids)}" for name, table in zip(dataset.names, dataset.tables, strict=True))
    print(
        f"\nprivate set intersection (sizes only): ids per party: {sizes}; aligned rows {len(aligned)} (train "
        f"{train}, held out {test}); row k is the same id at every party (checked here, where every file was written)"
    )

    history = json.loads((folder / "history.json").read_text())
    with (folder / "predictions.csv").open(newline="") as handle:
        lines = list(csv.reader(handle))[1:]
    held_out = [line[0] for line in lines]
    outputs = np.array([[float(value) for value in line[1:]] for line in lines], dtype=np.float32)
    if held_out != [str(value) for value in aligned[train:]]:
        print("the label party's held-out ids are not the last rows of the alignment", file=sys.stderr)
        return 1

    print(
        f"the vertical model ({len(dataset.names)} processes) against the uncut model (trained in this process)\n"
        "  the uncut model: one Keras model, an Input per party, the same built-in bottoms and top from the same "
        "seeds, Concatenate\n"
        f"  both trained on: the same {len(aligned)} aligned rows (the uncut model: the joined table's), the same "
        f"{train} training rows in the same {order.total_steps} batches of {config.batch_size} ({config.epochs} "
        f"epochs), {config.optimizer} at {config.learning_rate:g}\n"
        f"  both evaluated on: the same {test} held-out rows (the vertical model's metrics and outputs: the label "
        "party's --history-json and --predictions)",
        flush=True,
    )
    expected, predictions = _train_uncut(dataset, config, aligned, order)
    columns = ["loss", *(name for name in history[0] if name.startswith("test_"))]
    headers = ["epoch", *(f"{name} (vertical / uncut)" for name in columns)]
    print("  ".join(headers))
    for epoch, (got, want) in enumerate(zip(history, expected, strict=True), start=1):
        cells = [f"{epoch:>5}"]
        cells += [
            f"{got[name]:.4f} / {want[name]:.4f}".ljust(len(header))
            for name, header in zip(columns, headers[1:], strict=True)
        ]
        print("  ".join(cells).rstrip())
    final, uncut = history[-1], expected[-1]
    print(f"held-out accuracy: vertical {final['test_accuracy']:.4f}, uncut {uncut['test_accuracy']:.4f}")
    if "test_auc" in final:
        print(f"held-out AUC: vertical {final['test_auc']:.4f}, uncut {uncut['test_auc']:.4f}")
    difference = float(np.max(np.abs(outputs - predictions)))
    bound = (
        2 * config.batch_size * order.total_steps * float(np.finfo(np.float32).eps) * float(np.max(np.abs(predictions)))
    )
    verdict = "within" if difference <= bound else "BEYOND"
    print(
        f"held-out outputs (logits): the largest difference {difference:.2g}, {verdict} float32 round-off (the "
        f"exactness tests' bound, 2·batch·steps·2^-23·max|output| = {bound:.2g})\n"
        "  close, not bit for bit: the label party applies its update XLA-compiled and oneDNN may add in another "
        'order than the uncut model\'s fit (docs/vertical.md, "Training")'
    )
    return 0


def _train_uncut(dataset: Any, config: Vertical, aligned: list[Any], order: Any) -> tuple[list[dict[str, float]], Any]:
    """The uncut model of the demo's parties, trained on `aligned`'s rows of the joined table in `order`'s
    batches: its metrics per epoch (training's running ones, then the held-out rows') and its held-out outputs."""
    tensorflow_setup.load(verbose=False)
    import keras
    import numpy as np
    import tensorflow as tf

    from splitlearning import models

    xs, labels = dataset.joined(aligned)
    loss, metrics, outputs, y = _task(labels)
    with tf.device("/CPU:0"):  # where the parties ran
        inputs, parts = [], []
        holding = [
            (i, name)
            for i, (name, columns) in enumerate(zip(dataset.names, dataset.party_columns, strict=True))
            if columns
        ]
        for (index, name), x in zip(holding, xs, strict=True):
            # As the CLIs build them: the label party's own bottom from seed + 100, a feature party's from its
            # --init-seed.
            seed, part = (
                (config.seed + 100, "own_bottom") if index == 0 else (_feature_seed(config.seed, index - 1), name)
            )
            inputs.append(keras.Input((x.shape[1],), name=f"{name}_columns"))
            parts.append(models.dense_bottom(x.shape[1], CUT_WIDTH, HIDDEN, seed, part)(inputs[-1]))
        top = models.dense_top(HIDDEN, outputs, config.seed + 200)
        model = keras.Model(inputs, top(keras.layers.Concatenate()(parts)), name="uncut")
        optimizer = models.make_optimizer(config.optimizer, config.learning_rate)
        model.compile(optimizer=optimizer, loss=loss, metrics=metrics, jit_compile=False)
        held_out = [x[order.train_rows :] for x in xs]
        history = []
        for epoch in range(config.epochs):
            steps = range(epoch * order.steps_per_epoch, (epoch + 1) * order.steps_per_epoch)
            rows = np.concatenate([order.train_rows_of(step) for step in steps])
            fitted = model.fit(
                [x[rows] for x in xs], y[rows], batch_size=order.batch_size, epochs=1, shuffle=False, verbose=0
            )
            record = {name: float(values[-1]) for name, values in fitted.history.items()}
            tested = model.evaluate(
                held_out, y[order.train_rows :], batch_size=order.batch_size, verbose=0, return_dict=True
            )
            record.update({f"test_{name}": float(value) for name, value in tested.items()})
            history.append(record)
        return history, model.predict(held_out, batch_size=order.batch_size, verbose=0)


def _task(labels: Any) -> tuple[Any, list[Any], int, Any]:
    """Loss, metrics, output width and labels as split-label-party picks them from its labels: binary (0/1: one
    logit, cross-entropy, accuracy and AUC; labels float32 [rows, 1]), else classes (sparse cross-entropy)."""
    import keras
    import numpy as np

    if int(labels.max()) + 1 <= 2:
        metrics = [keras.metrics.BinaryAccuracy(threshold=0.0, name="accuracy"), keras.metrics.AUC(from_logits=True)]
        return keras.losses.BinaryCrossentropy(from_logits=True), metrics, 1, labels.astype(np.float32).reshape(-1, 1)
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True), ["accuracy"], int(labels.max()) + 1, labels


if __name__ == "__main__":
    raise SystemExit(main())
