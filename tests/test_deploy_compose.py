"""The deployment files, checked statically: the compose file is valid for compose, every command and variable it
gives a service is one that service's CLI accepts, and the Dockerfile builds the image the compose file expects."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from splitlearning import cli, tables
from splitlearning.protocol import VERTICAL_SERVICE
from tests.deploy_compose import (
    COMPOSE_FILE,
    ENV_PREFIX,
    GPU_COMPOSE_FILE,
    MULTI_COMPOSE_FILE,
    REPO,
    VERTICAL_COMPOSE_FILE,
    Service,
    compose_config,
    console_scripts,
    resolved,
    seconds,
    services,
    stages,
)

pytestmark = pytest.mark.processes  # every test here starts OS processes

STATE_DIR = "/var/lib/splitlearning"
FILES = {
    "cpu": (COMPOSE_FILE,),
    "gpu": (COMPOSE_FILE, GPU_COMPOSE_FILE),
    "multi": (MULTI_COMPOSE_FILE,),
    "vertical": (VERTICAL_COMPOSE_FILE,),
}
MEMBERS = ["member-1", "member-2", "member-3"]
FEATURE_PARTIES = ["left", "right"]
SERVICES = {
    "cpu": {"server", "client"},
    "gpu": {"server", "client"},
    "multi": {"server", "aggregator", *MEMBERS},
    "vertical": {"data", "label-party", *FEATURE_PARTIES},
}
# One-shot services that run Python code, not one of the CLIs (docker-compose.vertical.yml's `data` writes the
# parties' files): no CLI checks their command; test_vertical_the_data_service_writes_... runs it.
WRITERS = {"data"}
# The service that builds the image in each file (the others run its tag): the one that starts first.
BUILDERS = {"cpu": "server", "gpu": "server", "multi": "server", "vertical": "data"}
# What a compose file could loosen about a container's isolation; none of the files sets any of them.
LOOSENERS = {"user", "privileged", "cap_add", "security_opt", "network_mode", "pid", "ipc", "devices", "userns_mode"}


def cli_module(command: list[str]) -> Any:
    """The module behind a console script: 'split-server' -> server_part.cli."""
    return importlib.import_module(console_scripts()[command[0]].split(":")[0])


def env_flags(parse_args: Callable[[list[str]], Any], monkeypatch: pytest.MonkeyPatch) -> dict[str, dict[str, Any]]:
    """The flags `parse_args` defines through `cli.add`, i.e. the ones that read a variable: {variable: kwargs}."""
    found: dict[str, dict[str, Any]] = {}
    original = cli.add

    def recording_add(parser: argparse.ArgumentParser, flag: str, **kwargs: Any) -> None:
        found[cli.env_name(flag)] = {"flag": flag, **kwargs}
        original(parser, flag, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(cli, "add", recording_add)
        with contextlib.suppress(SystemExit):  # every flag is added before a required one is missed
            parse_args([])
    return found


def parse(parse_args: Callable[[list[str]], Any], argv: list[str], capsys: pytest.CaptureFixture[str]) -> Any:
    """`parse_args(argv)`, failing the test with argparse's message instead of exiting."""
    try:
        return parse_args(argv)
    except SystemExit as exit_:
        pytest.fail(f"the CLI refused {argv!r} (exit {exit_.code}): {capsys.readouterr().err.strip()}")


@pytest.mark.parametrize("variant", list(FILES))
def test_compose_accepts_the_files(variant: str) -> None:
    config = resolved(*FILES[variant])
    assert set(config["services"]) == SERVICES[variant]


def test_compose_validation_can_fail(tmp_path: Path) -> None:
    """The check above has teeth: a misspelt key, as compose's schema would catch, makes compose refuse."""
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE_FILE.read_text().replace("healthcheck:", "healthchek:", 1))
    result = compose_config(broken)
    assert result.returncode != 0
    assert "healthchek" in result.stderr


