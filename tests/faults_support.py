"""Helpers for the fault tests: real processes, a cutting TCP proxy, bounded waits, weight files."""

from __future__ import annotations

import contextlib
import os
import re
import resource
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def wait_for(
    condition: Callable[[], bool],
    timeout: float,
    what: str,
    interval: float = 0.02,
    process: subprocess.Popen[Any] | None = None,
    output: Callable[[], str] = lambda: "",
) -> None:
    """Poll `condition` until true; fail the test (not hang it) after `timeout` seconds, or at once where `process`
    is given and exits first. Either failure's message ends with `output()` (what the process wrote, say)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the process exited ({process.returncode}) before {what}{output()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}{output()}")
        time.sleep(interval)


def wait_for_text(log: Path, text: str, process: subprocess.Popen[Any], timeout: float) -> None:
    """Wait until `process` has written `text` to `log`; fail, with the log's tail, if it exits first or after
    `timeout` seconds."""
    wait_for(
        lambda: text in log.read_text(), timeout, repr(text), 0.1, process, lambda: f":\n{log.read_text()[-3000:]}"
    )


def wait_for_port_file(path: Path, process: subprocess.Popen[Any], timeout: float) -> int:
    """The port `process` writes to `path` (its --port-file), once there; fail if it exits first (with what it
    wrote to its pipes) or after `timeout` seconds."""

    def exited_output() -> str:
        return f": {process.communicate()}" if process.poll() is not None else ""

    wait_for(
        lambda: path.exists() and bool(path.read_text().strip()),
        timeout,
        f"a port in {path}",
        0.1,
        process,
        exited_output,
    )
    return int(path.read_text())


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on now (free until someone binds it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_npz(path: Path, n_train: int = 96, n_test: int = 32, seed: int = 0) -> Path:
    """A tiny dataset in the layout of mnist.npz, 8x8x1 images for the digits-mlp pair."""
    rng = np.random.default_rng(seed)
    np.savez(
        path,
        x_train=rng.random((n_train, 8, 8, 1), dtype=np.float32),
        y_train=rng.integers(0, 10, n_train).astype("int64"),
        x_test=rng.random((n_test, 8, 8, 1), dtype=np.float32),
        y_test=rng.integers(0, 10, n_test).astype("int64"),
    )
    return path


def spawn(module: str, args: Sequence[str], log: Path) -> subprocess.Popen[bytes]:
    """`python -m module args` with this environment (PYTHONPATH included), output to `log`."""
    # PYTHONFAULTHANDLER: a process that `exit_code` finds hung writes every thread's stack to its log on SIGABRT.
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(ROOT), "PYTHONFAULTHANDLER": "1"}
    # An abort writes no core file into the repository: the child inherits this process's limit (a preexec_fn
    # could deadlock the child of a process with threads, as this one has).
    resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", module, *args], env=env, stdout=out, stderr=out, cwd=ROOT)


def exit_code(
    process: subprocess.Popen[bytes],
    log: Path,
    timeout: float,
    what: str = "the process",
    peers: Sequence[tuple[subprocess.Popen[bytes], Path]] = (),
) -> int:
    """`process`'s exit status once it ends. A process still running after `timeout` seconds fails the test: it
    and its `peers` (its server, say: process and log) are sent SIGABRT, so that each writes where its threads
    stand to its log (`spawn` enables Python's fault handler), and are killed; the failure shows their logs' ends."""
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        tails = []
        for each, each_log in ((process, log), *peers):
            with contextlib.suppress(subprocess.TimeoutExpired):
                stop(each, signal.SIGABRT, timeout=10.0)
            with contextlib.suppress(subprocess.TimeoutExpired):
                stop(each)
            tails.append(f"the end of {each_log.name}:\n{_tail(each_log)}")
        raise AssertionError(f"{what} still ran after {timeout:g} s; " + "\n".join(tails)) from None


def _tail(path: Path, size: int = 6000) -> str:
    return path.read_text(errors="replace")[-size:] if path.exists() else "(no log)"


def stop(process: subprocess.Popen[bytes], sig: int = signal.SIGKILL, timeout: float = 15.0) -> int:
    if process.poll() is None:
        process.send_signal(sig)
    return process.wait(timeout=timeout)


def saved_steps(directory: Path) -> list[int]:
    """Steps listed in a CheckpointManager directory's `checkpoint` file (what a restart can restore)."""
    index = directory / "checkpoint"
    try:
        text = index.read_text()
    except OSError:
        return []
    return sorted(int(s) for s in re.findall(r'all_model_checkpoint_paths: ".*?ckpt-(\d+)"', text))


def latest_step(directory: Path) -> int:
    steps = saved_steps(directory)
    return steps[-1] if steps else -1


def latest_session_step(root: Path) -> int:
    """The latest step any session saved under a server's --checkpoint-dir (a folder per session)."""
    folders = [path for path in root.iterdir() if path.is_dir()] if root.is_dir() else []
    return max((latest_step(folder) for folder in folders), default=-1)


def load_weights(path: Path) -> tuple[list[np.ndarray], int]:
    with np.load(path) as archive:
        count = sum(1 for name in archive.files if name.startswith("w"))
        return [archive[f"w{i}"] for i in range(count)], int(archive["iterations"])


def assert_weights_close(actual: list[np.ndarray], expected: list[np.ndarray], what: str) -> None:
    assert len(actual) == len(expected), what
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6, err_msg=f"{what}[{i}]")


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class CuttingProxy:
    """A TCP proxy on 127.0.0.1 (on `port`, 0: any) that forwards both ways and, each time the bytes sent by the
    server reach the next of `cut_every` bytes, drops that chunk (a lost reply) and cuts every connection."""

    def __init__(self, target_port: int, cut_every: int | None = None, port: int = 0) -> None:
        self._target = ("127.0.0.1", target_port)
        self._cut_every = cut_every
        self._next_cut = cut_every
        self._listener = socket.create_server(("127.0.0.1", port))
        self.port = int(self._listener.getsockname()[1])
        self.cuts = 0
        self.server_bytes = 0
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._lock = threading.Lock()
        self._closed = False
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._selector.register(self._listener, selectors.EVENT_READ, "accept")
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._thread = threading.Thread(target=self._run, name="cutting-proxy", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._closed:
            for key, _ in self._selector.select(timeout=0.5):
                if key.data == "wake":
                    return
                if key.data == "accept":
                    client, _ = self._listener.accept()
                    try:
                        upstream = socket.create_connection(self._target, timeout=5)
                    except OSError:
                        client.close()
                        continue
                    with self._lock:
                        self._pairs.append((client, upstream))
                    self._selector.register(client, selectors.EVENT_READ, ("up", client, upstream))
                    self._selector.register(upstream, selectors.EVENT_READ, ("down", upstream, client))
                    continue
                direction, source, sink = key.data
                try:
                    chunk = source.recv(65536)
                except OSError:
                    chunk = b""
                if not chunk:
                    self._close_pair(source)
                    continue
                if direction == "down":
                    self.server_bytes += len(chunk)
                    if self._next_cut is not None and self.server_bytes >= self._next_cut:
                        self._next_cut += self._cut_every or 0
                        self.cuts += 1
                        self.cut()
                        continue
                try:
                    sink.sendall(chunk)
                except OSError:
                    self._close_pair(source)

    def _close_pair(self, member: socket.socket) -> None:
        with self._lock:
            pairs = [p for p in self._pairs if member in p]
            self._pairs = [p for p in self._pairs if member not in p]
        for pair in pairs:
            for sock in pair:
                with contextlib.suppress(KeyError, ValueError):
                    self._selector.unregister(sock)
                sock.close()

    def cut(self) -> None:
        """Close every connection now (the client sees the stream fail and reconnects)."""
        with self._lock:
            members = [p[0] for p in self._pairs]
        for member in members:
            self._close_pair(member)

    def close(self) -> None:
        self._closed = True
        self._wake_w.send(b"x")
        self._thread.join(timeout=5)
        self.cut()
        for sock in (self._listener, self._wake_r, self._wake_w):
            sock.close()
        self._selector.close()
