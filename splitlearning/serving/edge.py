"""The gRPC edge that every service of this project shares: undecodable requests refused with INVALID_ARGUMENT,
domain errors (splitlearning.errors) turned into their status with a bounded message, bugs into INTERNAL."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import grpc
from google.protobuf.message import DecodeError

from splitlearning.errors import SplitError
from splitlearning.protocol import REASON_METADATA_KEY
from splitlearning.text import clip_message
from splitlearning.v1 import split_learning_pb2 as pb

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Undecodable:
    """A request whose bytes are no message of its method's type, as the deserializer hands it over.

    Deserializers do not raise on such bytes: gRPC would answer a raising one with INTERNAL ("Exception
    deserializing request!"), and on a streaming call (seen with grpcio 1.85) it often leaves the call's state
    behind, so the states pile up and `stop` never sees its RPCs finish. The handler refuses it instead, with
    INVALID_ARGUMENT.
    """

    type_name: str
    size: int
    error: str

    def refusal(self) -> str:
        return f"the request is not a valid {self.type_name} ({self.size} bytes): {self.error}"


def lenient(parse: Callable[[bytes], T], type_name: str) -> Callable[[bytes], T | Undecodable]:
    """`parse`, returning an `Undecodable` where it would raise (see `Undecodable`)."""

    def deserialize(data: bytes) -> T | Undecodable:
        try:
            return parse(data)
        except DecodeError as error:  # anything else is a bug, and gRPC's INTERNAL says so
            return Undecodable(type_name, len(data), str(error) or "undecodable")

    return deserialize


def refusing_undecodable(behavior: Callable[[Any, grpc.ServicerContext], T]) -> Callable[..., T]:
    def handle(request: Any, context: grpc.ServicerContext) -> T:
        if isinstance(request, Undecodable):
            refuse_undecodable(context, request)
        return behavior(request, context)

    return handle


def refuse_undecodable(context: grpc.ServicerContext, request: Undecodable) -> NoReturn:
    log.warning("refused %s: %s", peer(context), request.refusal())
    abort(context, grpc.StatusCode.INVALID_ARGUMENT, request.refusal())


def guard(context: grpc.ServicerContext, run: Callable[[], T]) -> T:
    try:
        return run()
    except SplitError as error:
        message = clip_message(str(error))  # it may hold a client's id: bounded in the log and the status
        log.warning("refused %s: %s", peer(context), message)
        if error.reason is not None:
            context.set_trailing_metadata(((REASON_METADATA_KEY, error.reason.value),))
        abort(context, getattr(grpc.StatusCode, error.status), message)
    except Exception as error:  # a bug, not a bad request: say so, keep serving
        log.exception("internal error serving %s", peer(context))
        abort(context, grpc.StatusCode.INTERNAL, clip_message(f"internal error: {type(error).__name__}: {error}"))


def abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    context.abort(code, message)
    raise AssertionError("unreachable: context.abort raises")


def peer(context: grpc.ServicerContext) -> str:
    try:
        return context.peer()
    except Exception:
        return "unknown peer"


def add_unary_service(servicer: Any, server: grpc.Server, service: str) -> None:
    """Register every method of `service` (a service of splitlearning.v1, all unary) to `servicer`'s method of
    the same name; bytes that are no request reach no handler but get INVALID_ARGUMENT (`Undecodable`)."""
    descriptor = pb.DESCRIPTOR.services_by_name[service]
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in descriptor.methods:
        request, response = getattr(pb, method.input_type.name), getattr(pb, method.output_type.name)
        handlers[method.name] = grpc.unary_unary_rpc_method_handler(
            refusing_undecodable(getattr(servicer, method.name)),
            request_deserializer=lenient(request.FromString, method.input_type.name),
            response_serializer=response.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(descriptor.full_name, handlers),))
    server.add_registered_method_handlers(descriptor.full_name, handlers)
