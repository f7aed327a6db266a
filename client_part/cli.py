"""`split-client`: train the first part of a split model against a `split-server`, on data it keeps."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from splitlearning import logs, tensorflow_setup

logs.quiet_grpc(sys.argv[1:])  # before grpc is imported (below, through security)

from splitlearning import cli, devices, security, shards  # noqa: E402
from splitlearning.approximations import Approximations  # noqa: E402
from splitlearning.protocol import Reason  # noqa: E402

if TYPE_CHECKING:
    import keras

    from client_part.client import SplitClient
    from client_part.privacy import GaussianNoise
    from splitlearning.data import Dataset

log = logging.getLogger("split-client")
# splitlearning.label_defences.KINDS, written out: parsing the flags imports no numpy (tests/test_privacy.py).
LABEL_DEFENCES = ("none", "gaussian", "max-norm", "marvell")


@dataclass(frozen=True, kw_only=True)
class ClientConfig(cli.ProcessConfig):
    target: str
    dataset: str
    batch_size: int
    epochs: int
    no_shuffle: bool
    connect_timeout: float
    wire_encoding: str
    micro_batches: int
    history_json: Path | None
    plot: Path | None
    tls: bool = False
    tls_server_name: str | None = None
    head: str | None = None
    loss: str | None = None
    metrics: str | None = None
    clip_norm: float | None = None
    noise_multiplier: float = 0.0
    nopeek_alpha: float = 0.0
    label_defence: str = "none"
    label_defence_strength: float = 0.0
    no_leakage_meters: bool = False
    leakage_samples: int = 4
    rpc_timeout: float = 60.0
    retry_timeout: float = 120.0
    session: str = ""
    validation_split: float = 0.1
    shard: shards.Shard | None = None
    shard_by: str = "random"
    group: str | None = None
    scheme: str = "splitfed"
    rounds: int = 5
    local_epochs: int = 1
    member: int | None = None
    aggregator: str | None = None
    handover_dir: Path | None = None
    save_head: Path | None = None
    predict: Path | None = None
    predictions: Path | None = None
    stale_gradients: bool = False
    local_loss: bool = False
    top_k: float = 0.0


_GROUPS = ("connection", "model", "data", "training", "rounds", "device", "checkpoints", "security", "observability")


def parse_args(argv: list[str] | None = None) -> ClientConfig:
    parser = argparse.ArgumentParser(prog="split-client", usage="%(prog)s [FLAG VALUE ...]", description=__doc__)
    groups = cli.groups(parser, *_GROUPS)
    add_connection_flags(groups["connection"])
    cli.add_process_flags(groups, part="first")  # --model, --device, --optimizer, --log-level, ... first in theirs
    add_model_flags(groups["model"])
    add_data_flags(groups["data"])
    add_training_flags(groups["training"])
    add_round_flags(groups["rounds"])
    add_security_flags(groups["security"])
    cli.add_checkpoint_flags(groups["checkpoints"])
    add_save_flags(groups["checkpoints"])
    add_observability_flags(groups["observability"])
    flags = vars(parser.parse_args(argv))
    check_shard_flags(parser, flags)
    check_predict_flags(parser, flags)  # before the round flags' check, which gives --epochs its default
    check_round_flags(parser, flags)
    check_privacy_flags(parser, flags)
    check_approximation_flags(parser, flags)
    return ClientConfig(**flags)


def approximations_of(flags: dict[str, Any]) -> Approximations:
    return Approximations(flags["stale_gradients"], flags["local_loss"], flags["top_k"])


def check_approximation_flags(parser: argparse.ArgumentParser, flags: dict[str, Any]) -> None:
    """--stale-gradients, --local-loss and --top-k belong to a single client's training run (one line each;
    building the client refuses what does not fit together, the cut, --micro-batches, the noise or the encoding)."""
    given = [flag for flag in ("stale_gradients", "local_loss", "top_k") if flags[flag]]
    if not given:
        return
    flag = "--" + given[0].replace("_", "-")
    if flags["group"] is not None:
        parser.error(f"{flag} applies to a single client's run, not to a --group member's")
    if flags["predict"] is not None:
        parser.error(f"{flag} applies to training, not to --predict")


def check_privacy_flags(parser: argparse.ArgumentParser, flags: dict[str, Any]) -> None:
    """The label defence's flags fit together and the cut (one line each, before anything starts)."""
    defence, strength = flags["label_defence"], flags["label_defence_strength"]
    if defence != "none" and flags["cut"] != "ushape":
        parser.error(
            f"--label-defence {defence}: only --cut ushape sends gradients about its labels (in the standard cut "
            "the labels themselves go to the server)"
        )
    if defence in ("gaussian", "marvell") and strength == 0:
        parser.error(f"--label-defence {defence} needs --label-defence-strength > 0")
    if defence in ("none", "max-norm") and strength:
        parser.error(f"--label-defence-strength applies to gaussian and marvell, not to --label-defence {defence}")


