"""The gRPC edge of the server's telemetry: times, sizes and status codes of every RPC of the service.

A server interceptor, so the servicer stays as it is: it wraps each handler of `SplitLearningService`
(health checks pass untouched), binds the peer, session and step to the log lines emitted while a request
is served, and hands plain numbers to `ServerTelemetry`. Sizes are the serialized lengths (`ByteSize()`; on the
Train stream, the length `framing` read or wrote).
Per training step it measures serve time (request in -> response out), the trainer's compute time (from
`compute_clock`, the state's running total) and the wait for the next request (the client's part of the
step plus the network). A Train stream the client cancels on its way out is not counted as an error.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from server_part.telemetry import ServerTelemetry
from splitlearning import logs
from splitlearning.serving.edge import Undecodable
from splitlearning.text import clip

log = logging.getLogger(__name__)


class TelemetryInterceptor(grpc.ServerInterceptor):
    def __init__(self, service: str, telemetry: ServerTelemetry, compute_clock: Callable[[], float]) -> None:
        self._prefix = f"/{service}/"
        self._telemetry = telemetry
        self._compute_clock = compute_clock

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Any], handler_call_details: grpc.HandlerCallDetails
    ) -> Any:
        handler = continuation(handler_call_details)
        name: str = handler_call_details.method
        if handler is None or not name.startswith(self._prefix):
            return handler
        method = name[len(self._prefix) :]
        if handler.unary_unary is not None:
            return handler._replace(unary_unary=self._unary(method, handler.unary_unary))
        if handler.stream_stream is not None:
            return handler._replace(stream_stream=self._stream(method, handler.stream_stream))
        return handler

    def _unary(self, method: str, behavior: Callable[[Any, grpc.ServicerContext], Any]) -> Any:
        telemetry = self._telemetry

        def unary(request: Any, context: grpc.ServicerContext) -> Any:
            started = time.perf_counter()
            code, response = "OK", None
            with logs.bind(fresh=True, peer=_peer(context), method=method, session=_session(request)):
                try:
                    response = behavior(request, context)
                    return response
                except BaseException:
                    code = _code(context)
                    raise
                finally:
                    sent = response.ByteSize() if response is not None else 0
                    seconds = time.perf_counter() - started
                    telemetry.rpc(method, code, seconds, _size(request), sent, _session(request))

        return unary

    def _stream(self, method: str, behavior: Callable[[Iterator[Any], grpc.ServicerContext], Iterator[Any]]) -> Any:
        telemetry, compute_clock = self._telemetry, self._compute_clock

        def stream(request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
            current: dict[str, Any] = {"in": 0.0, "out": None, "request": None}

            def requests() -> Iterator[Any]:
                for frame in request_iterator:  # framing.Incoming: the message and its wire size
                    if not isinstance(frame, Undecodable):  # the servicer refuses that one
                        current["in"] = time.perf_counter()
                        current["request"] = frame
                        logs.update(step=frame.message.step, session=clip(frame.message.session_id))
                    yield frame

            with logs.bind(fresh=True, peer=_peer(context), method=method):
                try:
                    compute_before = compute_clock()
                    for response in behavior(requests(), context):  # framing.Outgoing
                        if response.has("outputs"):  # U-shape: a step's first half; counted at its second
                            yield response
                            continue
                        now, frame = time.perf_counter(), current["request"]
                        request = frame.message
                        compute = compute_clock() - compute_before
                        wait = None if current["out"] is None else current["in"] - current["out"]
                        serve = now - current["in"]
                        telemetry.step(
                            request.session_id,
                            request.step,
                            request.reset_metrics,
                            response.message.metrics,
                            compute,
                            serve,
                            wait,
                            frame.wire_size,
                            response.wire_size,  # serialises it: the serializer then sends these bytes
                            completes=request.micro_batches <= 1 or request.micro_batch + 1 == request.micro_batches,
                            epoch=request.epoch if request.HasField("epoch") else None,
                        )
                        if log.isEnabledFor(logging.DEBUG):
                            log.debug("step answered in %.2f ms (compute %.2f ms)", serve * 1e3, compute * 1e3)
                        yield response
                        current["out"] = time.perf_counter()
                        compute_before = compute_clock()
                except BaseException:
                    code = _code(context)
                    if code != "CANCELLED":
                        telemetry.rpc(method, code, 0.0, 0, 0)
                    raise

        return stream


def _code(context: grpc.ServicerContext) -> str:
    """The status the handler aborted with; CANCELLED when the client went away; UNKNOWN for a plain bug."""
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    return "UNKNOWN" if context.is_active() else "CANCELLED"


def _peer(context: grpc.ServicerContext) -> str:
    try:
        return context.peer()
    except Exception:
        return "unknown"


def _session(request: Any) -> str:
    return clip(str(getattr(request, "session_id", "")))


def _size(request: Any) -> int:
    return request.size if isinstance(request, Undecodable) else int(request.ByteSize())
