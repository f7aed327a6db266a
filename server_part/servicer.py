"""The gRPC edge of the server: decode, call the training state, encode; domain errors become statuses."""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
from collections.abc import Iterator
from typing import TypeVar

import grpc
import numpy as np

from server_part.session import HalfStep, Session
from server_part.sessions import SessionRegistry, check_version
from splitlearning import codec, encodings, framing
from splitlearning.approximations import Approximations
from splitlearning.codec import EncodingCode
from splitlearning.contract import (
    CutMode,
    contract_to_proto,
    mode_from_proto,
    mode_to_proto,
    spec_from_proto,
)
from splitlearning.errors import InvalidRequest, PreconditionFailed, TooLarge
from splitlearning.groups import Membership
from splitlearning.optimizers import OptimizerSettings
from splitlearning.protocol import CLIENT_ID_METADATA_KEY, MAX_ID_LENGTH, SPLIT_SERVICE
from splitlearning.serving.edge import Undecodable, abort, guard, lenient, refuse_undecodable, refusing_undecodable
from splitlearning.v1 import split_learning_pb2 as pb

log = logging.getLogger(__name__)

T = TypeVar("T")

TrainFrame = framing.Incoming[pb.TrainRequest]
TrainReply = framing.Outgoing[pb.TrainResponse]


