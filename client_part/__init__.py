"""The first part of a split model: the client process, which owns the raw data.

`SplitClient` and `RemoteError` are imported on first use, so that `split-client --help` does not load
TensorFlow.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from client_part.client import SplitClient
    from client_part.transport import RemoteError

__all__ = ["RemoteError", "SplitClient"]


def __getattr__(name: str) -> Any:
    if name == "SplitClient":
        from client_part.client import SplitClient

        return SplitClient
    if name == "RemoteError":
        from client_part.transport import RemoteError

        return RemoteError
    raise AttributeError(f"module 'client_part' has no attribute {name!r}")
