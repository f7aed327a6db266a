"""Stopping a child process the way every launcher here does: SIGTERM, a grace period, then SIGKILL."""

from __future__ import annotations

import subprocess
from typing import Any


def stop(process: subprocess.Popen[Any], timeout: float) -> int:
    """SIGTERM `process` (unless it has exited) and wait up to `timeout` seconds; SIGKILL it if it is still
    running then. Returns its exit status (negative: the signal that ended it)."""
    if process.poll() is None:
        process.terminate()
        try:
            return process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait()