class SplitLearningServicer:
    """The service's handlers; registered by `add_to_server` (Train's messages go through `framing`)."""

    def __init__(self, sessions: SessionRegistry, probe_limit: int = 0) -> None:
        self._sessions = sessions
        self._probe_limit = probe_limit  # the most padding a Probe's reply may carry

    def Probe(self, request: pb.ProbeRequest, context: grpc.ServicerContext) -> pb.ProbeResponse:
        def run() -> pb.ProbeResponse:
            self._sessions.check_running()
            if request.reply_bytes > self._probe_limit:
                raise TooLarge(
                    f"reply_bytes {request.reply_bytes:,} is over this server's probe limit {self._probe_limit:,} "
                    "(its reply limit less 64 KiB)"
                )
            return pb.ProbeResponse(padding=bytes(request.reply_bytes))

        return guard(context, run)

    def Handshake(self, request: pb.HandshakeRequest, context: grpc.ServicerContext) -> pb.HandshakeResponse:
        return guard(context, lambda: self._handshake(request))

    def CloseSession(self, request: pb.CloseSessionRequest, context: grpc.ServicerContext) -> pb.CloseSessionResponse:
        def run() -> pb.CloseSessionResponse:
            closed = self._sessions.close(request.session_id, request.client_id, request.contribute_samples)
            return pb.CloseSessionResponse(steps=closed.steps, checkpointed=closed.checkpointed)

        return guard(context, run)

    def Train(
        self, request_iterator: Iterator[TrainFrame | Undecodable], context: grpc.ServicerContext
    ) -> Iterator[TrainReply]:
        """Requests arrive parsed by `framing.parse` and replies leave through `Outgoing.serialize` (see
        `add_to_server`): the tensors' bytes are never copied into or out of protobuf messages. The stream
        trains in the session its first request names; every later request must name the same one."""
        client_id = guard(context, lambda: _client_id(context))
        frames = _decoded(request_iterator, context)
        first = next(frames, None)
        if first is None:
            return
        session = guard(context, lambda: self._sessions.get(first.message.session_id))
        with contextlib.ExitStack() as stack:
            client = guard(context, lambda: stack.enter_context(session.stream(client_id)))
            frames = _one_session(itertools.chain([first], frames), session.id, context)
            if session.mode is CutMode.USHAPE:
                yield from self._train_ushape(session, client, frames, context)
                return
            for request in frames:
                yield guard(context, lambda: self._train(session, client, request))  # noqa: B023 (called at once)
                # Resumed once the reply is on its way: the update runs while the client back-propagates.
                session.settle()

    def _train_ushape(
        self, session: Session, client: str, request_iterator: Iterator[TrainFrame], context: grpc.ServicerContext
    ) -> Iterator[TrainReply]:
        """Two exchanges per step: (iv) -> (outputs), then (output_gradient) -> (iv_gradient).

        The half-done step (its tape) lives in this handler only, from the first exchange to the second.
        """
        half: HalfStep | None = None
        try:
            for request in request_iterator:
                if request.has("labels"):
                    abort(context, grpc.StatusCode.INVALID_ARGUMENT, "labels must not be sent to a U-shaped middle")
                if request.has("output_gradient"):
                    reply = guard(context, lambda: self._finish_step(session, client, half, request))  # noqa: B023
                    half = None  # finished: nothing to abandon
                    yield reply
                else:
                    half = guard(context, lambda: self._begin_step(session, client, request))  # noqa: B023
                    yield framing.Outgoing(pb.TrainResponse(step=half.step), {"outputs": codec.encode(half.outputs)})
        finally:
            if half is not None:
                session.abandon(half)

    def _begin_step(self, session: Session, client: str, frame: TrainFrame) -> HalfStep:
        iv = _frame_tensor(frame, "iv", session.encoding)
        return session.begin_step(client, frame.message.step, iv)

    def _finish_step(self, session: Session, client: str, half: HalfStep | None, frame: TrainFrame) -> TrainReply:
        step = frame.message.step
        gradient = _frame_tensor(frame, "output_gradient")
        iv_gradient = session.finish_step(client, half, step, gradient)
        return framing.Outgoing(pb.TrainResponse(step=step), {"iv_gradient": codec.encode(iv_gradient)})

    def Evaluate(self, request: pb.EvaluateRequest, context: grpc.ServicerContext) -> pb.EvaluateResponse:
        def run() -> pb.EvaluateResponse:
            session = self._sessions.get(request.session_id)
            iv, labels = _tensor(request, "iv", session.encoding, _iv_entries(session)), _tensor(request, "labels")
            values = session.evaluate(iv, labels, request.reset_metrics, _client_step(request))
            return pb.EvaluateResponse(metrics=values)

        return guard(context, run)

    def Predict(self, request: pb.PredictRequest, context: grpc.ServicerContext) -> pb.PredictResponse:
        def run() -> pb.PredictResponse:
            session = self._sessions.get(request.session_id)
            iv = _tensor(request, "iv", session.encoding, _iv_entries(session))
            outputs = session.predict(iv, _client_step(request))
            response = pb.PredictResponse()
            codec.write(outputs, response.outputs)
            return response

        return guard(context, run)

    def _handshake(self, request: pb.HandshakeRequest) -> pb.HandshakeResponse:
        _check_id_length("session_id", request.session_id)
        _check_id_length("client_id", request.client_id)
        if not request.contract.HasField("iv") or request.contract.iv == pb.TensorSpec():
            return self._inquiry(request)
        iv = spec_from_proto(request.contract.iv, "contract.iv")
        has_label = request.contract.HasField("label")
        label = spec_from_proto(request.contract.label, "contract.label") if has_label else None
        sessions = self._sessions
        optimizer = OptimizerSettings.from_proto(request.optimizer) if request.HasField("optimizer") else None
        mode = mode_from_proto(request.mode)
        sessions.check_offer(request.protocol_version, iv, label, request.max_batch_size, mode, optimizer)
        asked = Approximations.from_proto(request.approximations)
        sessions.check_approximations(asked)
        encoding = pb.ENCODING_SPARSE if asked.top_k else sessions.negotiate(request.encodings)
        has_group = request.HasField("group") and not request.session_id  # rejoining: the session has its round
        membership = Membership.from_proto(request.group) if has_group else None
        session = sessions.open(request.session_id, membership)
        next_step = session.join(request.client_id, encoding, list(request.restorable_steps), asked)
        trainer = session.trainer
        return pb.HandshakeResponse(
            protocol_version=request.protocol_version,
            contract=contract_to_proto(trainer.contract),
            session_id=session.id,
            next_step=next_step,
            max_batch_size=sessions.limits.max_batch_size,
            encoding=encoding,
            metric_names=trainer.metric_names,
            mode=mode_to_proto(session.mode),
            approximations=asked.to_proto() if not asked.exact else None,
        )

    def _inquiry(self, request: pb.HandshakeRequest) -> pb.HandshakeResponse:
        """A handshake stating no IV spec asks for the server's contract: answered with it (both specs), the
        limits, the mode and the metric names, and no session (session_id empty, next_step 0)."""
        if request.session_id:
            raise InvalidRequest(
                "contract.iv is required to join a session: state the shape and dtype of the IV your part sends "
                "(a handshake without it only asks for the server's contract)"
            )
        sessions = self._sessions
        check_version(request.protocol_version)
        template = sessions.template
        return pb.HandshakeResponse(
            protocol_version=request.protocol_version,
            contract=contract_to_proto(template.contract),
            max_batch_size=sessions.limits.max_batch_size,
            encoding=sessions.negotiate(request.encodings),
            metric_names=template.metric_names,
            mode=mode_to_proto(sessions.mode),
        )

    def _train(self, session: Session, client: str, frame: TrainFrame) -> TrainReply:
        request = frame.message
        iv, labels = _frame_tensor(frame, "iv", session.encoding, _iv_entries(session)), _frame_tensor(frame, "labels")
        if request.micro_batches > 1:
            result = session.train_micro(
                client,
                request.step,
                request.micro_batch,
                request.micro_batches,
                request.step_samples,
                iv,
                labels,
                request.reset_metrics,
            )
        else:
            result = session.train(client, request.step, iv, labels, request.reset_metrics)
        if result.iv_gradient is None:  # the client trains on its own loss: no gradient goes back
            return framing.Outgoing(pb.TrainResponse(step=result.step, metrics=result.metrics), {})
        try:
            gradient = codec.encode(result.iv_gradient, session.encoding)
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
    """The step the client's part is at, when it names one (see `Session._check_partner`)."""
    return request.step if request.HasField("step") else None


