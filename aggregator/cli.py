"""`split-aggregator`: keep the rounds of multi-client training and average the members' first parts, apart
from the server (the model owner never sees first-part weights). No TensorFlow needed."""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from splitlearning import logs

logs.quiet_grpc(sys.argv[1:])  # before grpc is imported (below, through security)

from splitlearning import addresses, cli, security  # noqa: E402

log = logging.getLogger("split-aggregator")


@dataclass(frozen=True, kw_only=True)
class AggregatorConfig:
    address: str
    port_file: Path | None
    members: int
    round_deadline: float
    min_members: int
    aggregation: str
    trim_fraction: float
    norm_bound: float
    state_dir: Path | None
    max_workers: int | None
    max_state_mb: int
    grace: float
    tls_cert: Path | None
    tls_key: Path | None
    tls_ca: Path | None
    auth_token_file: Path | None
    metrics_port: int | None
    metrics_host: str | None
    metrics_port_file: Path | None
    log_level: str
    log_format: str


def parse_args(argv: list[str] | None = None) -> AggregatorConfig:
    parser = argparse.ArgumentParser(prog="split-aggregator", usage="%(prog)s [FLAG VALUE ...]", description=__doc__)
    groups = cli.groups(parser, "connection", "rounds", "checkpoints", "security", "observability")
    connection = groups["connection"]
    cli.add_listen_flags(connection, "127.0.0.1:50052")
    cli.add(
        connection,
        "--max-workers",
        type=cli.POSITIVE_INT,
        default=None,
        help="concurrent calls (threads); default 2 x --members + 4",
    )
    cli.add(
        connection,
        "--max-state-mb",
        type=cli.POSITIVE_INT,
        default=256,
        help="largest message in MiB (a member's first part travels in one)",
    )
    cli.add_grace_flag(connection)
    cli.add_round_flags(groups["rounds"])
    cli.add(
        groups["checkpoints"],
        "--state-dir",
        type=Path,
        default=None,
        help="keep every group's rounds here, so a restarted aggregator goes on where it stopped",
    )
    security.add_server_flags(groups["security"])
    cli.add_metrics_flags(groups["observability"])
    cli.add_log_flags(groups["observability"])
    config = AggregatorConfig(**vars(parser.parse_args(argv)))
    if config.min_members > config.members:
        parser.error(f"--min-members {config.min_members} is more than --members {config.members}")
    try:
        cli.aggregation(config)
    except ValueError as error:
        parser.error(str(error))
    return config


def run(config: AggregatorConfig) -> None:
    cli.setup_logging(config.log_level, config.log_format)
    addresses.check_bindable(config.address)
    from aggregator.server import Aggregator, AggregatorServer

    aggregator = Aggregator(
        config.members,
        config.round_deadline,
        config.min_members,
        config.state_dir,
        max_state_bytes=config.max_state_mb * 1024 * 1024,
        aggregation=cli.aggregation(config),
    )
    server = AggregatorServer(
        aggregator,
        tls=security.server_tls(config.tls_cert, config.tls_key, config.tls_ca),
        auth_token=security.read_token(config.auth_token_file) if config.auth_token_file else None,
        max_workers=config.max_workers,
        metrics_port=config.metrics_port,
        metrics_host=config.metrics_host,
    )
    cli.serve_until_signal(server, config.address, log, config)


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGTERM/SIGINT; the exit status: 0, or 2 for a set-up error."""
    config = parse_args(argv)
    try:
        run(config)
    except KeyboardInterrupt:
        return 130
    except (ValueError, OSError, TypeError) as error:
        log.error("%s", error)
        return 2
    return 0
