"""`split-server`: serve the second part of a split model."""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from splitlearning import logs, tensorflow_setup

logs.quiet_grpc(sys.argv[1:])  # before grpc is imported (below, through security)

from splitlearning import addresses, cli, devices, security  # noqa: E402

if TYPE_CHECKING:
    from server_part.server import SplitServer
    from server_part.session import Session

log = logging.getLogger("split-server")


@dataclass(frozen=True, kw_only=True)
class ServerConfig(cli.ProcessConfig):
    address: str
    loss: str | None
    metrics: str | None
    max_batch_size: int
    wire_encodings: str
    allow_approximations: str
    port_file: Path | None
    metrics_port: int | None
    metrics_host: str | None
    metrics_port_file: Path | None
    grace: float = 5.0
    max_workers: int | None = None
    max_sessions: int = 16
    session_idle_timeout: float = 3600.0
    session_unused_timeout: float = 60.0
    aggregator: bool = False
    members: int = 2
    round_deadline: float = 600.0
    min_members: int = 1
    aggregation: str = "fedavg"
    trim_fraction: float = 0.25
    norm_bound: float = 0.0
    exact: bool = False
    serve_only: bool = False


def parse_args(argv: list[str] | None = None) -> ServerConfig:
    parser = argparse.ArgumentParser(prog="split-server", usage="%(prog)s [FLAG VALUE ...]", description=__doc__)
    groups = cli.groups(
        parser, "connection", "model", "training", "rounds", "device", "checkpoints", "security", "observability"
    )
    connection = groups["connection"]
    cli.add_listen_flags(connection, "127.0.0.1:50051")
    cli.add(
        connection,
        "--wire-encodings",
        default="raw",
        help="comma-separated wire encodings a client may choose for the IV and its gradient "
        "(raw, float16, bfloat16, int8, sparse); raw is always allowed",
    )
    cli.add(
        connection,
        "--allow-approximations",
        default="",
        help="comma-separated approximations a client may ask for, beyond the exact split (stale-gradients, "
        "local-loss, top-k, or all; docs/performance.md, 'Beyond exact'); default: none",
    )
    cli.add(
        connection, "--max-batch-size", type=cli.POSITIVE_INT, default=1024, help="largest batch a request may carry"
    )
    cli.add(
        connection,
        "--max-workers",
        type=cli.POSITIVE_INT,
        default=None,
        help="concurrent calls of the service (threads); default 2 x --max-sessions + 2: each training client "
        "holds its stream and one call at a time",
    )
    cli.add(
        connection,
        "--max-sessions",
        type=cli.POSITIVE_INT,
        default=16,
        help="sessions held in memory at once (one per training run); a new one beyond it evicts an idle one "
        "(checkpointed first with --checkpoint-dir), and is refused only while every one has a training stream open",
    )
    cli.add(
        connection,
        "--session-idle-timeout",
        type=cli.NON_NEGATIVE,
        default=3600.0,
        help="seconds without a request after which a session is checkpointed (with --checkpoint-dir) and "
        "dropped from memory; 0: never",
    )
    cli.add(
        connection,
        "--session-unused-timeout",
        type=cli.NON_NEGATIVE,
        default=60.0,
        help="seconds without a request after which a session that a handshake opened new and that applied no "
        "training step is dropped from memory (it holds nothing a new session lacks); 0: never",
    )
    cli.add_grace_flag(connection)
    cli.add_process_flags(groups, part="second")
    model = groups["model"]
    cli.add(
        model,
        "--cut",
        default="standard",
        choices=["standard", "ushape"],
        help="standard: this part holds the loss and gets labels; ushape: it holds only the middle (no labels)",
    )
    cli.add(model, "--loss", default=None, help="Keras loss name (default: the model pair's, or a compiled part's)")
    cli.add(model, "--metrics", default=None, help="comma-separated Keras metric names (default: accuracy)")
    cli.add(
        groups["training"],
        "--exact",
        action="store_true",
        help="apply the optimizer's updates as a plain graph, as Keras fit does on a CPU: the split then equals "
        "fit bit for bit where the kernels are the same (TF_ENABLE_ONEDNN_OPTS=0; with oneDNN, within float32 "
        "round-off). Default: XLA-compiled updates, faster for large parts (Adam on the benchmark's cnn part: "
        "0.9 ms against 1.5), within float32 round-off of fit but not bit for bit",
    )
    cli.add(
        groups["rounds"],
        "--aggregator",
        action="store_true",
        help="also keep multi-client rounds and average the members' first parts here (the model owner then "
        "sees them; run split-aggregator apart instead to keep them from it)",
    )
    cli.add_round_flags(groups["rounds"])
    security.add_server_flags(groups["security"])
    cli.add_checkpoint_flags(groups["checkpoints"])
    cli.add(
        groups["checkpoints"],
        "--save-weights",
        type=Path,
        default=None,
        help="write the final weights here (.npz) whenever a session that trained ends (closed by its client, "
        "idle, or in memory when the server stops): the session that ended last",
    )
    cli.add(
        groups["model"],
        "--serve-only",
        action="store_true",
        help="serve the part for predictions only (a trained part: --model PART.keras, or a session resumed from "
        "--checkpoint-dir): Evaluate and Predict are answered, training is refused",
    )
    cli.add(
        groups["checkpoints"],
        "--save-model",
        type=cli.keras_file,
        default=None,
        help="write the trained part here as a Keras file (.keras), when --save-weights writes its weights; "
        "split-join joins it with the client's",
    )
    add_telemetry_flags(groups["observability"])
    config = ServerConfig(**vars(parser.parse_args(argv)))
    if config.min_members > config.members:
        parser.error(f"--min-members {config.min_members} is more than --members {config.members}")
    try:
        cli.aggregation(config)
    except ValueError as error:
        parser.error(str(error))
    if config.aggregator and config.members > config.max_sessions:
        parser.error(
            f"--members {config.members} is more than --max-sessions {config.max_sessions}: every member of a "
            "SplitFed round trains in a session of its own at the same time; raise --max-sessions"
        )
    return config


