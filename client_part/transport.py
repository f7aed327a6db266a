"""The gRPC edge of the client: the channel, the handshake and the per-step exchange on one stream."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client_part import stopping, tls_failure
from splitlearning import codec, encodings, framing, keepalive
from splitlearning.approximations import NONE, Approximations
from splitlearning.channels import open_channel
from splitlearning.contract import (
    Agreement,
    CutContract,
    CutMode,
    Spec,
    contract_from_proto,
    mode_from_proto,
    mode_to_proto,
    spec_to_proto,
)
from splitlearning.groups import Membership
from splitlearning.optimizers import OptimizerSettings
from splitlearning.protocol import (
    CLIENT_ID_METADATA_KEY,
    MESSAGE_OVERHEAD,
    PROTOCOL_VERSION,
    REASON_METADATA_KEY,
    Reason,
)
from splitlearning.security import Secret, TlsConfig, auth_metadata
from splitlearning.v1 import split_learning_pb2 as pb
from splitlearning.v1 import split_learning_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

_TRAIN_METHOD = f"/{pb.DESCRIPTOR.services_by_name['SplitLearningService'].full_name}/Train"
_END = None
# While connecting: how often a failed channel's last error is read, and how long that call may take.
_LOOK_INTERVAL = 0.5
_LOOK_TIMEOUT = 2.0
# Reconnect quickly once a restarted server is back (gRPC's default backoff grows to two minutes).

# The training stream's messages, as `framing` writes and reads them.
TrainRequest = framing.Outgoing[pb.TrainRequest]
TrainReply = framing.Incoming[pb.TrainResponse]


class RemoteError(RuntimeError):
    """The server refused a request (or could not be reached): `code` is the gRPC status, `reason` the cause a
    program tells apart by (the refusal's `split-reason` trailing metadata), None where the server gave none."""

    def __init__(
        self,
        what: str,
        error: grpc.RpcError | None = None,
        code: grpc.StatusCode | None = None,
        details: str = "",
        reason: Reason | None = None,
    ) -> None:
        self.code: grpc.StatusCode = error.code() if error is not None else code or grpc.StatusCode.UNKNOWN
        self.details: str = (error.details() or "") if error is not None else details
        self.reason: Reason | None = _reason_of(error) if error is not None else reason
        super().__init__(f"{what}: {self.code.name}: {self.details}")


def _reason_of(error: grpc.RpcError) -> Reason | None:
    trailing = getattr(error, "trailing_metadata", None)
    for key, value in (trailing() if callable(trailing) else None) or ():
        if key == REASON_METADATA_KEY and value in Reason._value2member_map_:
            return Reason(value)
    return None


@dataclass
class Joined:
    """The session a transport's requests name, held once: its id and the wire encoding of the IV (both set by the
    last handshake), and the epoch `fit` is in (from 0; None before), which the steps that reset the metrics name.

    A `Session` (client_part/session.py) names here the session to join and the epoch, and asks it for the id and
    the encoding; the transport reads it on every request."""

    session_id: str = ""
    encoding: codec.EncodingCode = encodings.RAW
    epoch: int | None = None


class Transport:
    """One channel to the server; `train` reuses one bidirectional stream for every step.

    Every call has a deadline of `rpc_timeout` seconds; on the stream, each reply does (a reader thread hands
    replies over, so a step that gets no answer in time fails with DEADLINE_EXCEEDED and the stream is
    reopened for the next attempt).
    """

    def __init__(
        self,
        target: str,
        max_message_bytes: int,
        rpc_timeout: float,
        tls: TlsConfig | None = None,
        auth_token: Secret | None = None,
        keepalive_ms: int = keepalive.CLIENT_PING_MS,
    ) -> None:
        self.target = target
        self.rpc_timeout = rpc_timeout
        self._tls = tls
        self._keepalive_ms = keepalive_ms
        # Built once: the bearer token (if any) rides on every call as plain per-call metadata, which works
        # with and without TLS and costs nothing per training step (one stream carries all steps).
        self._metadata = auth_metadata(auth_token)
        self._stream_metadata = self._metadata  # the training stream's: also the client id, once it handshook
        self._limit = max_message_bytes + MESSAGE_OVERHEAD
        self._channel = self._open_channel()
        self._stub, self._train_call = self._stubs()
        self._requests: queue.SimpleQueue[TrainRequest | None] | None = None
        self._responses: queue.SimpleQueue[TrainReply | BaseException] | None = None
        self._call: grpc.Call | None = None
        self._reader: threading.Thread | None = None
        self.joined = Joined()  # the session its requests name; its handshake sets it
        self._was_ready = False  # the channel connected once (wait_ready)
        self.bytes_sent = 0  # serialized TrainRequest bytes so far (counted by the Train call's serializer)
        self.bytes_received = 0  # serialized TrainResponse bytes so far (counted by its deserializer)
        self._taken = (0, 0)  # the counts when `take_bytes` was last called

    @property
    def session_id(self) -> str:
        """The session its requests name (`joined`'s)."""
        return self.joined.session_id

    @session_id.setter
    def session_id(self, session_id: str) -> None:
        self.joined.session_id = session_id

    def _open_channel(self) -> grpc.Channel:
        return open_channel(self.target, self._limit, self._tls, self._keepalive_ms)

    def _stubs(self) -> tuple[pb_grpc.SplitLearningServiceStub, Any]:
        """The generated stub, and the Train call with `framing`'s (de)serializers (the tensors' bytes go into
        the wire message once and come out of it as views), which count the bytes as they go."""

        def serialize(request: TrainRequest) -> bytes:
            data = request.serialize()
            self.bytes_sent += len(data)
            return data

        def deserialize(data: bytes) -> TrainReply:
            self.bytes_received += len(data)
            return framing.parse(pb.TrainResponse, data)

        train = self._channel.stream_stream(
            _TRAIN_METHOD, request_serializer=serialize, response_deserializer=deserialize
        )
        return pb_grpc.SplitLearningServiceStub(self._channel), train

    def _fit_limit(self, contract: CutContract, max_batch_size: int) -> None:
        """Size the message limits from the agreed contract: a full batch of the widest tensors that cross.

        Only known after the handshake (labels and outputs are the server's to state), so the channel is
        reopened, once, when the contract needs more than the limit it was opened with.
        """
        per_sample = sum(spec.sample_bytes for spec in (contract.iv, contract.label, contract.output) if spec)
        needed = max_batch_size * per_sample + MESSAGE_OVERHEAD
        if needed <= self._limit:
            return
        self._close_stream()
        self._channel.close()
        self._limit = needed
        self._channel = self._open_channel()
        self._stub, self._train_call = self._stubs()

    @property
    def was_ready(self) -> bool:
        """Whether the channel connected once (`wait_ready` returns at once from then on)."""
        return self._was_ready

    def wait_ready(self, timeout: float, stop: Callable[[], bool] = lambda: False) -> None:
        """Wait up to `timeout` seconds for the channel to connect; `Stopped` as soon as `stop()` says so.

        A server that is not up yet (connection refused) is waited for; a TLS failure ends the wait at once. While
        the channel is in TRANSIENT_FAILURE, a health check that does not wait for readiness reads the cause gRPC
        reports (at most every `_LOOK_INTERVAL` seconds); when it names a TLS failure, or gRPC says only that the
        peer closed the connection and a TLS handshake of the client's own finds one (`tls_failure.probe`), the
        wait ends with a `ConnectionError` naming the cause and the flag to check.
        """
        if self._was_ready:  # once connected, later calls (a group's every round) retry through failures instead:
            return  # no connectivity watch, whose polling thread races a channel closed soon after (grpc #18995)
        state = [grpc.ChannelConnectivity.IDLE]
        changed = threading.Event()  # set by gRPC's thread only (a signal handler never touches it)

        def watch(connectivity: grpc.ChannelConnectivity) -> None:
            state[0] = connectivity
            changed.set()

        self._channel.subscribe(watch, try_to_connect=True)
        deadline = time.monotonic() + timeout
        next_look = 0.0
        try:
            while True:
                if stop():
                    raise stopping.Stopped(f"stopped on request while waiting for the server at {self.target}")
                if state[0] is grpc.ChannelConnectivity.READY:
                    self._was_ready = True
                    return
                now = time.monotonic()
                if state[0] is grpc.ChannelConnectivity.TRANSIENT_FAILURE and now >= next_look:
                    next_look = now + _LOOK_INTERVAL
                    cause = self._tls_failure(stop)
                    if cause:
                        raise ConnectionError(cause)
                    now = time.monotonic()
                if now >= deadline:
                    hint = " (or the TLS handshake failed: check --tls-ca, --tls-cert, --tls-key)" if self._tls else ""
                    raise ConnectionError(f"no server answered at {self.target} within {timeout:g} s{hint}")
                changed.wait(min(stopping.POLL, deadline - now))
                changed.clear()
        finally:
            self._channel.unsubscribe(watch)

    def _tls_failure(self, stop: Callable[[], bool]) -> str | None:
        """What `wait_ready` says when the channel's last connection attempt failed for a TLS reason, else None."""
        details = self._last_error(stop)
        cause = tls_failure.explain(details, self.target, self._tls)
        if cause is None and tls_failure.worth_probing(details):
            cause = tls_failure.probe(details, self.target, self._tls, stop)
        if cause is not None:
            log.debug("connecting to %s: gRPC says %r", self.target, details)
        return cause

    def _last_error(self, stop: Callable[[], bool]) -> str:
        """gRPC's details of a health check that does not wait for readiness: on a channel in TRANSIENT_FAILURE it
        fails at once with the last connection error ("" when it does not fail UNAVAILABLE)."""
        request = health_pb2.HealthCheckRequest(service="")
        check = health_pb2_grpc.HealthStub(self._channel).Check
        call = check.future(request, timeout=_LOOK_TIMEOUT, wait_for_ready=False)
        try:
            while True:
                try:
                    call.result(timeout=stopping.POLL)
                    return ""
                except grpc.FutureTimeoutError:
                    if stop():
                        raise stopping.Stopped(
                            f"stopped on request while waiting for the server at {self.target}"
                        ) from None
        except grpc.RpcError as error:
            code = error.code() if isinstance(error, grpc.Call) else None
            details = error.details() if isinstance(error, grpc.Call) else ""
            return (details or "") if code == grpc.StatusCode.UNAVAILABLE else ""
        finally:
            call.cancel()

    def handshake(
        self,
        iv: Spec,
        label: Spec | None,
        max_batch_size: int,
        session_id: str = "",
        mode: CutMode = CutMode.STANDARD,
        preferred_encodings: Sequence[codec.EncodingCode] = (),
        restorable_steps: Sequence[int] = (),
        client_id: str = "",
        group: Membership | None = None,
        optimizer: OptimizerSettings | None = None,
        approximations: Approximations = NONE,
    ) -> Agreement:
        """Agree on the cut and the session; `preferred_encodings` (most preferred first) may narrow the wire;
        `optimizer`, where given, is checked by the server against its own."""
        request = pb.HandshakeRequest(
            protocol_version=PROTOCOL_VERSION,
            contract=pb.CutContract(iv=spec_to_proto(iv), label=spec_to_proto(label) if label else None),
            session_id=session_id,
            max_batch_size=max_batch_size,
            encodings=[*preferred_encodings, pb.ENCODING_RAW],
            mode=mode_to_proto(mode),
            restorable_steps=sorted(set(restorable_steps)),
            client_id=client_id,
            group=group.to_proto() if group is not None else None,
            optimizer=optimizer.to_proto() if optimizer is not None else None,
            approximations=approximations.to_proto() if not approximations.exact else None,
        )
        try:
            reply = self._stub.Handshake(request, timeout=self.rpc_timeout, metadata=self._metadata)
        except grpc.RpcError as error:
            raise RemoteError("handshake refused", error) from None
        self.joined.session_id = reply.session_id
        self.joined.encoding = encodings.parse(reply.encoding)
        identity = ((CLIENT_ID_METADATA_KEY, client_id.encode("utf-8")),) if client_id else ()
        self._stream_metadata = (*self._metadata, *identity)
        server_mode = mode_from_proto(reply.mode)
        if server_mode is not mode:  # a server that predates the field answers UNSPECIFIED: the standard cut
            raise ValueError(  # a set-up error: retrying cannot help
                f"cut mode mismatch: the server holds {server_mode.describe()}, this client is built for "
                f"{mode.describe()}; start both parts with the same --cut"
            )
        applied = Approximations.from_proto(reply.approximations)
        if applied != approximations:  # a server that predates the field applies none
            raise ValueError(  # a set-up error: retrying cannot help
                f"approximations mismatch: this client asked for {approximations.describe()}, the server applies "
                f"{applied.describe()}; upgrade the server, or train without them"
            )
        contract = contract_from_proto(reply.contract, mode)
        self._fit_limit(contract, min(max_batch_size, reply.max_batch_size))
        return Agreement(
            session_id=reply.session_id,
            next_step=reply.next_step,
            contract=contract,
            max_batch_size=reply.max_batch_size,
            metric_names=list(reply.metric_names),
            mode=mode,
            encoding=self.joined.encoding,
            approximations=applied,
        )

    def take_bytes(self) -> tuple[int, int]:
        """The training stream's bytes sent and received since the last call. gRPC serializes on a thread of its
        own, and with steps in flight a step's span holds the next one's request too: a step is charged what was
        counted since the last step was, so the totals (and the mean per step) come out right."""
        taken, self._taken = self._taken, (self.bytes_sent, self.bytes_received)
        return self.bytes_sent - taken[0], self.bytes_received - taken[1]

    def train(self, step: int, iv: np.ndarray, labels: np.ndarray, reset: bool) -> tuple[np.ndarray, list[float]]:
        """Send one step on the training stream; return dLoss/dIV and the running metrics."""
        self.send(step, iv, labels, reset)
        return self.receive(step)

    def send(
        self,
        step: int,
        iv: np.ndarray,
        labels: np.ndarray,
        reset: bool,
        micro_batch: int = 0,
        micro_batches: int = 1,
        step_samples: int = 0,
    ) -> None:
        """Queue one request on the training stream without waiting for its answer (see `receive`)."""
        joined = self.joined
        request = pb.TrainRequest(session_id=joined.session_id, step=step, reset_metrics=reset)
        if joined.epoch is not None:  # on every step: a server that restarted mid-epoch learns it too
            request.epoch = joined.epoch
        if micro_batches > 1:
            request.micro_batches, request.micro_batch, request.step_samples = micro_batches, micro_batch, step_samples
        # The arrays' bytes are sent from where they are (views): nothing may change them before they are sent.
        tensors = {"iv": codec.encode(iv, joined.encoding), "labels": codec.encode(labels)}
        self._send(framing.Outgoing(request, tensors))

    def receive(self, step: int) -> tuple[np.ndarray, list[float]]:
        """The answer to the oldest request sent and not yet received: dLoss/dIV and the running metrics."""
        reply = self._receive(f"step {step}")
        return _tensor(reply, "iv_gradient"), list(reply.message.metrics)

    def receive_metrics(self, step: int) -> list[float]:
        """The answer to the oldest request sent and not yet received, when it carries no gradient (a local
        loss's): the running metrics. It must answer `step`."""
        reply = self._receive(f"step {step}")
        if reply.message.step != step:
            self._close_stream()
            raise RemoteError(
                f"step {step}",
                code=grpc.StatusCode.INTERNAL,
                details=f"the server answered step {reply.message.step} where step {step} was due",
            )
        return list(reply.message.metrics)

    def train_forward(self, step: int, iv: np.ndarray) -> np.ndarray:
        """U-shape, first exchange of a step (no labels): the IV out, the middle's outputs back."""
        request = framing.Outgoing(
            pb.TrainRequest(session_id=self.joined.session_id, step=step), {"iv": codec.encode(iv)}
        )
        return _tensor(self._exchange(request, f"step {step} (forward)"), "outputs")

    def train_backward(self, step: int, output_gradient: np.ndarray) -> np.ndarray:
        """U-shape, second exchange of a step: dLoss/d(middle outputs) out, dLoss/dIV back."""
        tensors = {"output_gradient": codec.encode(output_gradient)}
        request = framing.Outgoing(pb.TrainRequest(session_id=self.joined.session_id, step=step), tensors)
        return _tensor(self._exchange(request, f"step {step} (backward)"), "iv_gradient")

    def _exchange(self, request: TrainRequest, what: str) -> TrainReply:
        """One request and its response on the training stream (opened on first use)."""
        self._send(request)
        return self._receive(what)

    def _send(self, request: TrainRequest) -> None:
        if self._responses is None:
            self._open_stream()
        assert self._requests is not None
        self._requests.put(request)

    def _receive(self, what: str) -> TrainReply:
        assert self._responses is not None, "receive before send"
        try:
            reply = self._responses.get(timeout=self.rpc_timeout)
        except queue.Empty:
            self._close_stream()
            raise RemoteError(
                what, code=grpc.StatusCode.DEADLINE_EXCEEDED, details=f"no reply in {self.rpc_timeout:g} s"
            ) from None
        if isinstance(reply, grpc.RpcError):
            self._close_stream()
            raise RemoteError(f"{what} refused", reply) from None
        if isinstance(reply, BaseException):
            self._close_stream()
            raise ConnectionError(f"the server closed the training stream at {what}") from None
        return reply

    def evaluate(self, iv: np.ndarray, labels: np.ndarray, reset: bool, step: int | None = None) -> list[float]:
        """`step`: this client's, for the server to check that both parts are at it (None: not checked)."""
        request = pb.EvaluateRequest(
            session_id=self.joined.session_id,
            iv=codec.to_proto(iv, self.joined.encoding),
            labels=codec.to_proto(labels),
            reset_metrics=reset,
            step=step,
        )
        try:
            return list(self._stub.Evaluate(request, timeout=self.rpc_timeout, metadata=self._metadata).metrics)
        except grpc.RpcError as error:
            raise RemoteError("evaluate refused", error) from None

    def probe(self, up_bytes: int, down_bytes: int) -> float:
        """One link probe (`up_bytes` up, `down_bytes` back): its round trip in seconds."""
        request = pb.ProbeRequest(padding=bytes(up_bytes), reply_bytes=down_bytes)
        started = time.perf_counter()
        try:
            self._stub.Probe(request, timeout=self.rpc_timeout, metadata=self._metadata)
        except grpc.RpcError as error:
            raise RemoteError("link probe refused", error) from None
        return time.perf_counter() - started

    def predict(self, iv: np.ndarray, step: int | None = None) -> np.ndarray:
        request = pb.PredictRequest(
            session_id=self.joined.session_id, iv=codec.to_proto(iv, self.joined.encoding), step=step
        )
        try:
            reply = self._stub.Predict(request, timeout=self.rpc_timeout, metadata=self._metadata)
        except grpc.RpcError as error:
            raise RemoteError("predict refused", error) from None
        return codec.from_proto(reply.outputs, "outputs")

    def close_session(self, client_id: str, contribute_samples: int = 0) -> tuple[int, bool]:
        """End the session on the server (after closing the training stream): (its steps, checkpointed).
        `contribute_samples`: keep its part as this member's contribution to its group round."""
        self._close_stream()
        request = pb.CloseSessionRequest(
            session_id=self.joined.session_id, client_id=client_id, contribute_samples=contribute_samples
        )
        try:
            reply = self._stub.CloseSession(request, timeout=self.rpc_timeout, metadata=self._metadata)
        except grpc.RpcError as error:
            raise RemoteError("closing the session refused", error) from None
        return int(reply.steps), bool(reply.checkpointed)

    def end_stream(self) -> None:
        """Close the training stream (if open); the channel stays for the next session."""
        self._close_stream()

    def close(self) -> None:
        self._close_stream()
        self._channel.close()

    def _open_stream(self) -> None:
        requests: queue.SimpleQueue[TrainRequest | None] = queue.SimpleQueue()

        def feed() -> Iterator[TrainRequest]:
            while (request := requests.get()) is not _END:
                yield request

        responses: queue.SimpleQueue[TrainReply | BaseException] = queue.SimpleQueue()
        call = self._train_call(feed(), metadata=self._stream_metadata)

        def read() -> None:
            try:
                for reply in call:
                    responses.put(reply)
                responses.put(EOFError("the server closed the training stream"))
            except grpc.RpcError as error:
                responses.put(error)

        self._requests, self._responses, self._call = requests, responses, call
        self._reader = threading.Thread(target=read, name="split-train-reader", daemon=True)
        self._reader.start()

    def _close_stream(self) -> None:
        if self._requests is not None:
            self._requests.put(_END)
        if self._call is not None:
            self._call.cancel()
        if self._reader is not None:
            self._reader.join(timeout=5.0)
        self._requests = self._responses = None
        self._call = self._reader = None


def _tensor(reply: TrainReply, name: str) -> np.ndarray:
    return codec.decode(getattr(reply.message, name), reply.content(name), name)
