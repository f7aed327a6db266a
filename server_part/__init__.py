"""The second part of a split model: the gRPC server process.

`SplitServer` is imported on first use, so that `split-server --help` does not load TensorFlow.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from server_part.server import SplitServer

__all__ = ["SplitServer"]


def __getattr__(name: str) -> Any:
    if name == "SplitServer":
        from server_part.server import SplitServer

        return SplitServer
    raise AttributeError(f"module 'server_part' has no attribute {name!r}")