def add_save_flags(parser: cli.Flags) -> None:
    """What the run writes of its trained part at the end."""
    cli.add(parser, "--save-weights", type=Path, default=None, help="write the final weights here (.npz)")
    cli.add(
        parser,
        "--save-model",
        type=cli.keras_file,
        default=None,
        help="write the trained first part here as a Keras file (.keras): --model takes it back, to train on or "
        "to predict; split-join joins it with the server's",
    )
    cli.add(
        parser,
        "--save-head",
        type=cli.keras_file,
        default=None,
        help="--cut ushape: write the trained head here as a Keras file (.keras); --head takes it back",
    )


def check_predict_flags(parser: argparse.ArgumentParser, flags: dict[str, Any]) -> None:
    """--predict and --predictions go together, and exclude training's own flags."""
    if (flags["predict"] is None) != (flags["predictions"] is None):
        parser.error("--predict FILE and --predictions FILE go together (the inputs, and where their outputs go)")
    if flags["predict"] is None:
        return
    training = [
        flag
        for flag, given in (
            ("--epochs", flags["epochs"] is not None),
            ("--group", flags["group"] is not None),
            ("--save-weights", flags["save_weights"] is not None),
            ("--save-model", flags["save_model"] is not None),
            ("--save-head", flags["save_head"] is not None),
            ("--checkpoint-dir", flags["checkpoint_dir"] is not None),
        )
        if given
    ]
    if training:
        parser.error(f"--predict trains nothing: drop {', '.join(training)}")
    for flag in ("predict", "predictions"):
        if flags[flag].suffix not in (".npy", ".csv") + ((".npz",) if flag == "predict" else ()):
            kinds = ".npz, .npy or .csv" if flag == "predict" else ".npy or .csv"
            parser.error(f"--{flag} {flags[flag]}: expected a {kinds} file")


def add_connection_flags(parser: cli.Flags) -> None:
    """Where the server is, how long to wait for it, and which session and wire encoding to ask for."""
    cli.add(parser, "--target", default="127.0.0.1:50051", help="the split-server's host:port")
    cli.add(
        parser, "--connect-timeout", type=cli.positive, default=60.0, help="seconds to wait for the server at start"
    )
    cli.add(
        parser,
        "--rpc-timeout",
        type=cli.positive,
        default=60.0,
        help="deadline of every call (each step) in seconds",
    )
    cli.add(
        parser,
        "--retry-timeout",
        type=cli.NON_NEGATIVE,
        default=120.0,
        help="seconds to keep retrying a failed call",
    )
    cli.add(
        parser,
        "--session",
        default="",
        help="train in this session (the id a run printed) to resume it; default: the one in --checkpoint-dir, "
        "else a new session",
    )
    cli.add(
        parser,
        "--wire-encoding",
        default="raw",
        choices=["raw", "float16", "bfloat16", "int8"],
        help="encoding of the IV and its gradient on the wire; the server must allow it (--wire-encodings)",
    )


def add_model_flags(parser: cli.Flags) -> None:
    """The cut, and the U-shape's head, loss and metrics."""
    cli.add(
        parser,
        "--cut",
        default="standard",
        choices=["standard", "ushape"],
        help="ushape: this client also holds the head and the loss, so labels never leave it",
    )
    cli.add(parser, "--head", default=None, help="--cut ushape: the head part (default: --model's head)")
    cli.add(parser, "--loss", default=None, help="--cut ushape: Keras loss name (default: the model pair's)")
    cli.add(parser, "--metrics", default=None, help="--cut ushape: comma-separated metric names (default: accuracy)")


