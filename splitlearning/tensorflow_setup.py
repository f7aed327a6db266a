"""Loading TensorFlow for a command-line program: a one-line error where it is not installed, and none of its
C++ start-up noise unless `--log-level DEBUG`.

TensorFlow's C++ libraries write to the process's stderr as they load (absl's "All log messages before
absl::InitializeLog()", the oneDNN notice), before `TF_CPP_MIN_LOG_LEVEL` can apply to them; so the import
itself runs with file descriptor 2 pointed at a temporary file, which is replayed if the import fails.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import tempfile
from collections.abc import Callable

from splitlearning import cli

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


def run_program(name: str, log: logging.Logger, log_level: str, run: Callable[[], int]) -> int:
    """A TensorFlow program's `main` around its `run`: the one-line error for a missing TensorFlow (exit 2),
    logging, TensorFlow loaded, then `run`; a set-up error (ValueError, OSError, TypeError) ends in one line
    (exit 2), Ctrl-C in 130."""
    absent = missing(name)
    if absent:
        print(absent, file=sys.stderr)
        return 2
    cli.setup_logging(log_level)
    try:
        load(verbose=log_level == "DEBUG")
        return run()
    except KeyboardInterrupt:
        log.warning("stopped on request")
        return 130
    except (ValueError, OSError, TypeError) as error:
        log.error("%s", error)
        return 2
