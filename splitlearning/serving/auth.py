"""The server's bearer-token check: a gRPC interceptor run once per RPC (once per stream, not per message).

Every RPC must carry `authorization: Bearer <token>` metadata, compared in constant time; the standard health
service is exempt so orchestrators can probe without the secret. A refusal is UNAUTHENTICATED and is logged
with the peer and the method, never with the token (neither the expected one nor the one offered).
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable
from typing import Any

import grpc

from splitlearning.security import AUTH_METADATA_KEY, AUTH_SCHEME, Secret
from splitlearning.text import clip

log = logging.getLogger(__name__)

HEALTH_PREFIX = "/grpc.health.v1.Health/"
_REFUSAL = "missing or invalid bearer token (send 'authorization: Bearer <token>' metadata)"


class TokenAuthInterceptor(grpc.ServerInterceptor):
    """Refuses every RPC (health checks excepted) whose bearer token is not `token`."""

    def __init__(self, token: Secret) -> None:
        self._expected = (AUTH_SCHEME + token.reveal()).encode("utf-8")

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        method: str = handler_call_details.method
        if method.startswith(HEALTH_PREFIX) or self._authorized(handler_call_details):
            return continuation(handler_call_details)
        handler = continuation(handler_call_details)
        if handler is None:  # an unknown method: let gRPC answer UNIMPLEMENTED as usual
            return None
        return _refusing(handler, method)

    def _authorized(self, details: grpc.HandlerCallDetails) -> bool:
        offered = b""
        for key, value in details.invocation_metadata or ():
            if key == AUTH_METADATA_KEY:
                offered = value.encode("utf-8") if isinstance(value, str) else bytes(value)
                break
        # compare_digest takes time independent of where the first difference lies.
        return hmac.compare_digest(offered, self._expected)


def _refusing(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    """A handler with `handler`'s response kind that aborts with UNAUTHENTICATED without reading the request.

    It is request-streaming whatever the method's kind: gRPC calls such a handler before any request message
    has arrived, so a peer that never finishes its request cannot hold the thread (see admission.py).
    """

    def abort(_requests: Any, context: grpc.ServicerContext) -> Any:
        log.warning("refused %s: %s: %s", clip(_peer(context)), clip(method), "missing or invalid bearer token")
        context.abort(grpc.StatusCode.UNAUTHENTICATED, _REFUSAL)

    if handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort)
    return grpc.stream_unary_rpc_method_handler(abort)


def _peer(context: grpc.ServicerContext) -> str:
    try:
        return context.peer()
    except Exception:
        return "unknown peer"
