"""The standard health service (`grpc.health.v1.Health`), registered so that bytes that are no message are
INVALID_ARGUMENT, as on the project's own service, and cost at most one log line per peer per minute.

Registered with the generated code, a request that does not decode made gRPC answer INTERNAL ("Exception
deserializing request!") and log a traceback each time; the health service is reachable without the token,
so anyone who reached the port could fill the log (issue 16). Here the deserializer hands such bytes over as
an `Undecodable` (see servicer.py) and the handler refuses it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2

from splitlearning.serving.edge import Undecodable
from splitlearning.serving.ratelimit import LOG_INTERVAL_S, OncePerPeer
from splitlearning.text import clip

log = logging.getLogger(__name__)

T = TypeVar("T")


def add_health_to_server(servicer: health.HealthServicer, server: grpc.Server) -> None:
    """Register `servicer` as `health_pb2_grpc.add_HealthServicer_to_server` does, with lenient deserializers."""
    service = health_pb2.DESCRIPTOR.services_by_name["Health"]
    once = OncePerPeer()
    deserialize = _lenient(health_pb2.HealthCheckRequest.FromString)
    serialize = health_pb2.HealthCheckResponse.SerializeToString
    handlers = {
        "Check": grpc.unary_unary_rpc_method_handler(
            _refusing_undecodable(servicer.Check, once), request_deserializer=deserialize, response_serializer=serialize
        ),
        "Watch": grpc.unary_stream_rpc_method_handler(
            _refusing_undecodable(servicer.Watch, once), request_deserializer=deserialize, response_serializer=serialize
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


def _lenient(parse: Callable[[bytes], T]) -> Callable[[bytes], T | Undecodable]:
    def deserialize(data: bytes) -> T | Undecodable:
        try:
            return parse(data)
        except DecodeError as error:
            return Undecodable("HealthCheckRequest", len(data), str(error) or "undecodable")

    return deserialize


def _refusing_undecodable(behavior: Callable[[Any, grpc.ServicerContext], T], once: OncePerPeer) -> Callable[..., T]:
    def handle(request: Any, context: grpc.ServicerContext) -> T:
        if isinstance(request, Undecodable):
            peer = context.peer()
            if once(peer):
                log.warning(
                    "refused %s: %s (more from this peer within %g s are not logged)",
                    clip(peer),
                    request.refusal(),
                    LOG_INTERVAL_S,
                )
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.refusal())
        return behavior(request, context)

    return handle