def add_data_flags(parser: cli.Flags) -> None:
    """The data set, its validation split, its order and this data holder's shard of it."""
    cli.add(parser, "--dataset", default="digits", help="'digits' (bundled) or an .npz with x_train, y_train, ...")
    cli.add(
        parser,
        "--validation-split",
        type=cli.number(float, 0, 1, high_open=True),
        default=0.1,
        help="validate each epoch on this last fraction of the training data (0: no validation); "
        "the test split is only used for the final evaluation",
    )
    cli.add(parser, "--no-shuffle", action="store_true", help="keep the data order (default: reshuffle each epoch)")
    cli.add(
        parser,
        "--predict",
        type=Path,
        default=None,
        help="train nothing: predict on this file's inputs with the trained parts (--model PART.keras here, the "
        "server's part there): .npz (its x, else x_test), .npy, or .csv (a header row, then one row of numbers "
        "per sample); needs --predictions",
    )
    cli.add(
        parser,
        "--predictions",
        type=Path,
        default=None,
        help="with --predict: write the model's outputs here, one row per input sample (.npy, or .csv with a header)",
    )
    cli.add(
        parser,
        "--shard",
        type=shards.parse,
        default=None,
        metavar="K/N",
        help="train on the K-th of N parts of the training split (the other data holders take the others) "
        "(default: all of it)",
    )
    cli.add(
        parser,
        "--shard-by",
        choices=shards.BY,
        default=None,  # None: not given, so that --shard-by without --shard is refused
        help="how the training split is cut into shards: random (IID) or by label (non-IID: each shard holds a few "
        "classes); needs --shard (default: random)",
    )


def add_training_flags(parser: cli.Flags) -> None:
    """Batch size, epochs and micro-batch pipelining."""
    cli.add(parser, "--batch-size", type=cli.POSITIVE_INT, default=64, help="samples per training step")
    cli.add(
        parser,
        "--epochs",
        type=cli.POSITIVE_INT,
        default=None,
        help="passes over the training data (default: 10; with --group: --rounds and --local-epochs)",
    )
    cli.add(
        parser,
        "--micro-batches",
        type=cli.POSITIVE_INT,
        default=1,
        help="pipeline each step in this many micro-batches (forward, transfer and server work overlap)",
    )
    # Beyond the exact split (docs/performance.md, "Beyond exact"): each is off unless given, and the server must
    # allow it (split-server --allow-approximations).
    cli.add(
        parser,
        "--stale-gradients",
        action="store_true",
        help="not exact: send step s+1 before step s's gradient comes back, and apply that gradient one step late",
    )
    cli.add(
        parser,
        "--local-loss",
        action="store_true",
        help="not exact: train the first part on a local auxiliary head and loss; never wait for the server's gradient",
    )
    cli.add(
        parser,
        "--top-k",
        type=float,
        default=0.0,
        metavar="FRACTION",
        help="not exact: send only this fraction (0 < f < 1) of the IV's and its gradient's largest entries, with "
        "error feedback",
    )


def add_security_flags(parser: cli.Flags) -> None:
    """TLS and the token (as every client takes them), then the IV's clipping and noise."""
    security.add_client_flags(parser)
    cli.add(
        parser,
        "--clip-norm",
        type=cli.positive,
        default=None,
        help="clip each sample's IV to this L2 norm when sent",
    )
    cli.add(
        parser,
        "--noise-multiplier",
        type=cli.NON_NEGATIVE,
        default=0.0,
        help="add Gaussian noise of stddev MULTIPLIER * --clip-norm to every IV sent (needs --clip-norm)",
    )
    cli.add(
        parser,
        "--nopeek-alpha",
        type=cli.NON_NEGATIVE,
        default=0.0,
        help="NoPeek: add ALPHA * dCor(input, IV) to this part's loss, so the IV tells less of the input",
    )
    cli.add(
        parser,
        "--label-defence",
        default="none",
        choices=LABEL_DEFENCES,
        help="--cut ushape: noise the gradients sent to the server against label leakage (docs/security.md)",
    )
    cli.add(
        parser,
        "--label-defence-strength",
        type=cli.NON_NEGATIVE,
        default=0.0,
        help="gaussian: noise norm per gradient norm; marvell: power budget per squared class-mean gap",
    )
    cli.add(
        parser,
        "--no-leakage-meters",
        action="store_true",
        help="do not measure leakage (input_dcor; in the U-shape leak_norm_auc, leak_direction_auc) per epoch",
    )
    cli.add(
        parser,
        "--leakage-samples",
        type=cli.POSITIVE_INT,
        default=4,
        help="batches per epoch whose inputs and IVs give input_dcor",
    )


