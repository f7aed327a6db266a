"""`split-feature-party`: a feature party of a vertical split: align its ids with the label party's, then train
its bottom part with it until the label party's last epoch (docs/vertical.md, "Running it")."""

from __future__ import annotations

import argparse
import logging
import sys
import zlib
from pathlib import Path

from splitlearning import logs, tensorflow_setup

logs.quiet_grpc(sys.argv[1:])  # before grpc is imported (below, through security)

from splitlearning import addresses, cli, security  # noqa: E402

log = logging.getLogger("split-feature-party")
FUSES = ("concat", "sum", "mean")


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="split-feature-party",
        description="A feature party of a vertical split: holds some columns about the label party's samples "
        "(no labels), aligns ids by private set intersection, and trains its bottom part with the label party.",
    )
    groups = cli.groups(parser, "data", "model", "training", "connection", "checkpoints", "observability")
    data = groups["data"]
    cli.add(data, "--name", required=True, help="this party's name: one of the label party's --parties")
    cli.add(data, "--data", type=Path, required=True, help="this party's table: .npz (ids, x), .csv or .parquet")
    cli.add(data, "--id-column", default=None, help=".csv/.parquet: the column of sample ids")
    cli.add(data, "--columns", default=None, help="comma-separated feature columns (default: all but the id)")
    model = groups["model"]
    cli.add(model, "--bottom", type=cli.keras_file, default=None, help="a .keras bottom model over the columns")
    cli.add(model, "--hidden", type=cli.POSITIVE_INT, default=32, help="built-in bottom: its hidden layer's width")
    cli.add(model, "--cut-width", type=cli.POSITIVE_INT, default=16, help="built-in bottom: its IV's width")
    cli.add(model, "--device", default="/CPU:0", help="device to pin this process to: /CPU:0, /GPU:0, ...")
    training = groups["training"]
    cli.add(training, "--optimizer", default="adam", help="any Keras optimizer name: sgd, adam, rmsprop, ...")
    cli.add(training, "--learning-rate", type=cli.positive, default=3e-3, help="the optimizer's learning rate")
    cli.add(
        training,
        "--init-seed",
        type=cli.NON_NEGATIVE_INT,
        default=None,
        help="seed of the built-in bottom's weights (default: one derived from --name, so parties differ)",
    )
    cli.add(
        training,
        "--seed",
        type=cli.NON_NEGATIVE_INT,
        default=None,
        help="the batch order's seed this party expects (default: the label party's; a different one is refused)",
    )
    cli.add(training, "--fuse", default=None, choices=FUSES, help="the fuse this party expects (default: any)")
    cli.add(training, "--batch-size", type=cli.POSITIVE_INT, default=None, help="the batch size it expects")
    cli.add(
        training,
        "--nopeek-alpha",
        type=cli.NON_NEGATIVE,
        default=0.0,
        help="NoPeek: add ALPHA * dCor(columns, IV) to this part's loss, so the IV tells less of the columns",
    )
    cli.add(
        training,
        "--leakage-samples",
        type=cli.NON_NEGATIVE_INT,
        default=4,
        help="batches per epoch whose columns and IVs give input_dcor (0: no meter)",
    )
    connection = groups["connection"]
    cli.add(connection, "--server", required=True, help="the label party's host:port")
    security.add_client_flags(connection)
    cli.add(
        connection,
        "--retry-timeout",
        type=cli.positive,
        default=120.0,
        help="seconds to keep retrying a call while the label party (or another party) is not there",
    )
    cli.add(connection, "--max-ids", type=cli.POSITIVE_INT, default=1_000_000, help="the most ids any party may hold")
    state = groups["checkpoints"]
    cli.add(state, "--state-dir", type=Path, default=None, help="keep the alignment and checkpoints here; resume")
    cli.add(state, "--checkpoint-every", type=cli.NON_NEGATIVE_INT, default=100, help="steps between checkpoints")
    cli.add(state, "--checkpoint-keep", type=cli.number(int, 2), default=5, help="checkpoints to keep (at least 2)")
    cli.add(groups["checkpoints"], "--save-model", type=cli.keras_file, default=None, help="write this party's bottom")
    cli.add_log_flags(groups["observability"])
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = parser()
    flags = p.parse_args(argv)
    suffix = flags.data.suffix.lower()
    if suffix in (".csv", ".parquet") and flags.id_column is None:
        p.error(f"--data {flags.data}: a {suffix} table needs --id-column")
    if suffix == ".npz" and flags.id_column:
        p.error("--id-column applies to .csv/.parquet tables; an .npz holds arrays ids and x")
    try:
        addresses.split_host_port(flags.server, "--server")
    except ValueError as error:
        p.error(str(error))
    return flags


def main(argv: list[str] | None = None) -> int:
    """Train until the label party's last step; the exit status: 0, 1 if the label party refused, 2 set-up."""
    flags = parse_args(argv)
    return tensorflow_setup.run_program("split-feature-party", log, flags.log_level, lambda: run(flags))


def run(flags: argparse.Namespace) -> int:
    import keras

    from feature_party.link import Refused
    from feature_party.party import FeatureParty
    from splitlearning import models, tables

    columns = flags.columns.split(",") if flags.columns else None
    table = tables.read_table(flags.data, id_column=flags.id_column, columns=columns)
    if table.x is None:
        raise ValueError(f"--data {flags.data}: no feature columns; a feature party needs some")
    if table.y is not None:
        log.warning("--data %s holds labels: a feature party never uses or sends them", flags.data)
    features = table.x.shape[1]
    # Parties with the same columns' count must not start from the same weights unless asked to.
    init_seed = flags.init_seed if flags.init_seed is not None else zlib.crc32(flags.name.encode()) % 2**31
    if flags.bottom is not None:
        path = flags.bottom

        def bottom() -> keras.Model:
            return keras.saving.load_model(path)

    else:

        def bottom() -> keras.Model:
            return models.dense_bottom(features, flags.cut_width, flags.hidden, init_seed, flags.name)

    tls = security.client_tls(flags.tls_cert, flags.tls_key, flags.tls_ca, flags.tls_server_name, flags.tls)
    token = security.read_token(flags.auth_token_file) if flags.auth_token_file else None
    party = FeatureParty(
        bottom,
        models.make_optimizer(flags.optimizer, flags.learning_rate),
        name=flags.name,
        ids=table.ids,
        x=table.x,
        target=flags.server,
        seed=flags.seed,
        fuse=flags.fuse or "",
        batch_size=flags.batch_size or 0,
        device=flags.device,
        tls=tls,
        auth_token=token,
        state_dir=flags.state_dir,
        checkpoint_every=flags.checkpoint_every,
        checkpoint_keep=flags.checkpoint_keep,
        retry_timeout=flags.retry_timeout,
        max_ids=flags.max_ids,
        nopeek_alpha=flags.nopeek_alpha,
        leakage_samples=flags.leakage_samples,
    )
    try:
        summary = party.fit()
    except Refused as error:
        log.error("%s", error)
        return 1
    if flags.save_model is not None:
        party.trainer.model.save(flags.save_model)
        log.info("wrote %s's bottom to %s", flags.name, flags.save_model)
    print(
        f"{flags.name}: aligned rows {summary.aligned_rows} of its {len(table.ids)}; steps {summary.steps} "
        f"(final step {summary.final_step}) in {summary.seconds:.1f} s; rejoins {summary.rejoins}"
    )
    return 0
