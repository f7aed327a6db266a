"""The second part of a split model: the gRPC server process."""

from server_part.server import SplitServer

__all__ = ["SplitServer"]
