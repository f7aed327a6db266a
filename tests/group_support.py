"""Helpers for the multi-client process tests: a split-server (the aggregator inside it, or a split-aggregator
apart) and group members on 127.0.0.1, each process logging to a file of its own, killed and restarted with the
same flags."""

from __future__ import annotations

import json
import re
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from splitlearning import part_state
from tests.faults_support import CuttingProxy, exit_code, free_port, load_weights, spawn, stop, wait_for

BATCH = 64
START_TIMEOUT = 120.0  # TensorFlow's import with several processes starting at once on two busy cores
RUN_TIMEOUT = 240.0
COMMON = ["--model", "digits-mlp", "--seed", "3", "--optimizer", "adam", "--learning-rate", "0.01"]


class Run:
    """The processes of one run under `base`. Files: `server.log`, `server.npz` (its --save-weights),
    `server-ckpt/` (its --checkpoint-dir: contributions and the aggregator's state), `aggregator.log`,
    `agg-state/`; per member `NAME.log`, `NAME.npz` (--save-weights), `NAME.json` (--history-json), where NAME is
    `member-K` in group `g` and `GROUP-member-K` in another group.

    Each member listed in `proxied` reaches the server (and the aggregator inside it) through a forwarding proxy
    of its own, on a port of its own, which the test opens and closes (`open_proxy`, `close_proxy`): while it is
    closed the member cannot reach anyone, and retries."""

    def __init__(
        self,
        base: Path,
        dataset: Path,
        *,
        members: int,
        rounds: int,
        deadline: float,
        scheme: str = "splitfed",
        separate_aggregator: bool = False,
        proxied: Sequence[int] = (),
    ) -> None:
        self.base = base
        base.mkdir(parents=True)
        self.dataset = dataset
        self.members, self.rounds, self.scheme = members, rounds, scheme
        self.port = free_port()
        self.aggregator_port = free_port() if separate_aggregator else None
        self.proxy_ports = {k: free_port() for k in proxied}
        self.proxies: dict[int, CuttingProxy] = {}
        rounds_flags = ["--members", str(members), "--round-deadline", f"{deadline:g}"]
        self.server_args = [
            *COMMON, "--address", f"127.0.0.1:{self.port}", "--max-batch-size", str(BATCH), "--log-level", "INFO",
            "--checkpoint-dir", str(base / "server-ckpt"), "--save-weights", str(base / "server.npz"),
        ]  # fmt: skip
        if self.aggregator_port is None:
            self.server_args += ["--aggregator", *rounds_flags]
        self.aggregator_args = [
            "--address", f"127.0.0.1:{self.aggregator_port}", *rounds_flags, "--state-dir", str(base / "agg-state"),
            "--log-level", "INFO",
        ]  # fmt: skip
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self._member_args: dict[str, list[str]] = {}

    # -- flags and files ---------------------------------------------------------------------------------------

    def member_args(self, k: int, group: str = "g", extra: Sequence[str] = ()) -> list[str]:
        name = member_name(k, group)
        port = self.proxy_ports.get(k, self.port)
        args = [
            *COMMON, "--target", f"127.0.0.1:{port}", "--dataset", str(self.dataset), "--validation-split", "0",
            "--batch-size", str(BATCH), "--group", group, "--scheme", self.scheme, "--rounds", str(self.rounds),
            "--shard", f"{k}/{self.members}", "--connect-timeout", str(START_TIMEOUT), "--retry-timeout",
            str(START_TIMEOUT), "--rpc-timeout", "30", "--log-level", "INFO", "--save-weights",
            str(self.base / f"{name}.npz"), "--history-json", str(self.base / f"{name}.json"), *extra,
        ]  # fmt: skip
        if self.aggregator_port is not None:
            args += ["--aggregator", f"127.0.0.1:{self.aggregator_port}"]
        return args

    def log(self, name: str) -> Path:
        return self.base / f"{name}.log"

    def text(self, name: str) -> str:
        path = self.log(name)
        return path.read_text(errors="replace") if path.is_file() else ""

    def count(self, name: str, pattern: str) -> int:
        return len(re.findall(pattern, self.text(name)))

    def history(self, name: str) -> dict[str, Any]:
        return dict(json.loads((self.base / f"{name}.json").read_text()))

    def rounds_trained(self, name: str) -> list[int]:
        """The rounds (round-robin: turns) in a member's --history-json: those its last process trained."""
        return [record["round"] for record in self.history(name)["rounds"]]

    # -- processes ---------------------------------------------------------------------------------------------

    def start(self, groups: Sequence[tuple[str, Sequence[str]]] = (("g", ()),)) -> None:
        """The server (and the aggregator), and every member of each (group, extra member flags); members retry
        until the server serves (--connect-timeout), proxied ones until their proxy opens too."""
        self.start_server()
        if self.aggregator_port is not None:
            self.start_aggregator()
        for group, extra in groups:
            for k in range(1, self.members + 1):
                self.start_member(k, group, extra)

    def start_server(self) -> None:
        self.processes["server"] = spawn("server_part", self.server_args, self.log("server"))

    def start_aggregator(self) -> None:
        self.processes["aggregator"] = spawn("aggregator", self.aggregator_args, self.log("aggregator"))

    def start_member(self, k: int, group: str = "g", extra: Sequence[str] = ()) -> None:
        name = member_name(k, group)
        self._member_args[name] = self.member_args(k, group, extra)
        self.processes[name] = spawn("client_part", self._member_args[name], self.log(name))

    def kill(self, name: str) -> None:
        """SIGKILL a process ('server', 'aggregator', a member's name), which must still run, and reap it."""
        process = self.processes[name]
        assert process.poll() is None, f"{name} ended before it could be killed:\n{self.text(name)[-3000:]}"
        assert stop(process, signal.SIGKILL) == -signal.SIGKILL

    def restart(self, name: str) -> None:
        """Start a killed process again with the same flags."""
        assert self.processes[name].poll() is not None, f"{name} still runs"
        if name == "server":
            self.start_server()
        elif name == "aggregator":
            self.start_aggregator()
        else:
            self.processes[name] = spawn("client_part", self._member_args[name], self.log(name))

    def open_proxy(self, k: int) -> None:
        assert k not in self.proxies, f"member {k}'s proxy is open"
        self.proxies[k] = CuttingProxy(self.port, port=self.proxy_ports[k])

    def close_proxy(self, k: int) -> None:
        self.proxies.pop(k).close()

    def open_proxies_when_ready(self, group: str = "g") -> None:
        """Once every proxied member has started (it logs its membership, then asks the aggregator), open their
        proxies together: they join within a retry's backoff of each other, however slowly each process started."""
        for k in sorted(self.proxy_ports):
            self.wait_log(member_name(k, group), rf"member {k} of group {group} \(", timeout=START_TIMEOUT)
        for k in sorted(self.proxy_ports):
            self.open_proxy(k)

    def wait_log(self, name: str, pattern: str, count: int = 1, timeout: float = RUN_TIMEOUT) -> None:
        """Until `name`'s log matches `pattern` `count` times; fails early once no member runs."""
        wait_for(
            lambda: self.count(name, pattern) >= count or not self.members_running(),
            timeout,
            f"{name}'s log to match {pattern!r} {count} times",
        )
        assert self.count(name, pattern) >= count, f"{pattern!r} not in {name}'s log:\n{self.text(name)[-4000:]}"

    def members_running(self) -> bool:
        return any(p.poll() is None for name, p in self.processes.items() if name not in ("server", "aggregator"))

    def finish(self) -> None:
        """Every member exits 0; then the server (and the aggregator) stop on SIGTERM with 0."""
        for name, process in sorted(self.processes.items()):
            if name not in ("server", "aggregator"):
                peers = [(self.processes[n], self.log(n)) for n in ("server", "aggregator") if n in self.processes]
                code = exit_code(process, self.log(name), RUN_TIMEOUT, name, peers)
                assert code == 0, f"{name} exited {code}:\n{self.text(name)[-5000:]}"
        for name in ("server", "aggregator"):
            if name in self.processes:
                code = stop(self.processes[name], signal.SIGTERM, timeout=30.0)
                assert code == 0, f"{name} exited {code}:\n{self.text(name)[-5000:]}"

    def close(self) -> None:
        """Kill whatever still runs (after a failure)."""
        for process in self.processes.values():
            if process.poll() is None:
                stop(process)
        for k in list(self.proxies):
            self.close_proxy(k)

    # -- results -----------------------------------------------------------------------------------------------

    def member_weights(self, name: str) -> list[np.ndarray]:
        """A member's --save-weights: the group's final first part."""
        return load_weights(self.base / f"{name}.npz")[0]

    def server_weights(self) -> list[np.ndarray]:
        """The server's --save-weights: the part of the session used last."""
        return load_weights(self.base / "server.npz")[0]

    def contributions(self, group: str = "g") -> dict[str, list[np.ndarray]]:
        """The contributions the server still keeps on disk at the end, weights then optimizer state, by file
        name: those of the group's last round (round-robin: turn), from which its final model is made."""
        folder = self.base / "server-ckpt" / "contributions.d" / group
        found = {path.stem: part_state.load(path)[0] for path in sorted(folder.glob("round-*-member-*.npz"))}
        return {name: [*state.weights, *state.optimizer] for name, state in found.items()}


def member_name(k: int, group: str = "g") -> str:
    return f"member-{k}" if group == "g" else f"{group}-member-{k}"


def fedavg(parts: Sequence[Sequence[np.ndarray]], samples: Sequence[int]) -> list[np.ndarray]:
    """docs/protocol.md's average, written out independently of the code under test: sum_k (n_k / sum n) * w_k in
    float64, in the order given, cast back to each tensor's dtype."""
    total = float(sum(samples))
    averaged = []
    for index, first in enumerate(parts[0]):
        accumulator = np.zeros(np.shape(first), np.float64)
        for part, n in zip(parts, samples, strict=True):
            accumulator += (n / total) * np.asarray(part[index], np.float64)
        averaged.append(accumulator.astype(np.asarray(first).dtype))
    return averaged
