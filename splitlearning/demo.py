"""`split-demo`: the main job. Start `split-server` and `split-client` as two processes on loopback, train the
bundled digits model, print per-epoch progress and the test accuracy. Extra flags go to the client (`--cut` to
both)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from splitlearning import subprocesses

_SERVER_START_TIMEOUT = 120.0


def main(argv: list[str] | None = None) -> int:
    client_args = list(sys.argv[1:] if argv is None else argv)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    with tempfile.TemporaryDirectory(prefix="split-demo-") as tmp:
        port_file = Path(tmp) / "port"
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "server_part",
                "--address",
                "127.0.0.1:0",
                "--port-file",
                str(port_file),
                "--log-level",
                "WARNING",
                *_shared_flags(client_args),
            ],
            env=env,
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
            client = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "client_part",
                    "--target",
                    f"127.0.0.1:{port}",
                    "--log-level",
                    "WARNING",
                    *client_args,
                ],
                env=env,
                check=False,
            )
            return client.returncode
        finally:
            subprocesses.stop(server, timeout=15)


def _shared_flags(client_args: list[str]) -> list[str]:
    """The client flags the server must mirror: `--cut` (a U-shaped client needs a U-shaped server)."""
    shared: list[str] = []
    for index, arg in enumerate(client_args):
        if arg.startswith("--cut="):
            shared.append(arg)
        elif arg == "--cut" and index + 1 < len(client_args):
            shared += [arg, client_args[index + 1]]
    return shared


if __name__ == "__main__":
    raise SystemExit(main())
