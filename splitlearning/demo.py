"""`split-demo`: the main job. Start `split-server` and `split-client` as two processes on loopback, train the
bundled digits model, print per-epoch progress and the test accuracy."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

from splitlearning import subprocesses, tensorflow_setup

_SERVER_START_TIMEOUT = 120.0
# The flags that describe the model pair: both processes must be given the same (a U-shaped client needs a
# U-shaped server, both parts come from one --model and --seed, each side trains with the optimizer named).
SHARED_FLAGS = ("--model", "--cut", "--seed", "--optimizer", "--learning-rate")


def parser() -> argparse.ArgumentParser:
    demo = argparse.ArgumentParser(
        prog="split-demo",
        description=__doc__,
        epilog="Every other flag goes to split-client alone (--epochs, --batch-size, --dataset, ...: see "
        "split-client --help). Ctrl-C stops the client as soon as it can, and then the server.",
    )
    demo.add_argument("--model", help="model pair, given to both processes (default: split-client's)")
    demo.add_argument("--cut", choices=["standard", "ushape"], help="cut, given to both processes")
    demo.add_argument("--seed", help="seed of both parts' weights and of the data order, given to both")
    demo.add_argument("--optimizer", help="Keras optimizer name, given to both processes")
    demo.add_argument("--learning-rate", help="the optimizer's learning rate, given to both processes")
    return demo


def split_flags(argv: list[str]) -> tuple[list[str], list[str]]:
    """(flags for both processes, flags for the client alone) from the demo's command line."""
    known, client_only = parser().parse_known_args(argv)
    shared: list[str] = []
    for flag in SHARED_FLAGS:
        value = getattr(known, flag.lstrip("-").replace("-", "_"))
        if value is not None:
            shared += [flag, value]
    return shared, client_only


class _Forward:
    """Ctrl-C reaches the demo alone (the children run in their own process groups): pass each SIGINT or SIGTERM
    on to the client, which stops after the step in flight (a second one: at once); before the client runs,
    stop the demo."""

    def __init__(self) -> None:
        self.client: subprocess.Popen[bytes] | None = None
        self.signum: int | None = None

    def __call__(self, signum: int, _frame: FrameType | None) -> None:
        self.signum = signum
        if self.client is None:
            raise KeyboardInterrupt
        self.client.send_signal(signum)


def main(argv: list[str] | None = None) -> int:
    shared, client_only = split_flags(list(sys.argv[1:] if argv is None else argv))
    absent = tensorflow_setup.missing("split-demo")
    if absent:
        print(absent, file=sys.stderr)
        return 2
    forward = _Forward()
    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    try:
        return _run(shared, client_only, forward)
    except KeyboardInterrupt:
        print("split-demo: stopped on request", file=sys.stderr)
        return 128 + (forward.signum or signal.SIGINT)


def _run(shared: list[str], client_only: list[str], forward: _Forward) -> int:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}
    with tempfile.TemporaryDirectory(prefix="split-demo-") as tmp:
        port_file = Path(tmp) / "port"
        server_flags = ["--address", "127.0.0.1:0", "--port-file", str(port_file), "--log-level", "WARNING"]
        server = subprocess.Popen(
            [sys.executable, "-m", "server_part", *server_flags, *shared], env=env, process_group=0
        )
        try:
            deadline = time.monotonic() + _SERVER_START_TIMEOUT
            while not port_file.exists() or not port_file.read_text().strip():
                if server.poll() is not None:
                    print(f"split-server exited with status {server.returncode}", file=sys.stderr)
                    return 1
                if time.monotonic() > deadline:
                    print("split-server did not start in time", file=sys.stderr)
                    return 1
                time.sleep(0.1)
            port = int(port_file.read_text())
            print(f"split-server is listening on 127.0.0.1:{port}; starting split-client", flush=True)
            client_flags = ["--target", f"127.0.0.1:{port}", "--log-level", "WARNING"]
            forward.client = subprocess.Popen(
                [sys.executable, "-m", "client_part", *client_flags, *shared, *client_only], env=env, process_group=0
            )
            while True:
                try:
                    return forward.client.wait()
                except KeyboardInterrupt:  # not raised once the client runs; kept for safety
                    continue
        finally:
            subprocesses.stop(server, timeout=15)


if __name__ == "__main__":
    raise SystemExit(main())
