"""Two hosts: the compose file's `server` and `client` commands, each in its own network namespace.

Two namespaces stand for two machines, joined by a veth pair (10.200.5.1 and 10.200.5.2); the client's host
resolves the name `server` through its own hosts file, as compose's DNS would. Each process runs the command and
environment the compose file gives its service (read from `docker-compose config`, not copied), with the image's
ENV; the client starts once the compose health check passes, as `depends_on: service_healthy` orders it.
Needs root (namespaces); skipped, with that reason, elsewhere.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from splitlearning import subprocesses
from tests.deploy_compose import Service, entry_point, process_environment, resolved, seconds, services
from tests.system_support import unavailable

pytestmark = pytest.mark.processes  # every test here starts OS processes

SERVER_ADDRESS = "10.200.5.1"
CLIENT_ADDRESS = "10.200.5.2"
PREFIX = 24
IP_TIMEOUT = 30.0
CLIENT_TIMEOUT = 300.0  # seconds: ten epochs of the digits demo take about ten on an idle machine
STOP_TIMEOUT = 30.0
# A run that reports this (chance is 0.1 on ten classes) has trained; the demo reaches about 0.95.
MIN_ACCURACY = 0.5
# Ten epochs of 1,437 images send megabytes of cut activations; a run that crossed the link sent far more.
MIN_LINK_BYTES = 100_000


@dataclass(frozen=True)
class Hosts:
    server: str  # namespace names
    client: str


def ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT, check=False)


def ip_ok(*args: str) -> None:
    result = ip(*args)
    assert result.returncode == 0, f"ip {' '.join(args)}: {result.stderr.strip()}"


@pytest.fixture
def hosts() -> Iterator[Hosts]:
    """Two namespaces joined by a veth pair, `lo` up in each, and a hosts file naming `server` for the client.

    Everything is removed afterwards, whatever happened: the namespaces (with them the veth pair and any
    process's sockets) and /etc/netns/<name>.
    """
    if os.geteuid() != 0:
        unavailable("creating network namespaces needs root (`ip netns add`); CI runs as root")
    if shutil.which("ip") is None:
        unavailable("`ip` is missing: apt-get install iproute2")
    token = f"{os.getpid()}-{secrets.token_hex(3)}"
    names = Hosts(server=f"split5-server-{token}", client=f"split5-client-{token}")
    created: list[str] = []
    etc = Path("/etc/netns") / names.client
    try:
        for namespace in (names.server, names.client):
            result = ip("netns", "add", namespace)
            if result.returncode != 0 and "Operation not permitted" in result.stderr:
                unavailable(f"cannot create network namespaces here: {result.stderr.strip()}")
            assert result.returncode == 0, f"ip netns add {namespace}: {result.stderr.strip()}"
            created.append(namespace)
            ip_ok("-n", namespace, "link", "set", "lo", "up")
        # One cable between the two hosts: eth0 in each, created inside the namespaces, never on this host.
        ip_ok("-n", names.server, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", names.client)
        for namespace, address in ((names.server, SERVER_ADDRESS), (names.client, CLIENT_ADDRESS)):
            ip_ok("-n", namespace, "addr", "add", f"{address}/{PREFIX}", "dev", "eth0")
            ip_ok("-n", namespace, "link", "set", "eth0", "up")
        # `ip netns exec` bind-mounts /etc/netns/<name>/hosts over /etc/hosts.
        etc.mkdir(parents=True)
        (etc / "hosts").write_text(f"127.0.0.1\tlocalhost\n{SERVER_ADDRESS}\tserver\n")
        yield names
    finally:
        for namespace in created:
            ip("netns", "delete", namespace)
        shutil.rmtree(etc, ignore_errors=True)


def in_namespace(namespace: str, command: list[str]) -> list[str]:
    return ["ip", "netns", "exec", namespace, *entry_point(command)]


def link_bytes(namespace: str, direction: str) -> int:
    result = subprocess.run(
        ["ip", "netns", "exec", namespace, "cat", f"/sys/class/net/eth0/statistics/{direction}_bytes"],
        capture_output=True,
        text=True,
        timeout=IP_TIMEOUT,
        check=True,
    )
    return int(result.stdout)


def wait_healthy(hosts: Hosts, server: Service, process: subprocess.Popen[bytes], log: Path) -> None:
    """Compose's health check, as compose runs it: the `test` command in the server's namespace every
    `interval`; failures count only after `start_period`, and `retries` of them in a row mean unhealthy."""
    check = server.healthcheck
    assert check["test"][0] == "CMD"
    probe = in_namespace(hosts.server, check["test"][1:])
    interval, timeout = seconds(check["interval"]), seconds(check["timeout"])
    start_period, retries = seconds(check["start_period"]), int(check["retries"])
    started, failures = time.monotonic(), 0
    while True:
        assert process.poll() is None, f"the server exited with {process.returncode}:\n{log.read_text()}"
        try:
            result = subprocess.run(
                probe, env=process_environment(server), capture_output=True, text=True, timeout=timeout, check=False
            )
            healthy, detail = result.returncode == 0, result.stdout + result.stderr
        except subprocess.TimeoutExpired:
            healthy, detail = False, f"the probe took more than {timeout} s"
        if healthy:
            return
        if time.monotonic() - started > start_period:
            failures += 1
            assert failures < retries, f"the server is unhealthy: {detail.strip()}\n{log.read_text()}"
        time.sleep(interval)


def test_compose_services_train_across_two_hosts(hosts: Hosts, tmp_path: Path) -> None:
    found = services(resolved())
    server, client = found["server"], found["client"]
    assert client.raw["depends_on"] == {"server": {"condition": "service_healthy"}}

    log = tmp_path / "server.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            in_namespace(hosts.server, server.command),
            env=process_environment(server, tmp_path),
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_healthy(hosts, server, process, log)
            result = subprocess.run(
                in_namespace(hosts.client, client.command),
                env=process_environment(client, tmp_path),
                capture_output=True,
                text=True,
                timeout=CLIENT_TIMEOUT,
                check=False,
            )
        finally:
            server_status = subprocesses.stop(process, STOP_TIMEOUT)  # killed after it: negative, and fails below
    output = f"client stdout:\n{result.stdout}\nclient stderr:\n{result.stderr}\nserver:\n{log.read_text()}"
    assert result.returncode == 0, output

    # The client's result: every epoch the compose file asks for, and the test accuracy.
    epochs = int(client.environment["SPLIT_EPOCHS"])
    assert re.search(rf"^trained {epochs} epochs, \d+ steps", result.stdout, re.M), output
    reported = re.search(r"^test .*\baccuracy: ([0-9.]+)$", result.stdout, re.M)
    assert reported, output
    assert float(reported.group(1)) >= MIN_ACCURACY, output

    # The training went over the link between the two hosts, not some shortcut.
    assert link_bytes(hosts.client, "tx") >= MIN_LINK_BYTES
    assert link_bytes(hosts.server, "rx") >= MIN_LINK_BYTES
    # Stopped as compose stops it (SIGTERM), the server shuts down cleanly.
    assert server_status == 0, log.read_text()
