"""The gRPC edge of the server: decode, call the training state, encode; domain errors become statuses."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from server_part.state import HalfStep, TrainingState
from splitlearning import codec, framing
from splitlearning.contract import (
    CLIENT_ID_METADATA_KEY,
    MAX_ID_LENGTH,
    CutMode,
    contract_to_proto,
    mode_from_proto,
    mode_to_proto,
    spec_from_proto,
)
from splitlearning.errors import InvalidRequest, PreconditionFailed, SplitError
from splitlearning.text import clip_message
from splitlearning.v1 import split_learning_pb2 as pb

log = logging.getLogger(__name__)

T = TypeVar("T")

TrainFrame = framing.Incoming[pb.TrainRequest]
TrainReply = framing.Outgoing[pb.TrainResponse]


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


class SplitLearningServicer:
    """The service's handlers; registered by `add_to_server` (Train's messages go through `framing`)."""

    def __init__(self, state: TrainingState) -> None:
        self._state = state

    def Handshake(self, request: pb.HandshakeRequest, context: grpc.ServicerContext) -> pb.HandshakeResponse:
        return _guard(context, lambda: self._handshake(request))

    def Train(
        self, request_iterator: Iterator[TrainFrame | Undecodable], context: grpc.ServicerContext
    ) -> Iterator[TrainReply]:
        """Requests arrive parsed by `framing.parse` and replies leave through `Outgoing.serialize` (see
        `add_to_server`): the tensors' bytes are never copied into or out of protobuf messages."""
        client_id = _guard(context, lambda: _client_id(context))
        frames = _decoded(request_iterator, context)
        with contextlib.ExitStack() as stack:
            _guard(context, lambda: stack.enter_context(self._state.stream(client_id)))
            if self._state.mode is CutMode.USHAPE:
                yield from self._train_ushape(frames, context)
                return
            for request in frames:
                yield _guard(context, lambda: self._train(request))  # noqa: B023 (called at once)
                # Resumed once the reply is on its way: the update runs while the client back-propagates.
                self._state.settle()

    def _train_ushape(
        self, request_iterator: Iterator[TrainFrame], context: grpc.ServicerContext
    ) -> Iterator[TrainReply]:
        """Two exchanges per step: (iv) -> (outputs), then (output_gradient) -> (iv_gradient).

        The half-done step (its tape) lives in this handler only, from the first exchange to the second.
        """
        half: HalfStep | None = None
        try:
            for request in request_iterator:
                if request.has("labels"):
                    _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "labels must not be sent to a U-shaped middle")
                if request.has("output_gradient"):
                    reply = _guard(context, lambda: self._finish_step(half, request))  # noqa: B023
                    half = None  # finished: nothing to abandon
                    yield reply
                else:
                    half = _guard(context, lambda: self._begin_step(request))  # noqa: B023
                    yield framing.Outgoing(pb.TrainResponse(step=half.step), {"outputs": codec.encode(half.outputs)})
        finally:
            if half is not None:
                self._state.abandon(half)

    def _begin_step(self, frame: TrainFrame) -> HalfStep:
        request = frame.message
        return self._state.begin_step(request.session_id, request.step, _frame_tensor(frame, "iv"))

    def _finish_step(self, half: HalfStep | None, frame: TrainFrame) -> TrainReply:
        request = frame.message
        gradient = _frame_tensor(frame, "output_gradient")
        iv_gradient = self._state.finish_step(half, request.session_id, request.step, gradient)
        return framing.Outgoing(pb.TrainResponse(step=request.step), {"iv_gradient": codec.encode(iv_gradient)})

    def Evaluate(self, request: pb.EvaluateRequest, context: grpc.ServicerContext) -> pb.EvaluateResponse:
        def run() -> pb.EvaluateResponse:
            iv, labels = _tensor(request, "iv"), _tensor(request, "labels")
            step = _client_step(request)
            values = self._state.evaluate(request.session_id, iv, labels, request.reset_metrics, step)
            return pb.EvaluateResponse(metrics=values)

        return _guard(context, run)

    def Predict(self, request: pb.PredictRequest, context: grpc.ServicerContext) -> pb.PredictResponse:
        def run() -> pb.PredictResponse:
            outputs = self._state.predict(request.session_id, _tensor(request, "iv"), _client_step(request))
            response = pb.PredictResponse()
            codec.write(outputs, response.outputs)
            return response

        return _guard(context, run)

    def _handshake(self, request: pb.HandshakeRequest) -> pb.HandshakeResponse:
        _check_id_length("session_id", request.session_id)
        _check_id_length("client_id", request.client_id)
        if not request.HasField("contract") or not request.contract.HasField("iv"):
            raise InvalidRequest("contract.iv is required: state the shape and dtype of the IV your part sends")
        iv = spec_from_proto(request.contract.iv, "contract.iv")
        has_label = request.contract.HasField("label")
        label = spec_from_proto(request.contract.label, "contract.label") if has_label else None
        agreed = self._state.handshake(
            request.protocol_version,
            iv,
            label,
            request.session_id,
            request.max_batch_size,
            mode_from_proto(request.mode),
            request.encodings,
            restorable_steps=list(request.restorable_steps),
            client_id=request.client_id,
        )
        return pb.HandshakeResponse(
            protocol_version=request.protocol_version,
            contract=contract_to_proto(agreed.contract),
            session_id=agreed.session_id,
            next_step=agreed.next_step,
            max_batch_size=agreed.max_batch_size,
            encoding=agreed.encoding,  # type: ignore[arg-type]
            metric_names=agreed.metric_names,
            mode=mode_to_proto(agreed.mode),
        )

    def _train(self, frame: TrainFrame) -> TrainReply:
        request = frame.message
        iv, labels = _frame_tensor(frame, "iv"), _frame_tensor(frame, "labels")
        if request.micro_batches > 1:
            result = self._state.train_micro(
                request.session_id,
                request.step,
                request.micro_batch,
                request.micro_batches,
                request.step_samples,
                iv,
                labels,
                request.reset_metrics,
            )
        else:
            result = self._state.train(request.session_id, request.step, iv, labels, request.reset_metrics)
        try:
            gradient = codec.encode(result.iv_gradient, self._state.encoding)  # type: ignore[arg-type]
        except InvalidRequest as error:  # not the request's fault: the step was applied, its gradient diverged
            raise PreconditionFailed(
                f"step {result.step} was applied but its gradient cannot be sent ({error}): training has "
                "diverged; lower the learning rate, or use the raw wire encoding to see the values"
            ) from None
        return framing.Outgoing(pb.TrainResponse(step=result.step, metrics=result.metrics), {"iv_gradient": gradient})


