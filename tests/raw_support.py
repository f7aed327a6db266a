"""Requests as raw bytes on the wire, past the generated stubs' serializers (for hostile and broken input)."""

from __future__ import annotations

import grpc

SERVICE = "/splitlearning.v1.SplitLearningService/"
# No protobuf message: a string field (session_id) that claims 16 bytes where 1 follows.
UNDECODABLE = b"\x0a\x10x"


def send_raw(channel: grpc.Channel, method: str, payload: bytes, timeout: float = 10.0) -> None:
    """Send `payload` as it is to `method` (Train: as a stream's only message); a refusal raises grpc.RpcError."""
    identity = lambda data: data  # noqa: E731 (bytes on the wire as they are)
    if method == "Train":
        stream = channel.stream_stream(SERVICE + method, request_serializer=identity, response_deserializer=identity)
        list(stream(iter([payload]), timeout=timeout))
    else:
        unary = channel.unary_unary(SERVICE + method, request_serializer=identity, response_deserializer=identity)
        unary(payload, timeout=timeout)