def add_observability_flags(parser: cli.Flags) -> None:
    """TensorBoard scalars, the history as JSON, and the curves as a PNG."""
    cli.add(parser, "--log-dir", type=Path, default=None, help="write TensorBoard scalars under DIR/client")
    cli.add(
        parser,
        "--log-every",
        type=cli.POSITIVE_INT,
        default=1,
        help="write per-step TensorBoard scalars every N steps",
    )
    cli.add(parser, "--history-json", type=Path, default=None, help="write the training history here as JSON")
    cli.add(parser, "--plot", type=Path, default=None, help="draw the training/validation curves to this PNG")


def check_shard_flags(parser: argparse.ArgumentParser, flags: dict[str, Any]) -> None:
    """--shard-by needs --shard, or one line says so; fills in its default."""
    if flags["shard_by"] is not None and flags["shard"] is None:
        parser.error(f"--shard-by {flags['shard_by']} needs --shard K/N (which of the N parts to train on)")
    flags["shard_by"] = flags["shard_by"] or "random"


_ROUND_FLAGS = ("scheme", "rounds", "local_epochs", "member", "aggregator", "handover_dir")
_ROUND_DEFAULTS = {"scheme": "splitfed", "rounds": 5, "local_epochs": 1}


def add_round_flags(parser: cli.Flags) -> None:
    cli.add(
        parser,
        "--group",
        default=None,
        help="train as a member of this group (1-128 of A-Z a-z 0-9 _ -) with the other data holders, in rounds "
        "the aggregator keeps (docs/multi_client.md)",
    )
    cli.add(
        parser,
        "--scheme",
        choices=["splitfed", "round-robin"],
        default=None,
        help="splitfed: members train in parallel and both parts are averaged each round; round-robin: members "
        "take turns on one model (default: splitfed)",
    )
    cli.add(parser, "--rounds", type=cli.POSITIVE_INT, default=None, help="rounds to train (default: 5)")
    cli.add(
        parser,
        "--local-epochs",
        type=cli.POSITIVE_INT,
        default=None,
        help="passes over this member's data in each round (round-robin: in each turn) (default: 1)",
    )
    cli.add(
        parser,
        "--member",
        type=cli.POSITIVE_INT,
        default=None,
        help="this member's number, from 1 (round-robin: its place in the turn order); default: K of --shard K/N",
    )
    cli.add(parser, "--aggregator", default=None, help="the aggregator's host:port (default: --target's)")
    cli.add(
        parser,
        "--handover-dir",
        type=Path,
        default=None,
        help="round-robin: hand each turn's first part to the next member through a file here (a folder every "
        "member shares) instead of through the aggregator",
    )


def check_round_flags(parser: argparse.ArgumentParser, flags: dict[str, Any]) -> None:
    """The group flags make sense together, or one line says why not; fills in their defaults."""
    given = [f"--{name.replace('_', '-')}" for name in _ROUND_FLAGS if flags[name] is not None]
    if flags["group"] is None:
        if given:
            parser.error(f"{', '.join(given)}: only with --group NAME (training as a member of a group)")
        if flags["epochs"] is None:
            flags["epochs"] = 10
        for name, default in _ROUND_DEFAULTS.items():
            flags[name] = default
        return
    if flags["epochs"] is not None:
        parser.error("--epochs: with --group, a member trains --local-epochs passes in each of --rounds rounds")
    for name, value in (("--checkpoint-dir", flags["checkpoint_dir"]), ("--session", flags["session"])):
        if value:
            parser.error(
                f"{name}: not with --group (a member needs neither: the aggregator keeps each round's start, and a "
                "restarted member trains its round again)"
            )
    if flags["member"] is None:
        if flags["shard"] is None:
            parser.error("--group needs --member K (or --shard K/N, whose K is the member)")
        flags["member"] = flags["shard"].index
    if flags["handover_dir"] is not None and flags["scheme"] != "round-robin":
        parser.error("--handover-dir: only with --scheme round-robin (it hands a turn to the next member)")
    for name, default in _ROUND_DEFAULTS.items():
        if flags[name] is None:
            flags[name] = default
    flags["epochs"] = flags["rounds"] * flags["local_epochs"]