def _client_id(context: grpc.ServicerContext) -> str | None:
    """The client id a training stream names in its metadata (see CLIENT_ID_METADATA_KEY), or None."""
    for key, value in context.invocation_metadata() or ():
        if key == CLIENT_ID_METADATA_KEY:
            raw = value if isinstance(value, bytes) else value.encode("utf-8")
            client_id = raw.decode("utf-8", errors="replace")
            _check_id_length(f"metadata {CLIENT_ID_METADATA_KEY}", client_id)
            return client_id
    return None


def _check_id_length(field: str, value: str) -> None:
    if len(value) > MAX_ID_LENGTH:
        raise InvalidRequest(f"{field}: at most {MAX_ID_LENGTH} characters, got {len(value)}")


def _client_step(request: pb.EvaluateRequest | pb.PredictRequest) -> int | None:
    """The step the client's part is at, when it names one (see `TrainingState._check_partner`)."""
    return request.step if request.HasField("step") else None


def _tensor(request: pb.EvaluateRequest | pb.PredictRequest, name: str) -> np.ndarray:
    if not request.HasField(name):  # type: ignore[arg-type]
        raise InvalidRequest(f"{name} is required")
    return codec.from_proto(getattr(request, name), name)


def _frame_tensor(frame: TrainFrame, name: str) -> np.ndarray:
    if not frame.has(name):
        raise InvalidRequest(f"{name} is required")
    return codec.decode(getattr(frame.message, name), frame.content(name), name)


def add_to_server(servicer: SplitLearningServicer, server: grpc.Server) -> None:
    """Register the service as the generated `add_SplitLearningServiceServicer_to_server` does, but with Train's
    messages read and written by `framing` (the same bytes on the wire); the unary methods use protobuf's own.
    Bytes that do not decode reach the handlers as `Undecodable`, which they refuse with INVALID_ARGUMENT."""
    service = pb.DESCRIPTOR.services_by_name["SplitLearningService"]
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in service.methods:
        behavior = getattr(servicer, method.name)
        if method.client_streaming or method.server_streaming:
            if method.name != "Train":
                raise AssertionError(f"{method.name}: no framing for a streaming method but Train")
            handlers[method.name] = grpc.stream_stream_rpc_method_handler(
                behavior,  # refuses an Undecodable request itself: it reads the stream
                request_deserializer=_lenient(lambda data: framing.parse(pb.TrainRequest, data), "TrainRequest"),
                response_serializer=framing.Outgoing.serialize,
            )
        else:
            request, response = getattr(pb, method.input_type.name), getattr(pb, method.output_type.name)
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                _refusing_undecodable(behavior),
                request_deserializer=_lenient(request.FromString, method.input_type.name),
                response_serializer=response.SerializeToString,
            )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


def _lenient(parse: Callable[[bytes], T], type_name: str) -> Callable[[bytes], T | Undecodable]:
    """`parse`, returning an `Undecodable` where it would raise (see `Undecodable`)."""

    def deserialize(data: bytes) -> T | Undecodable:
        try:
            return parse(data)
        except DecodeError as error:  # anything else is a bug, and gRPC's INTERNAL says so
            return Undecodable(type_name, len(data), str(error) or "undecodable")

    return deserialize


def _refusing_undecodable(behavior: Callable[[Any, grpc.ServicerContext], T]) -> Callable[..., T]:
    def handle(request: Any, context: grpc.ServicerContext) -> T:
        if isinstance(request, Undecodable):
            _refuse_undecodable(context, request)
        return behavior(request, context)

    return handle


def _decoded(requests: Iterator[TrainFrame | Undecodable], context: grpc.ServicerContext) -> Iterator[TrainFrame]:
    for request in requests:
        if isinstance(request, Undecodable):
            _refuse_undecodable(context, request)
        yield request


def _refuse_undecodable(context: grpc.ServicerContext, request: Undecodable) -> NoReturn:
    log.warning("refused %s: %s", _peer(context), request.refusal())
    _abort(context, grpc.StatusCode.INVALID_ARGUMENT, request.refusal())


def _guard(context: grpc.ServicerContext, run: Callable[[], T]) -> T:
    try:
        return run()
    except SplitError as error:
        message = clip_message(str(error))  # it may hold a client's id: bounded in the log and the status
        log.warning("refused %s: %s", _peer(context), message)
        _abort(context, getattr(grpc.StatusCode, error.status), message)
    except Exception as error:  # a bug, not a bad request: say so, keep serving
        log.exception("internal error serving %s", _peer(context))
        _abort(context, grpc.StatusCode.INTERNAL, clip_message(f"internal error: {type(error).__name__}: {error}"))


def _abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    context.abort(code, message)
    raise AssertionError("unreachable: context.abort raises")


def _peer(context: grpc.ServicerContext) -> str:
    try:
        return context.peer()
    except Exception:
        return "unknown peer"
