"""`split-aggregator`: keep the rounds of multi-client training and average the members' first parts, apart
from the server (the model owner never sees first-part weights). No TensorFlow needed."""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from splitlearning import tensorflow_setup

tensorflow_setup.quiet_grpc(sys.argv[1:])  # before grpc is imported (below, through security)

from splitlearning import addresses, cli, security  # noqa: E402

log = logging.getLogger("split-aggregator")


@dataclass(frozen=True, kw_only=True)
class AggregatorConfig:
    address: str
    port_file: Path | None
    members: int
    round_deadline: float
    min_members: int
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


def add_round_flags(parser: cli.Flags) -> None:
    """--members, --round-deadline, --min-members: the same on `split-aggregator` and `split-server --aggregator`."""
    cli.add(
        parser,
        "--members",
        type=cli.POSITIVE_INT,
        default=2,
        help="members of each group: a SplitFed round waits for all of them, round-robin gives each a turn",
    )
    cli.add(
        parser,
        "--round-deadline",
        type=cli.NON_NEGATIVE,
        default=600.0,
        help="seconds a round (round-robin: a turn) stays open; then it closes without the members that did not "
        "submit, who rejoin at the next round; 0: wait for every member",
    )
    cli.add(
        parser,
        "--min-members",
        type=cli.POSITIVE_INT,
        default=1,
        help="SplitFed: the fewest submissions a round closes with at its deadline (it waits on for more)",
    )


def parse_args(argv: list[str] | None = None) -> AggregatorConfig:
    parser = argparse.ArgumentParser(prog="split-aggregator", usage="%(prog)s [FLAG VALUE ...]", description=__doc__)
    groups = cli.groups(parser, "connection", "rounds", "checkpoints", "security", "observability")
    connection = groups["connection"]
    cli.add(connection, "--address", default="127.0.0.1:50052", help="host:port to listen on (0.0.0.0:PORT for all)")
    cli.add(connection, "--port-file", type=Path, default=None, help="write the bound port here once serving")
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
    cli.add(connection, "--grace", type=cli.NON_NEGATIVE, default=5.0, help="seconds calls get to finish on SIGTERM")
    add_round_flags(groups["rounds"])
    cli.add(
        groups["checkpoints"],
        "--state-dir",
        type=Path,
        default=None,
        help="keep every group's rounds here, so a restarted aggregator goes on where it stopped",
    )
    security.add_server_flags(groups["security"])
    observability = groups["observability"]
    cli.add(
        observability,
        "--metrics-port",
        type=cli.PORT,
        default=None,
        help="serve Prometheus metrics on this port (0: any)",
    )
    cli.add(observability, "--metrics-host", default=None, help="host for --metrics-port (default: that of --address)")
    cli.add(observability, "--metrics-port-file", type=Path, default=None, help="write the bound metrics port here")
    levels = ["DEBUG", "INFO", "WARNING", "ERROR"]
    cli.add(observability, "--log-level", default="INFO", choices=levels, help="log level")
    cli.add(observability, "--log-format", default="text", choices=["text", "json"], help="log line format")
    config = AggregatorConfig(**vars(parser.parse_args(argv)))
    if config.min_members > config.members:
        parser.error(f"--min-members {config.min_members} is more than --members {config.members}")
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
    )
    server = AggregatorServer(
        aggregator,
        tls=security.server_tls(config.tls_cert, config.tls_key, config.tls_ca),
        auth_token=security.read_token(config.auth_token_file) if config.auth_token_file else None,
        max_workers=config.max_workers,
        metrics_port=config.metrics_port,
        metrics_host=config.metrics_host,
    )
    port = server.start(config.address)
    cli.write_ports(port, config.port_file, server.metrics_port, config.metrics_port_file)
    cli.wait_for_signal(log, config.grace)
    server.stop(grace=config.grace)


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
