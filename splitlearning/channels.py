"""The one way a program of this project opens a channel to a service: message limits, keepalive, a quick
reconnect, TLS (and, once, the host's TCP hint: splitlearning/links.py)."""

from __future__ import annotations

import grpc

from splitlearning import keepalive, links
from splitlearning.security import TlsConfig

_RECONNECT_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 2000)]


def open_channel(
    target: str, limit: int, tls: TlsConfig | None, keepalive_ms: int = keepalive.CLIENT_PING_MS
) -> grpc.Channel:
    """A channel to `target` taking messages up to `limit` bytes each way, with keepalive, a quick reconnect,
    and TLS when `tls` is set (checking `tls.server_name` where given). The first channel to a peer beyond
    loopback logs what this host's TCP does on a long link, where that costs time (splitlearning/links.py)."""
    links.hint_once(target)
    options: list[tuple[str, int | str]] = [
        ("grpc.max_send_message_length", limit),
        ("grpc.max_receive_message_length", limit),
        *keepalive.client_options(keepalive_ms),
        *_RECONNECT_OPTIONS,
    ]
    if tls is None:
        return grpc.insecure_channel(target, options=options)
    if tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    return grpc.secure_channel(target, tls.channel_credentials(), options=options)
