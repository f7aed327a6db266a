"""What the command-line programs share: flags that read environment variables, logging, process set-up, and
the flags and the serving loop of the two that serve (split-server, split-aggregator)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Protocol, TypeAlias

from splitlearning.aggregation import DEFAULT_TRIM, RULES, Aggregation, Rule
from splitlearning.errors import InvalidRequest

ENV_PREFIX = "SPLIT_"

Flags: TypeAlias = "argparse.ArgumentParser | argparse._ArgumentGroup"  # where `add` puts a flag

GROUPS = {
    "connection": "connection: addresses, time limits, sessions, what crosses the wire",
    "model": "model: the part this process holds (both processes must name the same pair and cut)",
    "data": "data",
    "training": "training",
    "rounds": "multi-client training: groups, schemes, rounds (docs/multi_client.md)",
    "device": "device: where this process computes",
    "checkpoints": "checkpoints and weights",
    "security": "security and privacy",
    "observability": "observability: logs, metrics, TensorBoard, the run's record",
}
_PARSER_OF: weakref.WeakKeyDictionary[Any, argparse.ArgumentParser] = weakref.WeakKeyDictionary()


def groups(parser: argparse.ArgumentParser, *names: str) -> dict[str, Flags]:
    """Argument groups of `parser` titled from `GROUPS`, in the order named: `--help` lists each flag under
    its group."""
    made: dict[str, Flags] = {}
    for name in names:
        group = parser.add_argument_group(GROUPS[name])
        _PARSER_OF[group] = parser
        made[name] = group
    return made


def env_name(flag: str) -> str:
    """'--batch-size' -> 'SPLIT_BATCH_SIZE': the variable that gives the flag its default."""
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


def number(kind: type, low: float, high: float | None = None, high_open: bool = False) -> Callable[[str], Any]:
    """An argparse `type`: `kind` (int or float) within [low, high] ([low, high) with `high_open`), refused
    with the expected range and the value given."""
    bound = "" if high is None else f" and {'<' if high_open else '<='} {high:g}"
    expected = f"{'an integer' if kind is int else 'a number'} >= {low:g}{bound}"

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if value < low or (high is not None and (value >= high if high_open else value > high)):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


POSITIVE_INT = number(int, 1)
NON_NEGATIVE_INT = number(int, 0)
NON_NEGATIVE = number(float, 0)
PORT = number(int, 0, 65535)


def positive(text: str) -> float:
    """An argparse `type`: a number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return value


def add(parser: Flags, flag: str, **kwargs: Any) -> None:
    """Add `flag` to `parser` (or one of its `groups`) with a default from its environment variable (for
    compose files) when set; a required flag is then given by the variable."""
    variable = env_name(flag)
    if variable in os.environ:
        kwargs["required"] = False
        raw = os.environ[variable]
        if kwargs.get("action") == "store_true":
            kwargs["default"] = raw.strip().lower() in ("1", "true", "yes", "on")
        else:
            try:
                kwargs["default"] = kwargs.get("type", str)(raw)
            except (argparse.ArgumentTypeError, ValueError) as error:
                owner = parser if isinstance(parser, argparse.ArgumentParser) else _PARSER_OF[parser]
                owner.error(f"{variable} (the default of {flag}): {error}")
    kwargs["help"] = f"{kwargs.get('help', '')} [env {variable}]".strip()
    if kwargs.get("default") is not None and kwargs.get("action") != "store_true":
        kwargs["help"] += " (default: %(default)s)"
    parser.add_argument(flag, **kwargs)