def _iv_entries(session: Session) -> int:
    """The most entries an IV may hold: a full batch of the contract's (a sparse IV is refused past it before it is
    made dense)."""
    return session.limits.max_batch_size * math.prod(session.trainer.contract.iv.shape)


def _tensor(
    request: pb.EvaluateRequest | pb.PredictRequest,
    name: str,
    encoding: EncodingCode = encodings.RAW,
    max_entries: int | None = None,
) -> np.ndarray:
    if not request.HasField(name):  # type: ignore[arg-type]
        raise InvalidRequest(f"{name} is required")
    message = getattr(request, name)
    _check_encoding(message, name, encoding)
    return codec.from_proto(message, name, max_entries)


def _frame_tensor(
    frame: TrainFrame, name: str, encoding: EncodingCode = encodings.RAW, max_entries: int | None = None
) -> np.ndarray:
    if not frame.has(name):
        raise InvalidRequest(f"{name} is required")
    message = getattr(frame.message, name)
    _check_encoding(message, name, encoding)
    return codec.decode(message, frame.content(name), name, max_entries)


def _check_encoding(message: pb.Tensor, name: str, agreed: EncodingCode) -> None:
    """A tensor must come in the encoding the session agreed on (labels and U-shape tensors: raw)."""
    used = message.encoding or encodings.RAW
    if used != agreed:
        raise InvalidRequest(
            f"{name}: sent in the {encodings.name(used)} wire encoding, but this session agreed on "
            f"{encodings.name(agreed)} for it in its handshake"
        )


def _one_session(frames: Iterator[TrainFrame], session_id: str, context: grpc.ServicerContext) -> Iterator[TrainFrame]:
    for frame in frames:
        if frame.message.session_id != session_id:
            abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                "a training stream trains in one session: this one began in another session than this request "
                "names; open a stream per session",
            )
        yield frame


class SessionsMount:
    """The split-learning service over a session registry, as a `Host` (splitlearning/serving/host.py) serves it."""

    service_names = (SPLIT_SERVICE,)
    max_message_bytes = 0  # the server sizes its limits from the cut contract (SplitServer.max_message_bytes)

    def __init__(self, sessions: SessionRegistry, probe_limit: int = 0) -> None:
        self.sessions = sessions
        self.probe_limit = probe_limit

    def add_to(self, server: grpc.Server) -> None:
        add_to_server(SplitLearningServicer(self.sessions, self.probe_limit), server)

    def start(self) -> None:
        self.sessions.start()

    def stop(self) -> None:
        self.sessions.stop()

    def describe(self) -> str:
        return f"up to {self.sessions.max_sessions} sessions"


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
                request_deserializer=lenient(lambda data: framing.parse(pb.TrainRequest, data), "TrainRequest"),
                response_serializer=framing.Outgoing.serialize,
            )
        else:
            request, response = getattr(pb, method.input_type.name), getattr(pb, method.output_type.name)
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                refusing_undecodable(behavior),
                request_deserializer=lenient(request.FromString, method.input_type.name),
                response_serializer=response.SerializeToString,
            )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


def _decoded(requests: Iterator[TrainFrame | Undecodable], context: grpc.ServicerContext) -> Iterator[TrainFrame]:
    for request in requests:
        if isinstance(request, Undecodable):
            refuse_undecodable(context, request)
        yield request
