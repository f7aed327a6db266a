"""The first part of a split model: the client process, which owns the raw data."""

from client_part.client import SplitClient
from client_part.transport import RemoteError

__all__ = ["RemoteError", "SplitClient"]
