"""The gRPC edge of the aggregator: decode, call the rounds, encode; domain errors become statuses."""

from __future__ import annotations

import grpc

from aggregator.rounds import Next, Rounds
from splitlearning import groups, part_state
from splitlearning.aggregation import Aggregation
from splitlearning.errors import InvalidRequest
from splitlearning.groups import Settings
from splitlearning.protocol import MAX_ID_LENGTH
from splitlearning.serving.edge import add_unary_service, guard
from splitlearning.v1 import split_learning_pb2 as pb


class AggregatorServicer:
    def __init__(self, rounds: Rounds) -> None:
        self._rounds = rounds

    def JoinRound(self, request: pb.JoinRoundRequest, context: grpc.ServicerContext) -> pb.JoinRoundResponse:
        def run() -> pb.JoinRoundResponse:
            _check_group(request.group)
            settings = Settings.from_proto(request.settings)
            initial = part_state.from_proto(request.initial, "initial") if request.HasField("initial") else None
            answer = self._rounds.join(request.group, request.member, settings, initial, request.wait_ms / 1000.0)
            return _response(answer, self._rounds.members, self._rounds.aggregation)

        return guard(context, run)

    def SubmitRound(self, request: pb.SubmitRoundRequest, context: grpc.ServicerContext) -> pb.SubmitRoundResponse:
        def run() -> pb.SubmitRoundResponse:
            _check_group(request.group)
            state = part_state.from_proto(request.state, "state")
            submitted, members = self._rounds.submit(
                request.group, request.member, request.round, state, request.samples
            )
            return pb.SubmitRoundResponse(submitted=submitted, members=members)

        return guard(context, run)


def _check_group(name: str) -> None:
    if len(name) > MAX_ID_LENGTH:  # before anything else reads it
        raise InvalidRequest(f"group: at most {MAX_ID_LENGTH} characters, got {len(name)}")
    groups.check_name(name)


def _response(answer: Next, members: int, aggregation: Aggregation) -> pb.JoinRoundResponse:
    response = pb.JoinRoundResponse(
        action=answer.action.to_proto(),
        round=answer.round,
        start=[c.to_proto() for c in answer.start],
        members=members,
        note=answer.note,
        aggregation=aggregation.to_proto(),
    )
    if answer.state is not None:
        part_state.to_proto(answer.state, response.state)
    return response


def add_to_server(servicer: AggregatorServicer, server: grpc.Server) -> None:
    """Register the service; bytes that are no request get INVALID_ARGUMENT (splitlearning/serving/edge.py)."""
    add_unary_service(servicer, server, "AggregatorService")