def add_process_flags(groups: dict[str, Flags], part: str) -> None:
    """Flags both processes take, each into its group of `groups`: model, device, cores, threads, optimizer,
    seed, logging; `part` names the part this process holds ('first', 'second')."""
    add(
        groups["model"],
        "--model",
        default="digits-mlp",
        help="model pair (digits-mlp, digits-cnn; mnist-cnn, mnist-wide: 28x28 inputs) or package.module:function "
        f"returning the {part} part",
    )
    parser = groups["device"]
    add(parser, "--device", default="/CPU:0", help="device to pin this process to: /CPU:0, /GPU:0, /GPU:1, ...")
    add(parser, "--cpus", default=None, help="pin this process to these CPU cores, e.g. '0' or '0-3'")
    add(
        parser,
        "--threads",
        type=POSITIVE_INT,
        default=None,
        help="TensorFlow threads, intra-op and inter-op (default: one per core)",
    )
    parser = groups["training"]
    add(parser, "--optimizer", default="adam", help="any Keras optimizer name: sgd, adam, rmsprop, ...")
    add(parser, "--learning-rate", type=positive, default=3e-3, help="the optimizer's learning rate")
    add(parser, "--seed", type=NON_NEGATIVE_INT, default=0, help="seed for weights and data order")
    add_log_flags(groups["observability"])


