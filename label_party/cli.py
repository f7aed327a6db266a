"""`split-label-party`: the label party of a vertical split: serve the feature parties until training ends,
then write what was asked for (docs/vertical.md, "Running it")."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from splitlearning import logs, tensorflow_setup

logs.quiet_grpc(sys.argv[1:])  # before grpc is imported (below, through security)

from splitlearning import cli, security  # noqa: E402

log = logging.getLogger("split-label-party")
FUSES = ("concat", "sum", "mean")
# splitlearning.label_defences.KINDS, written out: parsing the flags imports no numpy.
LABEL_DEFENCES = ("none", "gaussian", "max-norm", "marvell")


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="split-label-party",
        description="The label party of a vertical split: holds the labels and the top model, aligns ids with the "
        "feature parties by private set intersection, and trains with them until the last epoch.",
    )
    groups = cli.groups(parser, "data", "model", "training", "connection", "checkpoints", "observability")
    data = groups["data"]
    cli.add(data, "--data", type=Path, required=True, help="this party's table: .npz (ids, y[, x]), .csv or .parquet")
    cli.add(data, "--id-column", default=None, help=".csv/.parquet: the column of sample ids")
    cli.add(data, "--label-column", default=None, help=".csv/.parquet: the column of labels")
    cli.add(data, "--columns", default=None, help="comma-separated feature columns of this party (default: the rest)")
    cli.add(
        data,
        "--parties",
        required=True,
        help="comma-separated names of the feature parties to wait for, in fuse order (each one's --name)",
    )
    cli.add(data, "--test-fraction", type=cli.number(float, 0, 1, high_open=True), default=0.2, help="held out")
    model = groups["model"]
    cli.add(model, "--top", type=cli.keras_file, default=None, help="a .keras top model taking the fused vector")
    cli.add(model, "--hidden", type=cli.POSITIVE_INT, default=32, help="built-in top: its hidden layer's width")
    cli.add(
        model,
        "--cut-width",
        type=cli.POSITIVE_INT,
        default=16,
        help="built-in bottom over this party's own columns (when its table has some): its IV's width",
    )
    cli.add(model, "--fuse", default="concat", choices=FUSES, help="how the parties' IVs are joined")
    cli.add(model, "--device", default="/CPU:0", help="device to pin this process to: /CPU:0, /GPU:0, ...")
    training = groups["training"]
    cli.add(training, "--epochs", type=cli.POSITIVE_INT, default=5, help="epochs over the aligned training rows")
    cli.add(training, "--batch-size", type=cli.POSITIVE_INT, default=32, help="rows per step")
    cli.add(training, "--seed", type=cli.NON_NEGATIVE_INT, default=0, help="seed of the batch order and the weights")
    cli.add(training, "--optimizer", default="adam", help="any Keras optimizer name: sgd, adam, rmsprop, ...")
    cli.add(training, "--learning-rate", type=cli.positive, default=3e-3, help="the optimizer's learning rate")
    cli.add(
        training,
        "--exact",
        action="store_true",
        help="apply updates as a plain graph, as keras fit does (bit for bit with the uncut model without oneDNN); "
        "default: XLA-compiled (within float32 round-off)",
    )
    cli.add(
        training,
        "--label-defence",
        default="none",
        choices=LABEL_DEFENCES,
        help="noise the gradients sent to the feature parties against label leakage (docs/security.md)",
    )
    cli.add(
        training,
        "--label-defence-strength",
        type=cli.NON_NEGATIVE,
        default=0.0,
        help="gaussian: noise norm per gradient norm; marvell: power budget per squared class-mean gap",
    )
    cli.add(
        training,
        "--no-leakage-meters",
        action="store_true",
        help="do not score the label attacks on the gradients sent (leak_norm_auc/<party>, ...) per epoch",
    )
    serving = groups["connection"]
    cli.add_listen_flags(serving, "127.0.0.1:50061")
    cli.add(
        serving,
        "--deadline",
        type=cli.positive,
        default=60.0,
        help="seconds a party waits for the others at a step, a join or the alignment before its call fails "
        "(naming who did not come)",
    )
    cli.add(serving, "--tls-cert", type=Path, default=None, help="PEM certificate chain: serve TLS (with --tls-key)")
    cli.add(serving, "--tls-key", type=Path, default=None, help="PEM private key of --tls-cert")
    cli.add(serving, "--tls-ca", type=Path, default=None, help="PEM CA: require client certificates it signed (mTLS)")
    cli.add(
        serving,
        "--party-token",
        action="append",
        default=None,
        help="NAME=FILE: the bearer token of party NAME; give one per party, and each call must carry its own",
    )
    cli.add_metrics_flags(serving)
    cli.add(serving, "--max-ids", type=cli.POSITIVE_INT, default=1_000_000, help="the most ids any party may hold")
    state = groups["checkpoints"]
    cli.add(state, "--state-dir", type=Path, default=None, help="keep the alignment and checkpoints here; resume")
    cli.add(state, "--checkpoint-every", type=cli.NON_NEGATIVE_INT, default=100, help="steps between checkpoints")
    cli.add(state, "--checkpoint-keep", type=cli.number(int, 2), default=5, help="checkpoints to keep (at least 2)")
    outputs = groups["checkpoints"]
    cli.add(outputs, "--save-model", type=cli.keras_file, default=None, help="write the label party's part here")
    cli.add(outputs, "--predictions", type=Path, default=None, help="write the held-out rows' ids and outputs (.csv)")
    cli.add(outputs, "--history-json", type=Path, default=None, help="write the per-epoch metrics here")
    cli.add_log_flags(groups["observability"])
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = parser()
    flags = p.parse_args(argv)
    flags.party_names = [name.strip() for name in flags.parties.split(",") if name.strip()]
    if not flags.party_names:
        p.error("--parties: name at least one feature party")
    if len(set(flags.party_names)) != len(flags.party_names):
        p.error(f"--parties: names must be unique, got {flags.party_names}")
    suffix = flags.data.suffix.lower()
    if suffix in (".csv", ".parquet") and flags.id_column is None:
        p.error(f"--data {flags.data}: a {suffix} table needs --id-column")
    if suffix == ".npz" and (flags.id_column or flags.label_column):
        p.error("--id-column/--label-column apply to .csv/.parquet tables; an .npz holds arrays ids, y (and x)")
    if suffix in (".csv", ".parquet") and flags.label_column is None:
        p.error(f"--data {flags.data}: the label party's {suffix} table needs --label-column")
    if flags.label_defence in ("gaussian", "marvell") and flags.label_defence_strength == 0:
        p.error(f"--label-defence {flags.label_defence} needs --label-defence-strength > 0")
    if flags.label_defence in ("none", "max-norm") and flags.label_defence_strength:
        p.error(
            f"--label-defence-strength applies to gaussian and marvell, not to --label-defence {flags.label_defence}"
        )
    if (flags.tls_cert is None) != (flags.tls_key is None):
        p.error("--tls-cert and --tls-key go together")
    if flags.tls_ca is not None and flags.tls_cert is None:
        p.error("--tls-ca needs --tls-cert and --tls-key (the server's own certificate)")
    flags.tokens = {}
    for item in flags.party_token or []:
        name, sep, file = item.partition("=")
        if not sep or not file:
            p.error(f"--party-token {item!r}: expected NAME=FILE")
        if name not in flags.party_names:
            p.error(f"--party-token {name}: not one of --parties {flags.party_names}")
        flags.tokens[name] = Path(file)
    if flags.tokens and set(flags.tokens) != set(flags.party_names):
        missing = sorted(set(flags.party_names) - set(flags.tokens))
        p.error(f"--party-token: give every party a token, or none (missing: {missing})")
    return flags


def main(argv: list[str] | None = None) -> int:
    """Serve until training ends; the exit status: 0, 1 if training failed, 2 for a set-up error."""
    flags = parse_args(argv)
    return tensorflow_setup.run_program("split-label-party", log, flags.log_level, lambda: run(flags))


def run(flags: argparse.Namespace) -> int:
    import keras

    from label_party.coordinator import EpochRecord
    from label_party.party import LabelParty
    from splitlearning import models, tables
    from splitlearning.label_defences import Kind, LabelDefence

    columns = flags.columns.split(",") if flags.columns else None
    table = tables.read_table(flags.data, id_column=flags.id_column, label_column=flags.label_column, columns=columns)
    if table.y is None:
        raise ValueError(f"--data {flags.data}: the label party's table holds no labels")
    loss, metrics, outputs, labels = _task(table.y)
    tokens = {name: security.read_token(path) for name, path in flags.tokens.items()}
    tls = security.server_tls(flags.tls_cert, flags.tls_key, flags.tls_ca)
    bottom = None
    if table.x is not None:
        features = table.x.shape[1]

        def bottom() -> Any:
            return models.dense_bottom(features, flags.cut_width, flags.hidden, flags.seed + 100, "own_bottom")

    def top() -> Any:
        if flags.top is not None:
            return keras.saving.load_model(flags.top)
        return models.dense_top(flags.hidden, outputs, flags.seed + 200)

    def on_epoch(record: EpochRecord) -> None:
        values = {**record.metrics, **record.test, **record.leakage}
        log.info(
            "epoch %d/%d (step %d): %s",
            record.epoch + 1,
            flags.epochs,
            record.step,
            "  ".join(f"{name} {value:.4f}" for name, value in values.items()),
        )

    party = LabelParty(
        top,
        loss,
        models.make_optimizer(flags.optimizer, flags.learning_rate),
        metrics,
        parties=flags.party_names,
        ids=table.ids,
        y=labels,
        x=table.x,
        bottom=bottom,
        fuse=flags.fuse,
        batch_size=flags.batch_size,
        epochs=flags.epochs,
        seed=flags.seed,
        test_fraction=flags.test_fraction,
        deadline=flags.deadline,
        device=flags.device,
        tls=tls,
        party_tokens=dict(tokens) or None,
        state_dir=flags.state_dir,
        checkpoint_every=flags.checkpoint_every,
        checkpoint_keep=flags.checkpoint_keep,
        max_ids=flags.max_ids,
        on_epoch=on_epoch,
        exact=flags.exact,
        label_defence=LabelDefence(Kind(flags.label_defence), flags.label_defence_strength, seed=flags.seed),
        leakage_meters=not flags.no_leakage_meters,
        metrics_port=flags.metrics_port,
        metrics_host=flags.metrics_host,
    )
    port = party.start(flags.address)
    cli.write_ports(port, flags.port_file, party.metrics_port, flags.metrics_port_file)
    log.info("label party serving on port %d for %s; %d ids", port, ", ".join(flags.party_names), len(table.ids))
    party.wait()
    party.stop()
    if party.failed is not None:
        log.error("the run cannot go on: %s", party.failed)
        return 1
    trainer = party.trainer
    assert trainer is not None
    if flags.save_model is not None:
        trainer.settle()
        trainer.model.save(flags.save_model)
        log.info("wrote the label party's part to %s", flags.save_model)
    if flags.predictions is not None:
        _write_predictions(flags.predictions, party.test_ids(), party.predictions)
    if flags.history_json is not None:
        flags.history_json.write_text(
            json.dumps(
                [{"epoch": r.epoch + 1, "step": r.step, **r.metrics, **r.test, **r.leakage} for r in party.history],
                indent=1,
            )
        )
    coordinator = party.coordinator
    assert coordinator.order is not None and coordinator.rows is not None
    print(
        f"aligned rows {len(coordinator.rows)} (train {coordinator.order.train_rows}, held out "
        f"{coordinator.order.test_rows}); steps {coordinator.position}"
    )
    final = party.history[-1] if party.history else None
    if final is not None:
        print("final: " + "  ".join(f"{k} {v:.4f}" for k, v in {**final.metrics, **final.test}.items()))
    return 0


def _task(y: Any) -> tuple[Any, list[Any], int, Any]:
    """Loss, metrics, output width and labels as the loss takes them: binary (0/1: one logit, BCE, accuracy and
    AUC; labels float32 [rows, 1]), else classes (sparse categorical cross-entropy, accuracy)."""
    import keras
    import numpy as np

    if y.dtype.kind != "i" or y.ndim != 1:
        raise ValueError(f"--label-column: expected integer class labels, got {y.dtype} of shape {list(y.shape)}")
    classes = int(y.max()) + 1
    if y.min() < 0:
        raise ValueError(f"--label-column: class labels must be 0, 1, ..., got {int(y.min())}")
    if classes <= 2:
        loss = keras.losses.BinaryCrossentropy(from_logits=True)
        metrics = [keras.metrics.BinaryAccuracy(threshold=0.0, name="accuracy"), keras.metrics.AUC(from_logits=True)]
        return loss, metrics, 1, y.astype(np.float32).reshape(-1, 1)
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True), ["accuracy"], classes, y


def _write_predictions(path: Path, ids: list[Any], outputs: Any) -> None:
    import numpy as np

    outputs = np.asarray(outputs).reshape(len(ids), -1)
    lines = ["id," + ",".join(f"output_{i}" for i in range(outputs.shape[1]))]
    lines += [f"{value}," + ",".join(f"{v:.9g}" for v in row) for value, row in zip(ids, outputs, strict=True)]
    path.write_text("\n".join(lines) + "\n")
    log.info("wrote %d held-out predictions to %s", len(ids), path)