def add_telemetry_flags(parser: cli.Flags) -> None:
    cli.add_metrics_flags(parser)
    cli.add(parser, "--log-dir", type=Path, default=None, help="write TensorBoard scalars under DIR/server")
    cli.add(
        parser, "--log-every", type=cli.POSITIVE_INT, default=1, help="write per-step TensorBoard scalars every N steps"
    )


def run(config: ServerConfig) -> None:
    cli.setup_logging(config.log_level, config.log_format)
    devices.setup_process(config.cpus, config.threads)
    addresses.check_bindable(config.address)  # before the model is built: a mistake shows at once
    server = build(config)
    saved: list[float] = []  # when each session that ended was written (time.monotonic)
    writing = threading.Lock()  # sessions may end on several threads at once

    def save_part(model: Any, optimizer: Any, what: str) -> None:
        from splitlearning.checkpoint import save_model, save_weights

        with writing:
            if config.save_weights:
                save_weights(config.save_weights, model, optimizer)
            if config.save_model:
                save_model(config.save_model, model)
            saved.append(time.monotonic())
        written = " and ".join(str(path) for path in (config.save_weights, config.save_model) if path)
        log.info("%s written to %s", what, written)

    def save_session(session: Session) -> None:
        # A session that never trained (a handshake reclaimed or evicted unused) must not overwrite a trained part.
        if not session.unused:
            session.trainer.settle()
            save_part(session.trainer.model, session.trainer.optimizer, f"session {session.id}: final part")

    if config.save_weights or config.save_model:
        server.on_session_end = save_session
    cli.serve_until_signal(server, config.address, log, config)
    if config.save_weights or config.save_model:
        trained = [session for session in server.sessions.sessions() if not session.unused]
        in_memory = sorted(trained, key=lambda session: session.last_used)
        # The session in memory used last, unless a session that ended later was written: one left behind
        # (a group member killed mid-round trains its round again in a new session) must not overwrite it.
        if in_memory and (not saved or in_memory[-1].last_used > saved[-1]):
            save_session(in_memory[-1])
        elif not saved:  # no session trained: the part as it started
            save_part(server.model, server.trainer.optimizer, "the part as it started (no session trained)")


def build(config: ServerConfig) -> SplitServer:
    """The `SplitServer` these flags describe (not started). With --aggregator, the aggregator's rounds are
    mounted in it: this is where the two roles are composed (docs/design.md, "Layers")."""
    from aggregator.server import Aggregator
    from server_part.server import SplitServer
    from splitlearning.models import BUILTIN, load_part, make_optimizer

    pair = BUILTIN.get(config.model)
    ushape = config.cut == "ushape"
    metrics = config.metrics.split(",") if config.metrics else list(pair.metrics) if pair else None
    if ushape and (config.loss or config.metrics):
        raise ValueError("--cut ushape: the loss and metrics live on the client (split-client --loss/--metrics)")
    server = SplitServer(
        model=load_part(config.model, "middle" if ushape else "server", config.seed),
        loss=None if ushape else config.loss or (pair.loss if pair else None),
        optimizer=make_optimizer(config.optimizer, config.learning_rate),
        metrics=None if ushape else metrics,
        cut=config.cut,
        device=config.device,
        max_batch_size=config.max_batch_size,
        metrics_port=config.metrics_port,
        metrics_host=config.metrics_host,
        log_dir=config.log_dir,
        log_every=config.log_every,
        tls=security.server_tls(config.tls_cert, config.tls_key, config.tls_ca),
        auth_token=security.read_token(config.auth_token_file) if config.auth_token_file else None,
        wire_encodings=config.wire_encodings.split(","),
        allow_approximations=config.allow_approximations,
        max_workers=config.max_workers,
        checkpoint_dir=config.checkpoint_dir,
        checkpoint_every=config.checkpoint_every,
        checkpoint_keep=config.checkpoint_keep,
        max_sessions=config.max_sessions,
        session_idle_timeout=config.session_idle_timeout,
        session_unused_timeout=config.session_unused_timeout,
        exact=config.exact,
        serve_only=config.serve_only,
        aggregation=cli.aggregation(config),
    )
    if config.aggregator:
        state = config.checkpoint_dir / "aggregator.d" if config.checkpoint_dir else None
        server.aggregator = Aggregator(
            config.members,
            config.round_deadline,
            config.min_members,
            state,
            registry=server.telemetry.registry,
            aggregation=cli.aggregation(config),
        )
    return server


def main(argv: list[str] | None = None) -> int:
    """Run the server until SIGTERM/SIGINT; the exit status: 0, or 2 for a set-up error."""
    config = parse_args(argv)
    absent = tensorflow_setup.missing("split-server")
    if absent:
        print(absent, file=sys.stderr)
        return 2
    try:
        tensorflow_setup.load(verbose=config.log_level == "DEBUG")
        run(config)
    except KeyboardInterrupt:  # before the server's own handlers: nothing was served yet
        log.warning("stopped on request while starting")
        return 130
    except (ValueError, OSError, TypeError) as error:
        log.error("%s", error)
        return 2
    return 0
