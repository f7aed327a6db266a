"""Keepalive settings both parts agree on, so idle links stay up and neither side is told `too_many_pings`.

The client pings an idle connection every `CLIENT_PING_MS`; the server accepts pings as often as every
`SERVER_MIN_PING_MS` (less than the client's interval, or the server answers GOAWAY `too_many_pings`) and
pings the client itself every `SERVER_PING_MS`. A peer that does not answer a ping within the timeout is
dropped, which is how a dead peer behind a silent network is noticed. Pings carry no data, so a pause of
minutes between steps (a slow data loader) keeps the stream open.
"""

from __future__ import annotations

CLIENT_PING_MS = 30_000
SERVER_MIN_PING_MS = 10_000
SERVER_PING_MS = 60_000
PING_TIMEOUT_MS = 20_000


def client_options(ping_ms: int = CLIENT_PING_MS) -> list[tuple[str, int]]:
    return [
        ("grpc.keepalive_time_ms", ping_ms),
        ("grpc.keepalive_timeout_ms", PING_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def server_options(min_ping_ms: int = SERVER_MIN_PING_MS) -> list[tuple[str, int]]:
    return [
        ("grpc.keepalive_time_ms", SERVER_PING_MS),
        ("grpc.keepalive_timeout_ms", PING_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", min_ping_ms),
        ("grpc.http2.max_ping_strikes", 2),
        ("grpc.http2.max_pings_without_data", 0),
    ]
