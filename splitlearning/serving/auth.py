"""The server's bearer-token check: a gRPC interceptor run once per RPC (once per stream, not per message).

Every RPC must carry `authorization: Bearer <token>` metadata, compared in constant time; the standard health
service is exempt so orchestrators can probe without the secret. A refusal is UNAUTHENTICATED, counted in
`split_unauthenticated_requests_total{method}` (the registry the host serves), and logged with the peer and the
method, never with the token (neither the expected one nor the one offered): at most one line per peer (host) a
minute, so a flood of token-less calls is no flood of log lines (issue 26).
"""

from __future__ import annotations

import hmac
import logging
import threading
import weakref
from collections.abc import Callable
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter

from splitlearning.security import AUTH_METADATA_KEY, AUTH_SCHEME, Secret
from splitlearning.serving.edge import abort, peer
from splitlearning.serving.ratelimit import LOG_INTERVAL_S, OncePerPeer
from splitlearning.text import clip

log = logging.getLogger(__name__)

HEALTH_PREFIX = "/grpc.health.v1.Health/"
_REFUSAL = "missing or invalid bearer token (send 'authorization: Bearer <token>' metadata)"
UNAUTHENTICATED_SERIES = "split_unauthenticated_requests"  # a counter: Prometheus shows it with _total
_counters: weakref.WeakKeyDictionary[CollectorRegistry, Counter] = weakref.WeakKeyDictionary()
_counters_lock = threading.Lock()


def unauthenticated_requests(registry: CollectorRegistry) -> Counter:
    """The counter of refused calls in `registry`, created there on first use (a server that starts again, with
    a new host on the same registry, counts on in the same series)."""
    with _counters_lock:
        counter = _counters.get(registry)
        if counter is None:
            counter = Counter(
                UNAUTHENTICATED_SERIES,
                "Calls refused for a missing or invalid bearer token (UNAUTHENTICATED), by RPC",
                ["method"],
                registry=registry,
            )
            _counters[registry] = counter
        return counter


class TokenAuthInterceptor(grpc.ServerInterceptor):
    """Refuses every RPC (health checks excepted) whose bearer token is not `token`; counts each refusal in
    `refused` (by method) and logs one a minute per peer."""

    def __init__(self, token: Secret, refused: Counter) -> None:
        self._expected = (AUTH_SCHEME + token.reveal()).encode("utf-8")
        self._refused = refused
        self._once = OncePerPeer()

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        method: str = handler_call_details.method
        if method.startswith(HEALTH_PREFIX) or self._authorized(handler_call_details):
            return continuation(handler_call_details)
        handler = continuation(handler_call_details)
        if handler is None:  # an unknown method: let gRPC answer UNIMPLEMENTED as usual (and no label per name)
            return None
        # Counted here, from the metadata: the call may be gone before a thread runs its refusal.
        self._refused.labels(method).inc()
        return _refusing(handler, method, self._once)

    def _authorized(self, details: grpc.HandlerCallDetails) -> bool:
        offered = b""
        for key, value in details.invocation_metadata or ():
            if key == AUTH_METADATA_KEY:
                offered = value.encode("utf-8") if isinstance(value, str) else bytes(value)
                break
        # compare_digest takes time independent of where the first difference lies.
        return hmac.compare_digest(offered, self._expected)


def _refusing(handler: grpc.RpcMethodHandler, method: str, once: OncePerPeer) -> grpc.RpcMethodHandler:
    """A handler with `handler`'s response kind that aborts with UNAUTHENTICATED without reading the request,
    logging the refusal if it is its peer's first in a minute (`once`).

    It is request-streaming whatever the method's kind: gRPC calls such a handler before any request message
    has arrived, so a peer that never finishes its request cannot hold the thread (see admission.py).
    """

    def refuse(_requests: Any, context: grpc.ServicerContext) -> Any:
        caller = peer(context)
        if once(caller):
            log.warning(
                "refused %s: %s: missing or invalid bearer token (more from this peer within %g s are not logged; "
                "%s_total counts them all)",
                clip(caller),
                clip(method),
                LOG_INTERVAL_S,
                UNAUTHENTICATED_SERIES,
            )
        abort(context, grpc.StatusCode.UNAUTHENTICATED, _REFUSAL)

    if handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse)
    return grpc.stream_unary_rpc_method_handler(refuse)
