"""The gRPC edge of the server: decode, call the training state, encode; domain errors become statuses."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import NoReturn, TypeVar

import grpc
import numpy as np

from server_part.state import HalfStep, TrainingState
from splitlearning import codec
from splitlearning.contract import CutMode, contract_to_proto, mode_from_proto, mode_to_proto, spec_from_proto
from splitlearning.errors import InvalidRequest, PreconditionFailed, SplitError
from splitlearning.v1 import split_learning_pb2 as pb
from splitlearning.v1 import split_learning_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

T = TypeVar("T")


class SplitLearningServicer(pb_grpc.SplitLearningServiceServicer):
    def __init__(self, state: TrainingState) -> None:
        self._state = state

    def Handshake(self, request: pb.HandshakeRequest, context: grpc.ServicerContext) -> pb.HandshakeResponse:
        return _guard(context, lambda: self._handshake(request))

    def Train(
        self, request_iterator: Iterator[pb.TrainRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.TrainResponse]:
        with self._state.stream():
            if self._state.mode is CutMode.USHAPE:
                yield from self._train_ushape(request_iterator, context)
                return
            for request in request_iterator:
                yield _guard(context, lambda: self._train(request))  # noqa: B023 (called at once)

    def _train_ushape(
        self, request_iterator: Iterator[pb.TrainRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.TrainResponse]:
        """Two exchanges per step: (iv) -> (outputs), then (output_gradient) -> (iv_gradient).

        The half-done step (its tape) lives in this handler only, from the first exchange to the second.
        """
        half: HalfStep | None = None
        try:
            for request in request_iterator:
                if request.HasField("labels"):
                    _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "labels must not be sent to a U-shaped middle")
                if request.HasField("output_gradient"):
                    reply = _guard(context, lambda: self._finish_step(half, request))  # noqa: B023
                    half = None  # finished: nothing to abandon
                    yield reply
                else:
                    half = _guard(context, lambda: self._begin_step(request))  # noqa: B023
                    reply = pb.TrainResponse(step=half.step)
                    codec.write(half.outputs, reply.outputs)  # in place: no second copy of the payload
                    yield reply
        finally:
            if half is not None:
                self._state.abandon(half)

    def _begin_step(self, request: pb.TrainRequest) -> HalfStep:
        return self._state.begin_step(request.session_id, request.step, _tensor(request, "iv"))

    def _finish_step(self, half: HalfStep | None, request: pb.TrainRequest) -> pb.TrainResponse:
        gradient = codec.from_proto(request.output_gradient, "output_gradient")
        iv_gradient = self._state.finish_step(half, request.session_id, request.step, gradient)
        response = pb.TrainResponse(step=request.step)
        codec.write(iv_gradient, response.iv_gradient)
        return response

    def Evaluate(self, request: pb.EvaluateRequest, context: grpc.ServicerContext) -> pb.EvaluateResponse:
        def run() -> pb.EvaluateResponse:
            iv, labels = _tensor(request, "iv"), _tensor(request, "labels")
            values = self._state.evaluate(request.session_id, iv, labels, request.reset_metrics)
            return pb.EvaluateResponse(metrics=values)

        return _guard(context, run)

    def Predict(self, request: pb.PredictRequest, context: grpc.ServicerContext) -> pb.PredictResponse:
        def run() -> pb.PredictResponse:
            outputs = self._state.predict(request.session_id, _tensor(request, "iv"))
            response = pb.PredictResponse()
            codec.write(outputs, response.outputs)
            return response

        return _guard(context, run)

    def _handshake(self, request: pb.HandshakeRequest) -> pb.HandshakeResponse:
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

    def _train(self, request: pb.TrainRequest) -> pb.TrainResponse:
        iv, labels = _tensor(request, "iv"), _tensor(request, "labels")
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
        response = pb.TrainResponse(step=result.step, metrics=result.metrics)
        # In place: TrainResponse(iv_gradient=...) would copy the payload once more.
        try:
            codec.write(result.iv_gradient, response.iv_gradient, self._state.encoding)  # type: ignore[arg-type]
        except InvalidRequest as error:  # not the request's fault: the step was applied, its gradient diverged
            raise PreconditionFailed(
                f"step {result.step} was applied but its gradient cannot be sent ({error}): training has "
                "diverged; lower the learning rate, or use the raw wire encoding to see the values"
            ) from None
        return response


def _tensor(request: pb.TrainRequest | pb.EvaluateRequest | pb.PredictRequest, name: str) -> np.ndarray:
    if not request.HasField(name):  # type: ignore[arg-type]
        raise InvalidRequest(f"{name} is required")
    return codec.from_proto(getattr(request, name), name)


def _guard(context: grpc.ServicerContext, run: Callable[[], T]) -> T:
    try:
        return run()
    except SplitError as error:
        log.warning("refused %s: %s", _peer(context), error)
        _abort(context, getattr(grpc.StatusCode, error.status), str(error))
    except Exception as error:  # a bug, not a bad request: say so, keep serving
        log.exception("internal error serving %s", _peer(context))
        _abort(context, grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}: {error}")


def _abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    context.abort(code, message)
    raise AssertionError("unreachable: context.abort raises")


def _peer(context: grpc.ServicerContext) -> str:
    try:
        return context.peer()
    except Exception:
        return "unknown peer"