@pytest.mark.parametrize("variant", list(FILES))
def test_every_command_and_variable_is_accepted_by_the_cli(
    variant: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for service in services(resolved(*FILES[variant])).values():
        if service.name in WRITERS:
            continue
        parse_args = cli_module(service.command).parse_args
        accepted = env_flags(parse_args, monkeypatch)
        for variable in service.environment:
            assert variable.startswith(ENV_PREFIX), f"{service.name}: {variable} is no CLI variable"
            assert variable in accepted, f"{service.name}: {service.command[0]} has no flag for {variable}"
        # The command with the whole environment: what the container's process parses.
        with monkeypatch.context() as patch:
            for variable, value in service.environment.items():
                patch.setenv(variable, value)
            from_env = parse(parse_args, service.command[1:], capsys)
        for variable, value in service.environment.items():
            flag = accepted[variable]
            if flag.get("action") == "store_true":
                continue
            # The value as a flag, the rest from the environment (flags that only make sense together, such as
            # a member's --group and --shard, need each other): argparse checks its type and choices, which it
            # checks for neither in defaults, and it must mean what the variable means.
            with monkeypatch.context() as patch:
                for other, other_value in service.environment.items():
                    if other != variable:
                        patch.setenv(other, other_value)
                expected = parse(parse_args, [*service.command[1:], flag["flag"], value], capsys)
            dest = flag["flag"].lstrip("-").replace("-", "_")
            assert getattr(from_env, dest) == getattr(expected, dest), f"{service.name}: {variable}={value!r}"


def test_the_client_starts_when_the_server_is_healthy(capsys: pytest.CaptureFixture[str]) -> None:
    found = services(resolved())
    server, client = found["server"], found["client"]
    assert server.command[0] == "split-server" and client.command[0] == "split-client"
    assert client.raw["depends_on"] == {"server": {"condition": "service_healthy"}}

    # The client reaches the server by its service name, on the port the server listens on.
    assert client.environment["SPLIT_TARGET"] == f"server:{listening_port(server)}"
    assert_health_checked(server, capsys)


def listening_port(service: Service) -> str:
    """The port a serving service listens on, on all interfaces (in a container, loopback is its own)."""
    address = service.environment["SPLIT_ADDRESS"]
    assert address.startswith("0.0.0.0:"), f"{service.name}: listen on all interfaces in a container"
    return address.rsplit(":", 1)[1]


def assert_health_checked(service: Service, capsys: pytest.CaptureFixture[str]) -> None:
    """The health check: the standard gRPC health service, asked by `split-health` at the service's own port."""
    check = service.healthcheck
    assert check["test"][0] == "CMD", "exec form: the image has no shell to rely on"
    probe = check["test"][1:]
    assert console_scripts()[probe[0]] == "splitlearning.health_probe:main"
    probe_config = parse(cli_module(probe).parse_args, probe[1:], capsys)
    assert probe_config.target == f"127.0.0.1:{listening_port(service)}", service.name
    assert probe_config.timeout < seconds(check["timeout"]), "the probe's deadline ends before compose's"
    for key in ("interval", "timeout", "start_period"):
        assert seconds(check[key]) > 0, key
    assert int(check["retries"]) >= 1


def configs(
    found: dict[str, Service], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> dict[str, Any]:
    """What each service's process parses from its command and environment: its CLI's config."""
    parsed = {}
    for service in found.values():
        with monkeypatch.context() as patch:
            for variable, value in service.environment.items():
                patch.setenv(variable, value)
            parsed[service.name] = parse(cli_module(service.command).parse_args, service.command[1:], capsys)
    return parsed


def test_multi_a_server_an_aggregator_apart_and_three_members(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    found = services(resolved(MULTI_COMPOSE_FILE))
    commands = {name: service.command for name, service in found.items()}
    assert commands == {
        "server": ["split-server"],
        "aggregator": ["split-aggregator"],
        **{member: ["split-client"] for member in MEMBERS},
    }
    parsed = configs(found, monkeypatch, capsys)
    server, aggregator = parsed["server"], parsed["aggregator"]

    # The model owner keeps no rounds: first parts go to the aggregator alone.
    assert server.aggregator is False, "the server must not hold the aggregator (it would see first parts)"
    assert aggregator.members == len(MEMBERS)
    assert aggregator.state_dir is not None and str(aggregator.state_dir).startswith(STATE_DIR)
    assert server.checkpoint_dir is not None, "the server keeps the members' contributions"

    # Each member: the K-th of 3 shards as member K of one SplitFed group, every member stating the same.
    members = [parsed[name] for name in MEMBERS]
    for k, member in enumerate(members, start=1):
        assert member.member == k, "member K trains shard K/N"
        assert member.shard is not None and (member.shard.index, member.shard.count) == (k, len(MEMBERS))
        assert member.target == f"server:{listening_port(found['server'])}"
        assert member.aggregator == f"aggregator:{listening_port(found['aggregator'])}"
        assert member.dataset == "digits"
    shared = {(m.group, m.scheme, m.rounds, m.local_epochs, m.shard_by, m.seed, m.model) for m in members}
    assert len(shared) == 1, f"the members disagree: {shared}"
    assert members[0].scheme == "splitfed"
    assert members[0].shard_by == "random", "IID by default"
    # Every part agrees on the model pair, its seed and the optimizer.
    for name in ("model", "seed", "optimizer", "learning_rate"):
        assert {getattr(member, name) for member in members} == {getattr(server, name)}, name

    # Nothing published: the members reach the server and the aggregator on compose's own network.
    assert not [name for name, service in found.items() if service.raw.get("ports")]


def test_multi_members_start_once_the_server_and_the_aggregator_are_healthy(
    capsys: pytest.CaptureFixture[str],
) -> None:
    found = services(resolved(MULTI_COMPOSE_FILE))
    for name in ("server", "aggregator"):
        assert_health_checked(found[name], capsys)
    healthy = {"condition": "service_healthy"}
    for name in MEMBERS:
        assert found[name].raw["depends_on"] == {"server": healthy, "aggregator": healthy}, name
        assert not found[name].healthcheck, f"{name} trains and exits: nothing waits for its health"
    # Nothing of the server's is needed by the aggregator: it only comes after the server's build.
    assert found["aggregator"].raw["depends_on"] == {"server": {"condition": "service_started"}}
    assert "SPLIT_DEVICE" not in found["aggregator"].environment, "the aggregator runs no TensorFlow"


def test_multi_non_iid_from_one_shell_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`SPLIT_SHARD_BY=label docker compose -f docker-compose.multi.yml up` cuts the digits by label, in a group
    of its own (so an IID run's finished group is not what it reports)."""
    groups = {}
    for shard_by in ("random", "label"):
        found = services(resolved(MULTI_COMPOSE_FILE, shell={"SPLIT_SHARD_BY": shard_by}))
        parsed = configs({name: found[name] for name in MEMBERS}, monkeypatch, capsys)
        assert {config.shard_by for config in parsed.values()} == {shard_by}
        (groups[shard_by],) = {config.group for config in parsed.values()}
    assert groups["random"] != groups["label"]
    default = services(resolved(MULTI_COMPOSE_FILE))
    assert default["member-1"].environment["SPLIT_GROUP"] == groups["random"]


def test_multi_builds_the_image_docker_compose_yml_builds() -> None:
    """The same build (so the engine test's image, and a user's, serves both files)."""
    single, multi = services(resolved(COMPOSE_FILE)), services(resolved(MULTI_COMPOSE_FILE))
    assert multi["server"].raw["build"] == single["server"].raw["build"]
    assert multi["server"].raw["image"] == single["server"].raw["image"]


@pytest.mark.parametrize("variant", list(FILES))
def test_state_goes_to_named_volumes(variant: str) -> None:
    """Every service that keeps state (checkpoints, the aggregator's rounds, the vertical parties' files) keeps it
    in a named volume of its own, read-write; one that reads another's (a vertical party its file) mounts that
    volume read-only; one that keeps none (a group's member) mounts nothing."""
    config = resolved(*FILES[variant])
    written: list[str] = []
    read: list[str] = []
    for service in services(config).values():
        paths = [value for value in [*service.environment.values(), *service.command] if STATE_DIR in value]
        mounts = [volume for volume in service.raw.get("volumes", []) if volume.split(":")[1] == STATE_DIR]
        if not paths:
            assert not service.raw.get("volumes"), f"{service.name}: mounts a volume it keeps nothing in"
            continue
        assert len(mounts) == 1, f"{service.name}: mount a named volume at {STATE_DIR}"
        source, _, *mode = mounts[0].split(":")
        (read if mode == ["ro"] else written).append(source)
    assert written, "no service keeps state"
    assert len(set(written)) == len(written), "each service keeps its own state"
    assert set(read) <= set(written), "a service reads a volume that no service writes"
    assert set(written) <= set(config["volumes"]), "named volumes, declared at the top level"


@pytest.mark.parametrize("variant", list(FILES))
def test_the_image_is_built_once_and_shared(variant: str) -> None:
    """One service builds the image and tags it; the others run that tag (two `build:`s build it twice)."""
    found = services(resolved(*FILES[variant]))
    builder = BUILDERS[variant]
    builders = [service.name for service in found.values() if "build" in service.raw]
    assert builders == [builder], f"exactly one service builds the image, not {builders}"
    assert len({service.raw["image"] for service in found.values()}) == 1, f"all run the image {builder} built"
    for service in found.values():
        if service.name != builder:
            # Compose v1 makes each service's image in dependency order, and pulls a tag it cannot build.
            assert builder in service.raw["depends_on"], f"{service.name} is created before {builder}'s build"


@pytest.mark.parametrize("variant", list(FILES))
def test_every_container_runs_as_the_images_user_under_an_init(variant: str) -> None:
    """The image's non-root user (uid 10001), an init that reaps and forwards signals, and nothing that
    loosens the container's isolation: the same defaults in every file."""
    for service in services(resolved(*FILES[variant])).values():
        assert service.raw.get("init") is True, f"{service.name}: init: true (signals reach the CLI, zombies reaped)"
        loosened = LOOSENERS & set(service.raw)
        assert not loosened, f"{service.name}: sets {sorted(loosened)}"


def test_cpu_by_default_and_a_gpu_each_with_the_override() -> None:
    for service in services(resolved()).values():
        assert service.environment["SPLIT_DEVICE"] == "/CPU:0"
        assert "deploy" not in service.raw, f"{service.name}: reserves devices by default"
    assert services(resolved())["server"].raw["build"]["args"]["TF_EXTRA"] == "cpu"

    gpu = services(resolved(COMPOSE_FILE, GPU_COMPOSE_FILE))
    assert gpu["server"].raw["build"]["args"]["TF_EXTRA"] == "gpu"
    assert {service.raw["image"] for service in gpu.values()} == {"splitlearning:gpu"}
    reserved = []
    for service in gpu.values():
        assert service.environment["SPLIT_DEVICE"] == "/GPU:0", "each container sees its one GPU as /GPU:0"
        (device,) = service.raw["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        reserved.append(tuple(device["device_ids"]))
    assert len(set(reserved)) == len(reserved), f"the services share a GPU by default: {reserved}"


def test_the_image_matches_the_compose_file() -> None:
    build, final = stages()
    assert len(stages()) == 2
    compose_args = {
        arg for service in services(resolved()).values() for arg in service.raw.get("build", {}).get("args", {})
    }

    # The TensorFlow extra: a build argument, `cpu` by default, naming one of pyproject.toml's extras.
    defaults = {}
    for command in build:
        if command.cmd == "ARG" and "=" in command.value[0]:
            name, default = command.value[0].split("=", 1)
            defaults[name] = default
    assert defaults.get("TF_EXTRA") == "cpu"
    assert compose_args <= set(defaults), "compose passes a build argument the Dockerfile does not declare"
    with (REPO / "pyproject.toml").open("rb") as handle:
        extras = tomllib.load(handle)["project"]["optional-dependencies"]
    assert any(requirement.startswith("tensorflow-cpu") for requirement in extras["cpu"])
    assert any(requirement.startswith("tensorflow[and-cuda]") for requirement in extras["gpu"])
    assert any(c.cmd == "RUN" and '".[${TF_EXTRA}]"' in c.value[0] for c in build)

    # The final stage: only the virtual environment from the build stage, no build tools, a non-root user.
    copies = [c for c in final if c.cmd in ("COPY", "ADD")]
    assert [(c.flags, c.value) for c in copies] == [(("--from=build",), ("/opt/venv", "/opt/venv"))]
    for command in final:
        if command.cmd == "RUN":
            assert not re.search(r"\b(apt-get|apt|apk|pip|gcc|make|build-essential)\b", command.value[0]), command
    users = [c.value[0] for c in final if c.cmd == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")

    # What the compose file runs is on the image's PATH: the project's console scripts in /opt/venv/bin.
    env = dict(pair for c in final if c.cmd == "ENV" for pair in zip(c.value[0::2], c.value[1::2], strict=True))
    assert env["PATH"].startswith("/opt/venv/bin:")
    every = [service for files in FILES.values() for service in services(resolved(*files)).values()]
    commands = [s.command[0] for s in every if s.name not in WRITERS]
    commands += [s.healthcheck["test"][1] for s in every if s.healthcheck]
    assert set(commands) <= set(console_scripts())
    # A writer's `python` is the virtual environment's, which holds the project.
    assert {s.command[0] for s in every if s.name in WRITERS} == {"python"}


def test_the_image_holds_every_package_the_project_installs() -> None:
    """`pip install .` in the build stage installs what pyproject.toml names and the build context holds: a
    package not copied there (or kept out by .dockerignore) is silently missing, and its console script fails."""
    with (REPO / "pyproject.toml").open("rb") as handle:
        patterns = tomllib.load(handle)["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {pattern.rstrip("*") for pattern in patterns}
    assert all((REPO / package / "__init__.py").is_file() for package in packages), packages
    # Every console script (split-aggregator's too) runs a module of one of them.
    assert {target.split(".")[0] for target in console_scripts().values()} <= packages

    build = stages()[0]
    copied = {c.value[0] for c in build if c.cmd == "COPY" and not c.flags and c.value[1] == f"./{c.value[0]}"}
    assert packages <= copied, f"the build stage does not copy {sorted(packages - copied)}"
    allowed = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()}
    assert "*" in allowed, ".dockerignore lets in only what it names"
    assert {f"!{package}/" for package in packages} <= allowed, ".dockerignore keeps a package out of the context"


def test_vertical_the_data_service_writes_the_file_each_party_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The data service's code, run here with its volume moved under tmp_path: it writes every party's file where
    that party's SPLIT_DATA names it, and each party's CLI settings read it back as the party expects."""
    found = services(resolved(VERTICAL_COMPOSE_FILE))
    data = found["data"]
    assert data.command[:2] == ["python", "-c"] and len(data.command) == 3 and not data.environment
    assert not data.healthcheck and "depends_on" not in data.raw, "it starts first and exits"
    code = data.command[2].replace(STATE_DIR, str(tmp_path))
    assert code != data.command[2]
    exec(compile(code, "docker-compose.vertical.yml (data)", "exec"), {"__name__": "data"})
    written = capsys.readouterr().out.split()
    assert written == [str(tmp_path / f"{name}.npz") for name in ("label", *FEATURE_PARTIES)]

    parsed = configs({name: found[name] for name in ("label-party", *FEATURE_PARTIES)}, monkeypatch, capsys)
    read = {}
    for name, config in parsed.items():
        path = str(config.data)
        assert path.startswith(f"{STATE_DIR}/"), f"{name} reads its file from the data volume"
        label_column = config.label_column if name == "label-party" else None  # a feature party's CLI has none
        columns = config.columns.split(",") if config.columns else None
        moved = str(tmp_path) + path[len(STATE_DIR) :]
        read[name] = tables.read_table(moved, id_column=config.id_column, label_column=label_column, columns=columns)
    label = read["label-party"]
    assert label.y is not None and label.x is None and len(label.ids) == 1797, "the digits' labels, every id"
    for name in FEATURE_PARTIES:
        table = read[name]
        assert table.y is None and table.x is not None and table.x.shape == (1617, 32), f"{name}: half an image"
        assert set(table.ids) <= set(label.ids)
    assert read["left"].columns != read["right"].columns


def test_vertical_feature_parties_start_when_the_label_party_is_healthy(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    found = services(resolved(VERTICAL_COMPOSE_FILE))
    label = found["label-party"]
    written = {"condition": "service_completed_successfully"}
    assert label.raw["depends_on"] == {"data": written}
    assert_health_checked(label, capsys)
    probe = label.healthcheck["test"][1:]
    assert parse(cli_module(probe).parse_args, probe[1:], capsys).service == VERTICAL_SERVICE
    parsed = configs({name: found[name] for name in ("label-party", *FEATURE_PARTIES)}, monkeypatch, capsys)
    assert parsed["label-party"].party_names == FEATURE_PARTIES
    for name in FEATURE_PARTIES:
        party = parsed[name]
        assert found[name].raw["depends_on"] == {"data": written, "label-party": {"condition": "service_healthy"}}
        assert not found[name].healthcheck, f"{name} trains and exits: nothing waits for its health"
        assert party.name == name
        assert party.server == f"label-party:{listening_port(label)}"
        # Each states the label party's batch-order seed, and trains with the same optimizer.
        for setting in ("seed", "optimizer", "learning_rate"):
            assert getattr(party, setting) == getattr(parsed["label-party"], setting), (name, setting)
    assert len({parsed[name].init_seed for name in FEATURE_PARTIES}) == len(FEATURE_PARTIES), "bottoms differ"
    # Nothing published: the feature parties reach the label party on compose's own network.
    assert not [name for name, service in found.items() if service.raw.get("ports")]
