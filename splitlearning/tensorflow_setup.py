"""Loading TensorFlow for a command-line program: a one-line error where it is not installed, and none of its
C++ start-up noise unless `--log-level DEBUG`.

TensorFlow's C++ libraries write to the process's stderr as they load (absl's "All log messages before
absl::InitializeLog()", the oneDNN notice), before `TF_CPP_MIN_LOG_LEVEL` can apply to them; so the import
itself runs with file descriptor 2 pointed at a temporary file, which is replayed if the import fails.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile

INSTALL_HINT = "pip install 'splitlearning[cpu]' (or 'splitlearning[gpu]' for CUDA)"


def missing(program: str) -> str | None:
    """The one line to print when TensorFlow is not installed, else None."""
    if importlib.util.find_spec("tensorflow") is None:
        return f"{program} needs TensorFlow, which is not installed: {INSTALL_HINT}"
    return None


def load(verbose: bool) -> None:
    """Import TensorFlow now: quietly unless `verbose` (then every C++ log line, INFO included)."""
    if "tensorflow" in sys.modules:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if verbose else "2")
    if verbose:
        import tensorflow

        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow  # noqa: F401
        except BaseException:
            os.dup2(saved, 2)
            captured.seek(0)
            sys.stderr.write(captured.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def quiet_grpc(argv: list[str]) -> None:
    """Keep gRPC's C core from logging each failed connection attempt (a TLS handshake refused, say: the
    client's own one-line error says it) unless `--log-level DEBUG`. gRPC reads GRPC_VERBOSITY once, as it is
    imported, so a program calls this first thing, with its command line; a value already set is kept."""
    if "grpc" in sys.modules:
        return
    level = os.environ.get("SPLIT_LOG_LEVEL", "")
    for index, arg in enumerate(argv):
        if arg == "--log-level" and index + 1 < len(argv):
            level = argv[index + 1]
        elif arg.startswith("--log-level="):
            level = arg.split("=", 1)[1]
    os.environ.setdefault("GRPC_VERBOSITY", "INFO" if level.upper() == "DEBUG" else "ERROR")
