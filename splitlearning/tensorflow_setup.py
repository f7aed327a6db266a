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