def add_log_flags(parser: Flags) -> None:
    add(parser, "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="log level")
    add(parser, "--log-format", default="text", choices=["text", "json"], help="log line format")


def add_listen_flags(parser: Flags, address: str) -> None:
    """--address and --port-file of a program that serves (default `address`)."""
    add(parser, "--address", default=address, help="host:port to listen on (0.0.0.0:PORT for all)")
    add(parser, "--port-file", type=Path, default=None, help="write the bound port here once serving")


def add_grace_flag(parser: Flags) -> None:
    add(
        parser, "--grace", type=NON_NEGATIVE, default=5.0, help="seconds RPCs get to finish on SIGTERM (< compose's 10)"
    )


def add_metrics_flags(parser: Flags) -> None:
    """The Prometheus endpoint of a program that serves."""
    add(parser, "--metrics-port", type=PORT, default=None, help="serve Prometheus metrics on this port (0: any)")
    add(parser, "--metrics-host", default=None, help="host for --metrics-port (default: the host of --address)")
    add(parser, "--metrics-port-file", type=Path, default=None, help="write the bound metrics port here")


def add_round_flags(parser: Flags) -> None:
    """--members, --round-deadline, --min-members and the SplitFed rule (--aggregation, --trim-fraction,
    --norm-bound): the same on `split-aggregator` and `split-server` (whose rule combines the second parts, with
    or without --aggregator)."""
    add(
        parser,
        "--members",
        type=POSITIVE_INT,
        default=2,
        help="members of each group: a SplitFed round waits for all of them, round-robin gives each a turn",
    )
    add(
        parser,
        "--round-deadline",
        type=NON_NEGATIVE,
        default=600.0,
        help="seconds a round (round-robin: a turn) stays open; then it closes without the members that did not "
        "submit, who rejoin at the next round; 0: wait for every member",
    )
    add(
        parser,
        "--min-members",
        type=POSITIVE_INT,
        default=1,
        help="SplitFed: the fewest submissions a round closes with at its deadline (it waits on for more)",
    )
    add(
        parser,
        "--aggregation",
        default="fedavg",
        choices=RULES,
        help="SplitFed: how a round's parts are combined: fedavg (sample-weighted mean), or robust to a hostile "
        "member: median (coordinate-wise), trimmed-mean, norm-bounded (FedAvg of clipped updates); the server's and "
        "the aggregator's must agree (a member's handshake with another is refused)",
    )
    add(
        parser,
        "--trim-fraction",
        type=number(float, 0, 0.5, high_open=True),
        default=DEFAULT_TRIM,
        help="--aggregation trimmed-mean: the fraction of members dropped from each end of each coordinate, "
        "floor(fraction x members) (0.25: 1 of 4, none of 3)",
    )
    add(
        parser,
        "--norm-bound",
        type=NON_NEGATIVE,
        default=0.0,
        help="--aggregation norm-bounded: the L2 bound on each member's update (its part less the round's start); "
        "0: the median of the round's update norms",
    )


def aggregation(flags: Any) -> Aggregation:
    """The `splitlearning.aggregation.Aggregation` that --aggregation, --trim-fraction, --norm-bound state
    (ValueError for a trimmed mean with fraction 0)."""
    try:
        return Aggregation(Rule(flags.aggregation), flags.trim_fraction, flags.norm_bound)
    except InvalidRequest as error:
        raise ValueError(str(error).replace("aggregation: ", "--aggregation: ", 1)) from None


class Serving(Protocol):
    """A server a program runs until a signal (SplitServer, AggregatorServer)."""

    @property
    def metrics_port(self) -> int | None: ...

    def start(self, address: str) -> int: ...

    def stop(self, grace: float | None = ...) -> None: ...


def serve_until_signal(server: Serving, address: str, log: logging.Logger, flags: Any) -> None:
    """Start `server` on `address`, write the bound ports to `flags`' --port-file and --metrics-port-file, serve
    until SIGTERM or SIGINT, then stop, giving calls `flags.grace` seconds."""
    port = server.start(address)
    write_ports(port, flags.port_file, server.metrics_port, flags.metrics_port_file)
    wait_for_signal(log, flags.grace)
    server.stop(grace=flags.grace)


def keras_file(text: str) -> Path:
    """An argparse `type`: a path ending in .keras (the format `keras.saving` writes and loads)."""
    if not text.endswith(".keras"):
        raise argparse.ArgumentTypeError(f"expected a path ending in .keras, got {text!r}")
    return Path(text)


def add_checkpoint_flags(parser: Flags) -> None:
    """Checkpoint flags, the same on both processes (each saves its own part)."""
    add(parser, "--checkpoint-dir", type=Path, default=None, help="save and resume from checkpoints here")
    add(
        parser, "--checkpoint-every", type=NON_NEGATIVE_INT, default=100, help="save a checkpoint every this many steps"
    )
    add(parser, "--checkpoint-keep", type=number(int, 2), default=5, help="checkpoints to keep (at least 2)")


@dataclass(frozen=True, kw_only=True)
class ProcessConfig:
    """What both programs' flags configure alike: the part, the process, security, checkpoints, telemetry."""

    model: str
    device: str
    cpus: str | None
    threads: int | None
    optimizer: str
    learning_rate: float
    seed: int
    log_level: str
    log_format: str
    log_dir: Path | None
    log_every: int
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    auth_token_file: Path | None = None
    cut: str = "standard"
    checkpoint_dir: Path | None = None
    checkpoint_every: int = 100
    checkpoint_keep: int = 5
    save_weights: Path | None = None
    save_model: Path | None = None


def write_ports(port: int, port_file: Path | None, metrics_port: int | None, metrics_port_file: Path | None) -> None:
    """The bound ports into their files: the metrics port first, since --port-file says "ready"."""
    if metrics_port_file and metrics_port is not None:
        metrics_port_file.write_text(f"{metrics_port}\n")
    if port_file:
        port_file.write_text(f"{port}\n")


def wait_for_signal(log: logging.Logger, grace: float) -> None:
    """Block until SIGTERM or SIGINT (then the caller stops, giving calls `grace` seconds)."""
    stopping = threading.Event()

    def shut_down(signum: int, _frame: FrameType | None) -> None:
        log.info("%s: stopping (grace %g s)", signal.Signals(signum).name, grace)
        stopping.set()

    signal.signal(signal.SIGTERM, shut_down)
    signal.signal(signal.SIGINT, shut_down)
    while not stopping.wait(0.5):  # wakes for the signal handler
        pass


def setup_logging(level: str, fmt: str = "text") -> None:
    """Structured logs (see splitlearning.logs): INFO says what starts, stops and ends an epoch; DEBUG, each step."""
    from splitlearning import logs

    logs.configure(level, fmt)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
