"""Checking a listening address before anything heavy starts: it resolves, and its port is free."""

from __future__ import annotations

import errno
import socket
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import grpc

    from splitlearning.security import TlsConfig


def split_host_port(address: str, flag: str = "--address") -> tuple[str, int]:
    """'host:port' or '[v6]:port' -> (host, port); a ValueError naming `flag` otherwise."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{flag}: expected host:port (e.g. 127.0.0.1:50051, 0 for a free port), got {address!r}")
    return host.strip("[]"), int(port)


def check_bindable(address: str, flag: str = "--address") -> None:
    """Raise OSError with a one-line cause and fix if `address` does not resolve or its port is taken."""
    host, port = split_host_port(address, flag)
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        raise OSError(
            f"{flag} {address}: the host {host!r} does not resolve ({error.strerror}); give an address of this "
            f"machine, e.g. 127.0.0.1:{port} or 0.0.0.0:{port} for every interface"
        ) from None
    if port == 0:
        return
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does: TIME_WAIT is no conflict
            try:
                probe.bind(sockaddr)
            except OSError as error:
                if error.errno == errno.EADDRINUSE:
                    raise OSError(
                        f"{flag} {address}: port {port} is already in use (another server or aggregator?); stop that "
                        "process or choose another port (0 picks a free one)"
                    ) from None
                if error.errno == errno.EADDRNOTAVAIL:
                    raise OSError(
                        f"{flag} {address}: {host} is not an address of this machine; use one of its addresses, "
                        f"or 0.0.0.0:{port} for every interface"
                    ) from None
                raise OSError(f"{flag} {address}: cannot listen there: {error.strerror}") from None


def bind(server: grpc.Server, address: str, tls: TlsConfig | None) -> int:
    """Add `address` to `server` (TLS when `tls` is set) and return the bound port; a port that cannot be bound
    raises OSError saying why where it can (gRPC's own error says only "Failed to bind")."""
    try:
        port = server.add_secure_port(address, tls.server_credentials()) if tls else server.add_insecure_port(address)
    except RuntimeError:
        port = 0
        check_bindable(address)
    if port == 0:
        raise OSError(f"could not bind {address}")
    return int(port)