class Interrupts:
    """SIGINT and SIGTERM: the first asks the client to stop as soon as it can (before there is a client, it
    stops at once); a second one exits at once. The exit status is 128 + the signal's number (130, 143)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.client: Any = None  # the SplitClient, once made

    def install(self) -> None:
        signal.signal(signal.SIGINT, self.handle)
        signal.signal(signal.SIGTERM, self.handle)

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or signal.SIGINT)

    def handle(self, signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:
            os.write(2, f"split-client: {name} again: exiting at once\n".encode())
            os._exit(128 + signum)
        self.signum = signum
        if self.client is None:
            raise KeyboardInterrupt(f"stopped on request ({name}) while starting")
        log.warning("%s: stopping as soon as possible (again to exit at once)", name)
        self.client.request_stop()


@dataclass(frozen=True)
class Data:
    """This client's data: the training split it holds (its shard's, less the validation), the validation held out
    of it (None: none), and the test split, from `dataset`."""

    dataset: Dataset
    train: tuple[Any, Any]
    validation: tuple[Any, Any] | None

    @property
    def test(self) -> tuple[Any, Any]:
        return self.dataset.x_test, self.dataset.y_test


@dataclass(frozen=True)
class Outcome:
    """What one training run gives to report: its history, the test scores, its time and its steps."""

    history: keras.callbacks.History
    test: dict[str, float]
    elapsed: float
    session: str
    start_step: int
    link: dict[str, Any] | None = None


def run(config: ClientConfig, interrupts: Interrupts | None = None) -> dict[str, float]:
    cli.setup_logging(config.log_level, config.log_format)
    devices.setup_process(config.cpus, config.threads)
    if config.predict is not None:
        return predict(config, interrupts)
    data = load_data(config)
    client = build_client(config, data.dataset.x_train.shape[1:], config.dataset, data.dataset.y_train)
    if interrupts is not None:
        interrupts.client = client
    if config.group is not None:
        from client_part.group_cli import run_member

        return run_member(config, client, data.train, data.validation, data.test)
    connect(client, config)
    outcome = train_and_test(client, config, data)
    report(client, config, outcome)
    return outcome.test


def load_data(config: ClientConfig) -> Data:
    """The data set, this client's shard of its training split, and the validation held out of that."""
    from splitlearning import data

    dataset = data.load(config.dataset, seed=config.seed)
    x_train, y_train = dataset.x_train, dataset.y_train
    if config.shard is not None:
        try:
            x_train, y_train = shards.take(x_train, y_train, config.shard, config.shard_by, config.seed)
        except ValueError as error:
            raise ValueError(f"--shard {config.shard} --shard-by {config.shard_by}: {error}") from None
        log.info("%s", shards.describe(y_train, config.shard, config.shard_by))
    elif config.shard_by != "random":
        raise ValueError(f"--shard-by {config.shard_by} needs --shard K/N (which of the N parts to train on)")
    held_by = len(x_train)  # the samples this client holds, its shard's if any: the validation comes out of them
    x_train, y_train, validation = data.hold_out(x_train, y_train, config.validation_split)
    part = f" of shard {config.shard}" if config.shard is not None else ""
    if validation:
        held = f", {len(x_train)}{part} to train on and {held_by - len(x_train)} to validate"
    else:
        held = f", {held_by}{part} to train on" if part else ""
    log.info("data: %s%s", dataset, held)
    return Data(dataset, (x_train, y_train), validation)


def build_client(
    config: ClientConfig, sample_shape: tuple[int, ...] | None, data_name: str, train_labels: Any = None
) -> SplitClient:
    """The `SplitClient` the flags describe, its first part checked against the data's samples (`sample_shape`,
    unless None; `data_name`, the flag's value naming them, for the message). `train_labels` give the class the
    label-leakage meter and defence score (1 for binary labels, else the most frequent)."""
    from client_part.client import SplitClient
    from client_part.retry import RetryPolicy
    from splitlearning.label_defences import Kind, LabelDefence
    from splitlearning.leakage import positive_class
    from splitlearning.models import input_mismatch, load_part, make_optimizer
    from splitlearning.training.local_loss import classes_of

    positive = positive_class(train_labels) if train_labels is not None else 1
    approximations = approximations_of(vars(config))

    head = head_arguments(config)
    noise = noise_of(config)
    client = SplitClient(
        model=load_part(config.model, "client", config.seed),
        optimizer=make_optimizer(config.optimizer, config.learning_rate),
        target=config.target,
        device=config.device,
        max_batch_size=max(config.batch_size, 1),
        connect_timeout=config.connect_timeout,
        tls=security.client_tls(
            config.tls_cert, config.tls_key, config.tls_ca, config.tls_server_name, enabled=config.tls
        ),
        auth_token=security.read_token(config.auth_token_file) if config.auth_token_file else None,
        noise=noise,
        **head,
        wire_encoding=config.wire_encoding,
        micro_batches=config.micro_batches,
        rpc_timeout=config.rpc_timeout,
        checkpoint_dir=config.checkpoint_dir,
        checkpoint_every=config.checkpoint_every,
        checkpoint_keep=config.checkpoint_keep,
        retry=RetryPolicy(timeout=config.retry_timeout),
        session_id=config.session,
        nopeek_alpha=config.nopeek_alpha,
        label_defence=LabelDefence(Kind(config.label_defence), config.label_defence_strength, positive, config.seed),
        leakage_meters=not config.no_leakage_meters,
        leakage_samples=config.leakage_samples,
        leak_positive=positive,
        approximations=approximations,
        # The local loss's default head: one logit per class of the training labels.
        local_classes=classes_of(train_labels) if approximations.local_loss and train_labels is not None else None,
    )
    mismatch = input_mismatch(client.model, sample_shape, config.model, data_name) if sample_shape else None
    if mismatch:
        client.close()
        raise ValueError(mismatch)
    return client


