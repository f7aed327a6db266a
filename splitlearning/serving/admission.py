"""Admission: which calls may hold one of the server's threads, and how many at once.

grpcio's synchronous server runs each call on a pool thread from the moment its headers arrive, and a unary
handler's thread then waits for the request message. A peer that sends headers and never finishes its
request held a thread for as long as its connection lived, and `maximum_concurrent_rpcs` turned every other
call away (issue 16: eight such calls, without the token, stopped the server). So here:

- the token is checked from the metadata, before any request is read (`auth.py`: its refusal never reads
  one), so an unauthenticated call never holds a thread;
- every other call takes a slot of its kind's own budget (`Budget`): the service's (`--max-workers`), health
  checks' and health watches', so health probes and token holders never compete for one slot;
- a slot is held from admission to the handler's end; while its call is still waiting for its request, the
  slot may be taken back: a new call of a full budget cancels the oldest such call (its thread returns at
  once) instead of being refused. A call whose request has arrived is never cancelled; when every slot holds
  one, the new call is refused with RESOURCE_EXHAUSTED (no thread is needed to wait for its request).

Unary handlers are registered here as request-streaming ones, which gRPC calls before any request is read, so
the wait for the request happens where it can be seen (and ended). The pool has one thread per slot and a few
for refusals, which end at once: the server's threads are bounded whatever peers send. docs/security.md.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from splitlearning.serving.edge import abort

log = logging.getLogger(__name__)

HEALTH_CHECK = "/grpc.health.v1.Health/Check"
HEALTH_WATCH = "/grpc.health.v1.Health/Watch"
# Slots of the health service's two methods; checks are short, watches hold theirs for as long as they watch.
HEALTH_CHECK_SLOTS = 2
HEALTH_WATCH_SLOTS = 2
# Threads beyond the slots: for refusals (they end at once: they never read a request).
REFUSAL_THREADS = 2
EXTRA_THREADS = HEALTH_CHECK_SLOTS + HEALTH_WATCH_SLOTS + REFUSAL_THREADS
_NOTHING = object()


@dataclass(eq=False)
class _Slot:
    admitted: float
    context: grpc.ServicerContext
    waiting: bool = True  # no request message has arrived yet


class Budget:
    """`slots` calls of one kind at once; a new call takes back the slot of the oldest one still waiting."""

    def __init__(self, kind: str, slots: int, flag: str = "") -> None:
        self.kind = kind
        self.slots = slots
        self._flag = flag
        self._held: list[_Slot] = []  # in order of admission
        self._lock = threading.Lock()
        self.taken_back = 0

    def admit(self, context: grpc.ServicerContext) -> _Slot | None:
        """A slot for the call of `context`, or None when every slot's call has its request (refuse it)."""
        victim = None
        with self._lock:
            if len(self._held) >= self.slots:
                victim = next((s for s in self._held if s.waiting), None)
                if victim is None:
                    return None
                self._held.remove(victim)
                self.taken_back += 1
            slot = _Slot(time.monotonic(), context)
            self._held.append(slot)
        if victim is not None:
            victim.context.cancel()  # its thread's wait for the request ends now
            log.info("cancelled a %s call that sent no request in %.1f s: its slot was needed", self.kind, _age(victim))
        return slot

    def received(self, slot: _Slot) -> None:
        with self._lock:
            slot.waiting = False

    def release(self, slot: _Slot) -> None:
        with self._lock:
            if slot in self._held:
                self._held.remove(slot)

    def refusal(self) -> str:
        limit = f" ({self._flag})" if self._flag else ""
        return (
            f"server busy: {self.slots} {self.kind} calls in progress, the limit{limit}, each with its request "
            "received; retry later"
        )

    @property
    def held(self) -> int:
        with self._lock:
            return len(self._held)


class AdmissionInterceptor(grpc.ServerInterceptor):
    """Gives each call a slot of its kind's budget (see the module's docstring); run after the token check."""

    def __init__(self, service_slots: int) -> None:
        self.service = Budget("service", service_slots, "--max-workers")
        self.health_checks = Budget("health check", HEALTH_CHECK_SLOTS)
        self.health_watches = Budget("health watch", HEALTH_WATCH_SLOTS)

    def budget(self, method: str) -> Budget:
        if method == HEALTH_CHECK:
            return self.health_checks
        if method == HEALTH_WATCH:
            return self.health_watches
        return self.service

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:  # an unknown method: gRPC answers UNIMPLEMENTED without a thread
            return None
        return _admitted(handler, self.budget(handler_call_details.method), handler_call_details.method)


def _admitted(handler: grpc.RpcMethodHandler, budget: Budget, method: str) -> grpc.RpcMethodHandler:
    """`handler`, request-streaming, run in a slot of `budget` (refused when there is none), telling `budget`
    when its request has come."""

    def admit(context: grpc.ServicerContext) -> _Slot:
        slot = budget.admit(context)
        if slot is None:
            abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, budget.refusal())
        return slot

    def first(requests: Iterator[Any], slot: _Slot, context: grpc.ServicerContext) -> Any:
        """The one request of a unary call; the call ends here (aborted, never returned from: gRPC would try to
        serialize a None response, and log a traceback) when it was cancelled or sent none."""
        try:
            request = next(requests, _NOTHING)
        except grpc.RpcError:  # cancelled: by its peer, or here to take its slot back; no status reaches anyone
            abort(context, grpc.StatusCode.CANCELLED, f"{method} was cancelled before its request arrived")
        budget.received(slot)
        if request is _NOTHING:
            abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"{method} takes one request message, got none")
        return request

    def marked(requests: Iterator[Any], slot: _Slot) -> Iterator[Any]:
        for request in requests:
            budget.received(slot)
            yield request

    kwargs = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.unary_unary is not None:
        unary_unary = handler.unary_unary

        def unary_unary_call(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
            slot = admit(context)
            try:
                return unary_unary(first(requests, slot, context), context)
            finally:
                budget.release(slot)

        return grpc.stream_unary_rpc_method_handler(unary_unary_call, **kwargs)
    if handler.unary_stream is not None:
        unary_stream = handler.unary_stream

        def unary_stream_call(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
            slot = admit(context)
            try:
                yield from unary_stream(first(requests, slot, context), context)
            finally:
                budget.release(slot)

        return grpc.stream_stream_rpc_method_handler(unary_stream_call, **kwargs)
    if handler.stream_unary is not None:
        stream_unary = handler.stream_unary

        def stream_unary_call(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
            slot = admit(context)
            try:
                return stream_unary(marked(requests, slot), context)
            finally:
                budget.release(slot)

        return grpc.stream_unary_rpc_method_handler(stream_unary_call, **kwargs)
    stream_stream = handler.stream_stream

    def stream_stream_call(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
        slot = admit(context)
        try:
            yield from stream_stream(marked(requests, slot), context)
        finally:
            budget.release(slot)

    return grpc.stream_stream_rpc_method_handler(stream_stream_call, **kwargs)


def _age(slot: _Slot) -> float:
    return time.monotonic() - slot.admitted
