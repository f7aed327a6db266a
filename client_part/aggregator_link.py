"""The member's channel to the aggregator: `join` (what to do next) and `submit` (a round's first part), each
retried through UNAVAILABLE and the like (an aggregator restarting), as the training calls are."""

from __future__ import annotations

import logging
from collections.abc import Callable

import grpc

from client_part import retry
from client_part.retry import RetryPolicy
from client_part.transport import RemoteError
from splitlearning import part_state
from splitlearning.aggregation import Aggregation
from splitlearning.channels import open_channel
from splitlearning.errors import InvalidRequest
from splitlearning.groups import Action, Contribution, Settings, contributions
from splitlearning.part_state import PartState
from splitlearning.protocol import MAX_STATE_BYTES
from splitlearning.security import Secret, TlsConfig, auth_metadata
from splitlearning.v1 import split_learning_pb2 as pb
from splitlearning.v1 import split_learning_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

WAIT_MS = 10_000  # a join waits this long on the aggregator for something to do, then asks again


class Answer:
    """A join's answer: `action`, the round, the state, the server's start and the aggregator's rule (which the
    member passes on to the server)."""

    def __init__(self, reply: pb.JoinRoundResponse) -> None:
        try:
            self.action = Action.from_proto(reply.action)
        except ValueError as error:
            raise RemoteError("join answered", code=grpc.StatusCode.UNKNOWN, details=str(error)) from None
        self.round = int(reply.round)
        self.state: PartState = part_state.from_proto(reply.state, "state")
        self.start: tuple[Contribution, ...] = contributions(reply.start)
        try:
            self.aggregation = Aggregation.from_proto(reply.aggregation)
        except InvalidRequest as error:
            raise RemoteError("join answered", code=grpc.StatusCode.UNKNOWN, details=str(error)) from None
        self.members = int(reply.members)
        self.note = reply.note


class AggregatorLink:
    def __init__(
        self,
        target: str,
        group: str,
        member: int,
        settings: Settings,
        tls: TlsConfig | None = None,
        auth_token: Secret | None = None,
        rpc_timeout: float = 60.0,
        policy: RetryPolicy | None = None,
        stop: Callable[[], bool] = lambda: False,
    ) -> None:
        self.target = target
        self.group, self.member, self.settings = group, member, settings
        self.members = 0  # the aggregator's member count, from its last answer
        self._rpc_timeout = rpc_timeout
        self._policy = policy or RetryPolicy()
        self._stop = stop
        self._metadata = auth_metadata(auth_token)
        self._channel = open_channel(target, MAX_STATE_BYTES, tls)
        self._stub = pb_grpc.AggregatorServiceStub(self._channel)

    def join(self, initial: PartState | None) -> Answer:
        request = pb.JoinRoundRequest(
            group=self.group, member=self.member, settings=self.settings.to_proto(), wait_ms=WAIT_MS
        )
        if initial is not None:
            part_state.to_proto(initial, request.initial)
        timeout = self._rpc_timeout + WAIT_MS / 1000.0

        def attempt(retrying: bool) -> Answer:
            try:
                return Answer(self._stub.JoinRound(request, timeout=timeout, metadata=self._metadata))
            except grpc.RpcError as error:
                raise RemoteError(f"joining group {self.group} at the aggregator {self.target}", error) from None

        answer = retry.call(self._policy, "join", attempt, stop=self._stop)
        self.members = answer.members
        return answer

    def submit(self, round_: int, state: PartState, samples: int) -> tuple[int, int]:
        request = pb.SubmitRoundRequest(group=self.group, member=self.member, round=round_, samples=samples)
        part_state.to_proto(state, request.state)

        def attempt(retrying: bool) -> tuple[int, int]:
            try:
                reply = self._stub.SubmitRound(request, timeout=self._rpc_timeout, metadata=self._metadata)
            except grpc.RpcError as error:
                raise RemoteError(f"submitting round {round_} to the aggregator {self.target}", error) from None
            return int(reply.submitted), int(reply.members)

        return retry.call(self._policy, f"submit round {round_}", attempt, stop=self._stop)

    def close(self) -> None:
        self._channel.close()
