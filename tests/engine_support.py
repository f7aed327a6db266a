"""A real Docker engine for the deployment tests: the one `scripts/docker_engine.sh` starts (with its own data
root and socket, and the base image made without a registry), never the host's. Where there is none, the tests
are skipped with the reason (failed under SPLIT_TESTS_REQUIRE_ALL=1, as .ci/run runs them)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.deploy_compose import REPO, clean_environ, docker_compose
from tests.system_support import unavailable

# Building the image from scratch (TensorFlow from the package index) on 2 busy cores, and one compose run.
BUILD_TIMEOUT = 480.0
COMPOSE_TIMEOUT = 240.0
_COMMAND_TIMEOUT = 60.0


@dataclass(frozen=True)
class Engine:
    """The engine's client binary and the environment that points every docker and compose call at it."""

    docker: str
    environment: dict[str, str]

    def run(self, *args: str, timeout: float = _COMMAND_TIMEOUT, check: bool = True) -> str:
        """`docker ARGS...`: its stdout; fails the test (with stderr) when it fails and `check`."""
        result = subprocess.run(
            [self.docker, *args], capture_output=True, text=True, env=self.environment, timeout=timeout, check=False
        )
        if check:
            assert result.returncode == 0, f"docker {' '.join(args)} failed ({result.returncode}):\n{result.stderr}"
        return result.stdout

    def compose(self, project: str, *args: str, extra: dict[str, str], timeout: float = COMPOSE_TIMEOUT) -> Run:
        """`docker-compose -p PROJECT ARGS...` in the checkout, with the engine's environment plus `extra`."""
        started = time.monotonic()
        result = subprocess.run(
            [docker_compose(), "--project-directory", str(REPO), "-p", project, *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            env={**self.environment, **extra},
            timeout=timeout,
            check=False,
        )
        return Run(result.returncode, result.stdout + result.stderr, time.monotonic() - started)

    def call(self, *args: str, timeout: float = _COMMAND_TIMEOUT) -> Run:
        """`docker ARGS...` whatever its status: the status and stdout and stderr together (a container's log, an
        `exec` whose status is the point)."""
        started = time.monotonic()
        result = subprocess.run(
            [self.docker, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=self.environment,
            timeout=timeout,
            check=False,
        )
        return Run(result.returncode, result.stdout, time.monotonic() - started)

    def events(self, since: float, until: float) -> list[dict[str, Any]]:
        """The engine's container events between two times (seconds since the epoch), oldest first."""
        lines = self.run(
            "events",
            "--since",
            f"{since:.3f}",
            "--until",
            f"{until:.3f}",
            "--filter",
            "type=container",
            "--format",
            "{{json .}}",
        )
        return [json.loads(line) for line in lines.splitlines() if line.strip()]

    def inspect(self, kind: str, name: str) -> dict[str, Any]:
        found = json.loads(self.run(kind, "inspect", name))
        assert isinstance(found, list) and len(found) == 1
        return dict(found[0])


@dataclass(frozen=True)
class Run:
    returncode: int
    output: str
    seconds: float


def engine() -> Engine:
    """The engine scripts/docker_engine.sh started for this run; skips (or fails) the test where there is none."""
    if os.environ.get("SPLIT_DOCKER_ENGINE") != "1":
        unavailable("no Docker engine of its own: run the tests under scripts/docker_engine.sh (.ci/run does)")
    docker = os.environ.get("SPLIT_DOCKER") or shutil.which("docker")
    if docker is None:
        unavailable("no docker client on PATH")
    docker_compose()
    environment = clean_environ()
    # compose v1 builds through this client (COMPOSE_DOCKER_CLI_BUILD), so with BuildKit and the same cache.
    environment["PATH"] = f"{Path(docker).parent}{os.pathsep}{environment.get('PATH', '')}"
    environment.update(COMPOSE_DOCKER_CLI_BUILD="1", DOCKER_BUILDKIT="1")
    found = Engine(docker, environment)
    answer = subprocess.run([docker, "version"], capture_output=True, text=True, env=environment, check=False)
    if answer.returncode != 0:
        unavailable(f"the Docker engine at {environment.get('DOCKER_HOST')} does not answer: {answer.stderr.strip()}")
    return found


def pip_ca_bundle() -> str | None:
    """The CA bundle this machine's pip trusts (an egress proxy's own CA, say): PIP_CERT, REQUESTS_CA_BUNDLE,
    SSL_CERT_FILE, else pip's configured `cert`. The image build gets it as the `pip-ca` secret."""
    for variable in ("PIP_CERT", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE"):
        if os.path.isfile(os.environ.get(variable, "")):
            return os.environ[variable]
    configured = subprocess.run(
        [sys.executable, "-m", "pip", "config", "get", "global.cert"], capture_output=True, text=True, check=False
    ).stdout.strip()
    return configured if configured and os.path.isfile(configured) else None


def build_image(engine: Engine, tag: str) -> Run:
    """`docker build` of the checkout with BuildKit, as the Dockerfile documents it behind a proxy."""
    args = ["build", "--progress", "plain", "-t", tag]
    bundle = pip_ca_bundle()
    if bundle:
        args += ["--secret", f"id=pip-ca,src={bundle}"]
    if os.environ.get("PIP_INDEX_URL"):
        args += ["--build-arg", f"PIP_INDEX_URL={os.environ['PIP_INDEX_URL']}"]
    started = time.monotonic()
    result = subprocess.run(
        [engine.docker, *args, str(REPO)],
        capture_output=True,
        text=True,
        env=engine.environment,
        timeout=BUILD_TIMEOUT,
        check=False,
    )
    return Run(result.returncode, result.stdout + result.stderr, time.monotonic() - started)


def volume_files(engine: Engine, volume: str) -> list[Path]:
    """Every file in a named volume, read on the host (root) where the engine keeps it."""
    mountpoint = volume_path(engine, volume)
    return sorted(path.relative_to(mountpoint) for path in mountpoint.rglob("*") if path.is_file())


def volume_path(engine: Engine, volume: str) -> Path:
    """Where the engine keeps a named volume's files on the host."""
    return Path(engine.inspect("volume", volume)["Mountpoint"])
