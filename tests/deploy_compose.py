"""What the deployment tests share: the compose file as `docker-compose config` resolves it, the image's
environment from the Dockerfile, and running a service's command the way the image's console scripts do."""

from __future__ import annotations

import copy
import functools
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dockerfile
import yaml

from tests.system_support import unavailable

REPO = Path(__file__).resolve().parent.parent
COMPOSE_FILE = REPO / "docker-compose.yml"
GPU_COMPOSE_FILE = REPO / "docker-compose.gpu.yml"
MULTI_COMPOSE_FILE = REPO / "docker-compose.multi.yml"
VERTICAL_COMPOSE_FILE = REPO / "docker-compose.vertical.yml"
DOCKERFILE = REPO / "Dockerfile"
# The prefix of every variable the CLIs read (splitlearning.cli.ENV_PREFIX, kept import-free here).
ENV_PREFIX = "SPLIT_"
_COMPOSE_TIMEOUT = 60.0
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(us|ms|s|m|h)")
_SECONDS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


@dataclass(frozen=True)
class Service:
    """One service of the resolved compose file: what the container runs, and with what environment."""

    name: str
    command: list[str]
    environment: dict[str, str]
    raw: dict[str, Any] = field(repr=False)

    @property
    def healthcheck(self) -> dict[str, Any]:
        return dict(self.raw.get("healthcheck") or {})


def docker_compose() -> str:
    """Debian's `docker-compose` (1.29): validates and resolves a compose file offline, without an engine."""
    found = shutil.which("docker-compose")
    if found is None:
        unavailable("docker-compose is not installed: `apt-get install --no-install-recommends docker-compose`")
    return found


def clean_environ() -> dict[str, str]:
    """This process's environment without SPLIT_* variables, so neither compose interpolation nor the CLIs
    pick up a developer's settings: what the services get comes from the compose file alone."""
    return {key: value for key, value in os.environ.items() if not key.startswith(ENV_PREFIX)}


def compose_config(*files: Path, shell: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`docker-compose -f FILE... config`: validate against the compose schema, merge, interpolate (from the
    variables `shell` sets, as a user's shell would, and nothing else of SPLIT_*)."""
    args = [docker_compose(), "--project-directory", str(REPO)]
    for path in files:
        args += ["-f", str(path)]
    return subprocess.run(
        [*args, "config"],
        capture_output=True,
        text=True,
        env={**clean_environ(), **(shell or {})},
        timeout=_COMPOSE_TIMEOUT,
        check=False,
    )


def resolved(*files: Path, shell: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The compose file(s) as compose itself resolves them (with `shell`'s variables set); fails the test when
    compose rejects them."""
    return copy.deepcopy(_resolved(files or (COMPOSE_FILE,), tuple(sorted((shell or {}).items()))))


@functools.cache
def _resolved(files: tuple[Path, ...], shell: tuple[tuple[str, str], ...] = ()) -> dict[str, Any]:
    result = compose_config(*files, shell=dict(shell))
    assert result.returncode == 0, f"docker-compose config failed:\n{result.stderr}"
    config = yaml.safe_load(result.stdout)
    assert isinstance(config, dict)
    return config


def services(config: dict[str, Any]) -> dict[str, Service]:
    found: dict[str, Service] = {}
    for name, raw in config["services"].items():
        command = raw.get("command")
        assert isinstance(command, list), f"{name}: give `command` in exec form (a list), not a shell string"
        variables = raw.get("environment") or {}  # a one-shot service may set none
        environment = {str(key): "" if value is None else str(value) for key, value in variables.items()}
        found[name] = Service(name, [str(arg) for arg in command], environment, raw)
    return found


def seconds(duration: str | float | int) -> float:
    """A compose duration ('5s', '1m30s', '2m') in seconds."""
    if isinstance(duration, int | float):
        return float(duration)
    parts = _DURATION.findall(duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"not a compose duration: {duration!r}"
    return sum(float(number) * _SECONDS[unit] for number, unit in parts)


def stages() -> list[list[Any]]:
    """The Dockerfile's instructions, one list per build stage (what precedes the first FROM is dropped)."""
    found: list[list[Any]] = []
    for command in dockerfile.parse_file(str(DOCKERFILE)):
        if command.cmd == "FROM":
            found.append([])
        if found:
            found[-1].append(command)
    return found


def image_environment() -> dict[str, str]:
    """The final stage's ENV, as a container of the image starts with, less PATH (the test keeps its own)."""
    environment: dict[str, str] = {}
    for command in stages()[-1]:
        if command.cmd == "ENV":
            pairs = command.value
            environment.update(zip(pairs[0::2], pairs[1::2], strict=True))
    environment.pop("PATH", None)
    return environment


def console_scripts() -> dict[str, str]:
    """pyproject.toml's [project.scripts]: console script name -> 'module:function'."""
    with (REPO / "pyproject.toml").open("rb") as handle:
        return dict(tomllib.load(handle)["project"]["scripts"])


def entry_point(command: list[str]) -> list[str]:
    """The argv that runs `command` as the image does: its first word is one of the project's console scripts
    (on the image's PATH); here the same entry point runs under this interpreter, with the same arguments."""
    scripts = console_scripts()
    assert command and command[0] in scripts, f"{command!r}: not one of the project's console scripts {scripts}"
    module, function = scripts[command[0]].split(":")
    code = f"import sys; from {module} import {function}; sys.exit({function}())"
    return [sys.executable, "-c", code, *command[1:]]


def volume_targets(service: Service) -> list[str]:
    """Where the service's named volumes are mounted in its container."""
    targets = []
    for volume in service.raw.get("volumes") or []:
        if isinstance(volume, dict):
            targets.append(str(volume["target"]))
        else:  # the short form, source:target[:mode]
            targets.append(str(volume).split(":")[1])
    return targets


def process_environment(service: Service, volumes: Path | None = None) -> dict[str, str]:
    """What the service's process sees: the image's ENV, then the service's `environment`, over this process's
    own environment (for PYTHONPATH and the like) cleared of SPLIT_* variables.

    With `volumes`, paths under the service's volume mounts move under `volumes / service name`: each service
    gets a state directory of its own, as its named volume gives it in a container.
    """
    environment = {**clean_environ(), **image_environment(), **service.environment}
    if volumes is not None:
        for target in volume_targets(service):
            for key, value in environment.items():
                if value == target or value.startswith(target.rstrip("/") + "/"):
                    environment[key] = str(volumes / service.name) + value[len(target.rstrip("/")) :]
    return environment
