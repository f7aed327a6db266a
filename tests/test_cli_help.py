"""`--help` of each CLI lists every flag under its group, and every flag still parses (and still reads its
environment variable)."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from aggregator.cli import parse_args as aggregator_args
from client_part.cli import parse_args as client_args
from feature_party.cli import parse_args as feature_party_args
from label_party.cli import parse_args as label_party_args
from server_part.cli import parse_args as server_args
from splitlearning import cli
from splitlearning.aggregation import Aggregation, Rule
from splitlearning.shards import Shard

# The groups, in --help's order, and a value for each flag: parsed all at once, each must come back.
CLIENT: dict[str, dict[str, Any]] = {
    "connection": {
        "--target": "host:1",
        "--connect-timeout": 2.5,
        "--rpc-timeout": 3.5,
        "--retry-timeout": 4.5,
        "--session": "s1",
        "--wire-encoding": "int8",
    },
    "model": {"--model": "digits-cnn", "--cut": "ushape", "--head": "m:f", "--loss": "mse", "--metrics": "mae"},
    "data": {
        "--dataset": "d.npz",
        "--validation-split": 0.25,
        "--no-shuffle": True,
        "--shard": Shard(2, 3),
        "--shard-by": "label",
    },
    "training": {
        "--optimizer": "sgd",
        "--learning-rate": 0.5,
        "--seed": 7,
        "--batch-size": 9,
        "--epochs": 3,
        "--micro-batches": 2,
        "--stale-gradients": True,
        "--local-loss": True,  # parsed together; the client, when built, refuses both at once
        "--top-k": 0.05,
    },
    "rounds": {},  # below: the group flags parse without --epochs, --session and --checkpoint-dir
    "device": {"--device": "/CPU:1", "--cpus": "0-1", "--threads": 2},
    "checkpoints": {
        "--checkpoint-dir": Path("c"),
        "--checkpoint-every": 11,
        "--checkpoint-keep": 3,
        "--save-weights": Path("w.npz"),
        "--save-model": Path("m.keras"),
        "--save-head": Path("h.keras"),
    },
    "security": {
        "--tls": True,
        "--tls-ca": Path("ca.crt"),
        "--tls-cert": Path("c.crt"),
        "--tls-key": Path("c.key"),
        "--tls-server-name": "name",
        "--auth-token-file": Path("t"),
        "--clip-norm": 1.5,
        "--noise-multiplier": 0.5,
        "--nopeek-alpha": 0.25,
        "--label-defence": "marvell",
        "--label-defence-strength": 2.0,
        "--no-leakage-meters": True,
        "--leakage-samples": 3,
    },
    "observability": {
        "--log-level": "DEBUG",
        "--log-format": "json",
        "--log-dir": Path("runs"),
        "--log-every": 5,
        "--history-json": Path("h.json"),
        "--plot": Path("p.png"),
    },
}
SERVER: dict[str, dict[str, Any]] = {
    "connection": {
        "--address": "0.0.0.0:1",
        "--port-file": Path("port"),
        "--wire-encodings": "raw,int8",
        "--allow-approximations": "top-k,local-loss",
        "--max-batch-size": 12,
        "--max-workers": 3,
        "--max-sessions": 4,
        "--session-idle-timeout": 5.5,
        "--session-unused-timeout": 6.5,
        "--grace": 1.5,
    },
    "model": {"--model": "digits-cnn", "--cut": "ushape", "--loss": "mse", "--metrics": "mae", "--serve-only": True},
    "training": {"--optimizer": "sgd", "--learning-rate": 0.5, "--seed": 7, "--exact": True},
    "rounds": {
        "--aggregator": True,
        "--members": 4,
        "--round-deadline": 30.5,
        "--min-members": 3,
        "--aggregation": "trimmed-mean",
        "--trim-fraction": 0.2,
        "--norm-bound": 2.5,
    },
    "device": {"--device": "/CPU:1", "--cpus": "0-1", "--threads": 2},
    "checkpoints": {
        "--checkpoint-dir": Path("c"),
        "--checkpoint-every": 11,
        "--checkpoint-keep": 3,
        "--save-weights": Path("w.npz"),
        "--save-model": Path("m.keras"),
    },
    "security": {
        "--tls-cert": Path("s.crt"),
        "--tls-key": Path("s.key"),
        "--tls-ca": Path("ca.crt"),
        "--auth-token-file": Path("t"),
    },
    "observability": {
        "--log-level": "DEBUG",
        "--log-format": "json",
        "--log-dir": Path("runs"),
        "--log-every": 5,
        "--metrics-port": 9100,
        "--metrics-host": "0.0.0.0",
        "--metrics-port-file": Path("mport"),
    },
}
# A member of a group (split-client --group): its flags, which exclude --epochs, --session and --checkpoint-dir.
MEMBER: dict[str, dict[str, Any]] = {
    "rounds": {
        "--group": "g-1",
        "--scheme": "round-robin",
        "--rounds": 3,
        "--local-epochs": 2,
        "--member": 2,
        "--aggregator": "host:2",
        "--handover-dir": Path("h"),
    },
}
# --predict trains nothing: it parses without --epochs and the flags that save or checkpoint a trained part.
PREDICT = {"--predict": Path("x.npz"), "--predictions": Path("p.csv")}
PREDICTOR: dict[str, dict[str, Any]] = {
    "data": {"--predict": PREDICT["--predict"], "--predictions": PREDICT["--predictions"]},
    "training": {"--batch-size": 256},
}
AGGREGATOR: dict[str, dict[str, Any]] = {
    "connection": {
        "--address": "0.0.0.0:1",
        "--port-file": Path("port"),
        "--max-workers": 3,
        "--max-state-mb": 64,
        "--grace": 1.5,
    },
    "rounds": {
        "--members": 4,
        "--round-deadline": 30.5,
        "--min-members": 3,
        "--aggregation": "norm-bounded",
        "--trim-fraction": 0.3,
        "--norm-bound": 2.5,
    },
    "checkpoints": {"--state-dir": Path("state")},
    "security": {
        "--tls-cert": Path("s.crt"),
        "--tls-key": Path("s.key"),
        "--tls-ca": Path("ca.crt"),
        "--auth-token-file": Path("t"),
    },
    "observability": {
        "--metrics-port": 9100,
        "--metrics-host": "0.0.0.0",
        "--metrics-port-file": Path("mport"),
        "--log-level": "DEBUG",
        "--log-format": "json",
    },
}
CASES = [
    pytest.param(
        client_args, {**CLIENT, "data": {**CLIENT["data"], **PREDICT}, "rounds": MEMBER["rounds"]}, id="split-client"
    ),
    pytest.param(server_args, SERVER, id="split-server"),
    pytest.param(aggregator_args, AGGREGATOR, id="split-aggregator"),
]
# Flags that parse together: a client trains alone or as a member of a group.
PARSED = [
    pytest.param(client_args, CLIENT, id="split-client"),
    pytest.param(client_args, MEMBER, id="split-client-member"),
    pytest.param(client_args, PREDICTOR, id="split-client-predictor"),
    pytest.param(server_args, SERVER, id="split-server"),
    pytest.param(aggregator_args, AGGREGATOR, id="split-aggregator"),
]


def help_text(parse_args: Callable[[list[str]], Any], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exited:
        parse_args(["--help"])
    assert exited.value.code == 0
    return capsys.readouterr().out


def listed(text: str) -> dict[str, list[str]]:
    """{group title: the flags --help lists under it, in order}."""
    sections: dict[str, list[str]] = {}
    title = ""
    for line in text.splitlines():
        if line and not line.startswith(" ") and line.endswith(":"):
            title = line[:-1]
            sections[title] = []
        elif title and (flag := re.match(r"  (--[a-z-]+)", line)):
            sections[title].append(flag[1])
    return sections


@pytest.mark.parametrize(("parse_args", "expected"), CASES)
def test_help_lists_every_flag_under_its_group(
    parse_args: Callable[[list[str]], Any], expected: dict[str, dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    sections = listed(help_text(parse_args, capsys))
    titles = [title for title in sections if title != "options"]
    assert titles == [cli.GROUPS[name] for name in expected]
    for name, flags in expected.items():
        assert sorted(sections[cli.GROUPS[name]]) == sorted(flags), name
    assert sections["options"] == []  # only -h, --help: no flag left outside a group


@pytest.mark.parametrize(("parse_args", "expected"), PARSED)
def test_every_flag_parses(parse_args: Callable[[list[str]], Any], expected: dict[str, dict[str, Any]]) -> None:
    argv: list[str] = []
    values = {flag: value for flags in expected.values() for flag, value in flags.items()}
    for flag, value in values.items():
        argv += [flag] if value is True else [flag, str(value)]
    config = parse_args(argv)
    for flag, value in values.items():
        assert getattr(config, flag[2:].replace("-", "_")) == value, flag


@pytest.mark.parametrize(("parse_args", "expected"), PARSED)
def test_every_flag_reads_its_environment_variable(
    parse_args: Callable[[list[str]], Any],
    expected: dict[str, dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    values = {flag: value for flags in expected.values() for flag, value in flags.items()}
    for flag, value in values.items():
        monkeypatch.setenv(cli.env_name(flag), "1" if value is True else str(value))
    config = parse_args([])
    for flag, value in values.items():
        assert getattr(config, flag[2:].replace("-", "_")) == value, flag


@pytest.mark.parametrize("parse_args", [server_args, aggregator_args], ids=["split-server", "split-aggregator"])
def test_the_aggregation_flags_state_one_rule_and_a_trimmed_mean_that_trims_nothing_is_refused(
    parse_args: Callable[[list[str]], Any], capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.aggregation(parse_args([])) == Aggregation()  # FedAvg by default
    rule = cli.aggregation(parse_args(["--aggregation", "trimmed-mean", "--norm-bound", "3"]))
    assert rule == Aggregation(Rule.TRIMMED_MEAN, 0.25)  # the default fraction; the bound is another rule's
    assert cli.aggregation(parse_args(["--aggregation", "norm-bounded"])) == Aggregation(Rule.NORM_BOUNDED, 0, 0)
    with pytest.raises(SystemExit):
        parse_args(["--aggregation", "trimmed-mean", "--trim-fraction", "0"])
    assert "--aggregation: the trimmed mean's fraction must lie in (0, 0.5), got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--aggregation", "krum"])


@pytest.mark.parametrize(
    ("parse_args", "required"),
    [
        pytest.param(label_party_args, {"--data": "label.npz", "--parties": "left,right"}, id="split-label-party"),
        pytest.param(
            feature_party_args, {"--name": "left", "--data": "left.npz", "--server": "h:1"}, id="split-feature-party"
        ),
    ],
)
def test_a_required_flag_is_given_by_its_environment_variable(
    parse_args: Callable[[list[str]], Any],
    required: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """As a compose file gives it (docker-compose.vertical.yml); without flag or variable it is still required."""
    with pytest.raises(SystemExit):
        parse_args([])
    assert "the following arguments are required: " + ", ".join(required) in capsys.readouterr().err
    for flag, value in required.items():
        monkeypatch.setenv(cli.env_name(flag), value)
    config = parse_args([])
    for flag, value in required.items():
        assert str(getattr(config, flag[2:].replace("-", "_"))) == value, flag
