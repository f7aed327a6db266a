"""Structured logs: one format for both processes, with the step, session and peer of the line when known.

A line's context comes from `extra={"step": ...}` at the call, or from `bind(...)`, which sets it for the
code that runs inside (a gRPC handler, a training loop) without passing it around. Two formats:

    text: 2025-01-01 12:00:00,000 INFO split-client: epoch 1 done session=3f2a step=23 peer=127.0.0.1:50051
    json: {"time": "...", "level": "INFO", "logger": "split-client", "message": "epoch 1 done", "step": 23, ...}
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from splitlearning.text import clip

FIELDS = ("session", "step", "epoch", "peer", "method", "code")
FORMATS = ("text", "json")

_context: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("splitlearning_log", default=None)


@contextmanager
def bind(fresh: bool = False, **fields: Any) -> Iterator[None]:
    """Add `fields` (session=..., step=..., peer=...) to every log line emitted inside the block.

    `fresh` drops what an outer block bound (a pooled thread starting a new RPC inherits nothing).
    """
    token = _context.set({**({} if fresh else _context.get() or {}), **fields})
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):  # a generator closed from another context: nothing left to undo
            _context.reset(token)


def update(**fields: Any) -> None:
    """Change fields of the innermost `bind` block (the step, as a stream moves on); no-op outside one."""
    bound = _context.get()
    if bound is not None:
        bound.update(fields)


def current() -> dict[str, Any]:
    """The fields `bind` has set here."""
    return dict(_context.get() or {})


class ContextFilter(logging.Filter):
    """Copies the bound fields onto each record (fields given with `extra=` win)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in (_context.get() or {}).items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = " ".join(f"{key}={_field(getattr(record, key))}" for key in FIELDS if hasattr(record, key))
        return f"{line} {fields}" if fields else line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({key: _field(getattr(record, key)) for key in FIELDS if hasattr(record, key)})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def _field(value: Any) -> Any:
    """A bound field as a line shows it: text (a session id, a peer: the client's choice) is clipped."""
    return clip(value) if isinstance(value, str) else value


def configure(level: str = "INFO", fmt: str = "text") -> None:
    """Send this process's logs to stderr at `level` in format `fmt` ('text' or 'json'); replaces handlers."""
    if fmt not in FORMATS:
        raise ValueError(f"--log-format: expected one of {FORMATS}, got {fmt!r}")
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(ContextFilter())
    logging.basicConfig(level=level, handlers=[handler], force=True)
    # TensorFlow's absl logger says "Sharding callback duration: 9 microseconds" at INFO on every checkpoint
    # save: not this project's news. Shown at DEBUG only.
    absl = logging.getLogger("absl")
    absl.setLevel(logging.NOTSET if logging.getLogger().level <= logging.DEBUG else logging.WARNING)


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