def head_arguments(config: ClientConfig) -> dict[str, Any]:
    """`SplitClient`'s head, loss and metrics for --cut ushape (none for the standard cut)."""
    from splitlearning.models import BUILTIN, load_part

    if config.cut == "ushape":
        pair = BUILTIN.get(config.model)
        return {
            "head": load_part(config.head or config.model, "head", config.seed),
            "loss": config.loss or (pair.loss if pair else None),
            "metrics": config.metrics.split(",") if config.metrics else list(pair.metrics) if pair else None,
        }
    if config.head or config.loss or config.metrics:
        raise ValueError("--head, --loss and --metrics belong to --cut ushape")
    return {}


def noise_of(config: ClientConfig) -> GaussianNoise | None:
    """The IV's clipping and noise (`GaussianNoise`), None without --clip-norm; a group's member noises its own."""
    from client_part.privacy import GaussianNoise, member_seed

    if config.noise_multiplier and config.clip_norm is None:
        raise ValueError("--noise-multiplier needs --clip-norm (the noise is scaled to the clipping norm)")
    seed = member_seed(config.seed, config.member if config.group else None)
    return GaussianNoise(config.clip_norm, config.noise_multiplier, seed) if config.clip_norm else None


def train_and_test(client: SplitClient, config: ClientConfig, data: Data) -> Outcome:
    """Train, evaluate on the test split, write the weights (--save-weights) and end the session."""
    from client_part.tensorboard_log import TensorBoardLogger

    start_step = client.step  # after a resume, the step the session was at
    tensorboard = TensorBoardLogger(client, config.log_dir, config.log_every) if config.log_dir else None
    with client:
        started = time.perf_counter()
        history = client.fit(
            *data.train,
            batch_size=config.batch_size,
            epochs=config.epochs,
            shuffle=not config.no_shuffle,
            validation_data=data.validation,
            seed=config.seed,
            verbose=1 if sys.stdout.isatty() else 2,
            callbacks=[tensorboard] if tensorboard else None,
        )
        elapsed = time.perf_counter() - started
        test = client.evaluate(*data.test, batch_size=config.batch_size)
        link = measure_link(client)
        save_parts(client, config)
        session = client.session_id
        client.end_session()
    if tensorboard:
        tensorboard.close()
    return Outcome(history, test, elapsed, session, start_step, link)


def measure_link(client: SplitClient) -> dict[str, Any] | None:
    """The link the run trained over (round trip, throughput each way), for the summary; None if the server
    cannot be probed (one that predates `Probe`)."""
    from client_part.transport import RemoteError

    try:
        estimate = client.measure_link()
    except RemoteError as error:
        log.warning("the link was not measured: %s", error)
        return None
    log.info("link to %s: %s", client.target, estimate.describe())
    return estimate.as_dict()


def save_parts(client: SplitClient, config: ClientConfig) -> None:
    """--save-weights, --save-model, --save-head: the trained parts, as the run ends."""
    from splitlearning.checkpoint import save_model, save_weights

    if config.save_weights:
        save_weights(config.save_weights, client.model, client.trainer.optimizer)
    if config.save_model:
        save_model(config.save_model, client.inference_model)
        top_k = " (with its top-k)" if client.approximations.top_k else ""
        log.info("first part written to %s%s", config.save_model, top_k)
    if config.save_head:
        if client.head is None:
            raise ValueError("--save-head: this client holds no head (only with --cut ushape)")
        save_model(config.save_head, client.head.model)
        log.info("head written to %s", config.save_head)


def predict(config: ClientConfig, interrupts: Interrupts | None) -> dict[str, float]:
    """--predict: the trained model's outputs for the file's inputs, over the cut, written to --predictions."""
    import numpy as np

    from splitlearning.data import read_inputs, write_outputs
    from splitlearning.models import input_mismatch

    assert config.predict is not None and config.predictions is not None
    x = read_inputs(config.predict)
    client = build_client(config, None, str(config.predict))
    takes = tuple(client.model.input_shape[1:])
    if x.ndim == 2 and len(takes) > 1 and None not in takes and x.shape[1] == int(np.prod(takes)):
        x = x.reshape(len(x), *takes)  # a table's rows, one flattened sample each
    mismatch = input_mismatch(client.model, x.shape[1:], config.model, str(config.predict))
    if mismatch:
        client.close()
        raise ValueError(mismatch.replace("--dataset", "--predict"))
    if interrupts is not None:
        interrupts.client = client
    connect(client, config)
    with client:
        started = time.perf_counter()
        outputs = client.predict(x, batch_size=config.batch_size, verbose=1 if sys.stdout.isatty() else 0)
        seconds = time.perf_counter() - started
        client.end_session()
    write_outputs(config.predictions, outputs)
    rate = len(x) / max(seconds, 1e-9)
    print(f"predicted {len(x):,} samples in {seconds:.2f} s ({rate:,.0f} samples/s); outputs {list(outputs.shape)}")
    print(f"written to {config.predictions}")
    return {"samples": float(len(x)), "seconds": seconds, "samples_per_second": rate}


def report(client: SplitClient, config: ClientConfig, outcome: Outcome) -> None:
    """Print the summary, and write the history (--history-json) and the curves (--plot)."""
    from client_part import summary

    history, test, session = outcome.history, outcome.test, outcome.session
    totals = client.meter.totals
    result = summary.summarize(
        history.history,
        test,
        totals,
        history.epoch,
        outcome.elapsed,
        config.epochs,
        client.step,
        outcome.start_step,
        outcome.link,
        client.approximations.names,
    )
    print("\n" + summary.headline(result))
    print(f"session {session} (ended on the server)")
    print("test " + ", ".join(f"{name}: {value:.4f}" for name, value in test.items()))
    print(summary.table(result))
    if config.history_json:
        payload = {
            "history": history.history,
            "test": test,
            "steps": client.step,
            "session": session,
            "seconds": outcome.elapsed,
            "summary": result,
        }
        config.history_json.write_text(json.dumps(payload, indent=2))
    if config.plot:
        from client_part.plot import write_plot

        log.info("curves drawn to %s", write_plot(history.history, config.plot))


def connect(client: Any, config: ClientConfig) -> None:
    """Join the server; a refused cut (the two parts do not fit) names the flag that picks them."""
    from client_part.transport import RemoteError

    try:
        client.connect()
    except RemoteError as error:
        client.close()
        if error.reason is not Reason.CUT_MISMATCH:
            raise
        details = f"{error.details}; start both processes with the same --model (this client: --model {config.model})"
        raise RemoteError("handshake refused", code=error.code, details=details, reason=error.reason) from None
    except BaseException:
        client.close()
        raise


def main(argv: list[str] | None = None) -> int:
    """Train, evaluate on the test split, print the result; exit 0, 1 if training failed, 2 on bad set-up."""
    config = parse_args(argv)
    absent = tensorflow_setup.missing("split-client")
    if absent:
        print(absent, file=sys.stderr)
        return 2
    interrupts = Interrupts()
    interrupts.install()
    try:
        tensorflow_setup.load(verbose=config.log_level == "DEBUG")
        from client_part.transport import RemoteError

        run(config, interrupts)
    except KeyboardInterrupt as stopped:  # client_part.stopping.Stopped: the message says where and what is kept
        log.warning("%s", stopped or "stopped on request while starting")
        return interrupts.exit_code
    except (ValueError, TypeError, FileNotFoundError) as error:
        log.error("%s", error)
        return 2
    except (RemoteError, ConnectionError) as error:
        log.error("%s", error)
        return 1
    return 0
