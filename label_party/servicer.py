"""The label party's gRPC service: thin, each call decoded, handed to the `Coordinator`, answered
(docs/vertical.md, "The wire"); with per-party tokens, a call is accepted only with its party's own token."""

from __future__ import annotations

import hmac

import grpc

from label_party.coordinator import Coordinator
from splitlearning import codec
from splitlearning.contract import spec_from_proto
from splitlearning.errors import SplitError
from splitlearning.protocol import MESSAGE_OVERHEAD, PSI_BYTES_PER_ID, VERTICAL_SERVICE
from splitlearning.security import AUTH_METADATA_KEY, AUTH_SCHEME, Secret
from splitlearning.serving.edge import add_unary_service, guard
from splitlearning.v1 import split_learning_pb2 as pb


class Unauthenticated(SplitError):
    """The call carries none of the parties' tokens."""

    status = "UNAUTHENTICATED"


class WrongParty(SplitError):
    """The call's token is not the one of the party it acts for."""

    status = "PERMISSION_DENIED"


class VerticalServicer:
    def __init__(self, coordinator: Coordinator, tokens: dict[str, Secret] | None = None) -> None:
        self.coordinator = coordinator
        self._tokens = {name: (AUTH_SCHEME + token.reveal()).encode() for name, token in (tokens or {}).items()}

    def Align(self, request: pb.AlignRequest, context: grpc.ServicerContext) -> pb.AlignResponse:
        def run() -> pb.AlignResponse:
            self._check_token(request.party, context)
            offer = self.coordinator.align(request.protocol_version, request.party, list(request.blinded))
            return pb.AlignResponse(offer=offer)

        return guard(context, run)

    def Match(self, request: pb.MatchRequest, context: grpc.ServicerContext) -> pb.MatchResponse:
        def run() -> pb.MatchResponse:
            self._check_token(request.party, context)
            positions, alignment = self.coordinator.match(request.party, list(request.reblinded))
            return pb.MatchResponse(positions=positions, alignment=alignment)

        return guard(context, run)

    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinResponse:
        def run() -> pb.JoinResponse:
            self._check_token(request.party, context)
            joined = self.coordinator.join(
                request.protocol_version,
                request.party,
                request.alignment,
                spec_from_proto(request.iv, "iv"),
                request.seed if request.HasField("seed") else None,
                request.fuse,
                request.batch_size,
                list(request.restorable_steps),
            )
            order = joined.order
            return pb.JoinResponse(
                ticket=joined.ticket,
                party_index=joined.index,
                parties=len(self.coordinator.plan.parties),
                step=joined.step,
                train_rows=order.train_rows,
                test_rows=order.test_rows,
                batch_size=order.batch_size,
                epochs=order.epochs,
                seed=order.seed,
                fuse=self.coordinator.plan.fuse.value,
            )

        return guard(context, run)

    def Step(self, request: pb.VerticalStepRequest, context: grpc.ServicerContext) -> pb.VerticalStepResponse:
        def run() -> pb.VerticalStepResponse:
            self._check_ticket_token(request.ticket, context)
            iv = codec.from_proto(request.iv, "iv")
            gradient = self.coordinator.step(request.ticket, request.step, iv)
            reply = pb.VerticalStepResponse(step=request.step)
            codec.write(gradient, reply.gradient)  # in place: no copy of a finished tensor message
            return reply

        return guard(context, run)

    def Evaluate(
        self, request: pb.VerticalEvaluateRequest, context: grpc.ServicerContext
    ) -> pb.VerticalEvaluateResponse:
        def run() -> pb.VerticalEvaluateResponse:
            self._check_ticket_token(request.ticket, context)
            iv = codec.from_proto(request.iv, "iv")
            self.coordinator.evaluate(request.ticket, request.step, request.batch, iv)
            return pb.VerticalEvaluateResponse()

        return guard(context, run)

    def _check_ticket_token(self, ticket: str, context: grpc.ServicerContext) -> None:
        """With per-party tokens, the call's must be the token of the party its ticket was issued to."""
        if self._tokens:
            self._check_token(self.coordinator.party_of(ticket), context)

    def _check_token(self, party: str, context: grpc.ServicerContext) -> None:
        """With per-party tokens (the host's own check lets any of them through), the call's must be `party`'s."""
        if not self._tokens:
            return
        expected = self._tokens.get(party)
        offered = b""
        for key, value in context.invocation_metadata() or ():
            if key == AUTH_METADATA_KEY:
                offered = value.encode() if isinstance(value, str) else bytes(value)
        if not any(hmac.compare_digest(offered, token) for token in self._tokens.values()):
            raise Unauthenticated("missing or invalid bearer token (send 'authorization: Bearer <token>' metadata)")
        if expected is None or not hmac.compare_digest(offered, expected):
            raise WrongParty(f"this call's token is not {party[:64]!r}'s: a party acts only for its own slot")


class VerticalMount:
    """The vertical service over a `Coordinator`, as a `Host` (splitlearning/serving/host.py) serves it."""

    service_names = (VERTICAL_SERVICE,)

    def __init__(self, coordinator: Coordinator, tokens: dict[str, Secret] | None = None, max_ids: int = 1_000_000):
        self.coordinator = coordinator
        self.tokens = tokens
        self.max_message_bytes = MESSAGE_OVERHEAD + PSI_BYTES_PER_ID * max_ids

    def add_to(self, server: grpc.Server) -> None:
        add_unary_service(VerticalServicer(self.coordinator, self.tokens), server, "VerticalService")

    def start(self) -> None:
        self.coordinator.prepare()

    def stop(self) -> None:
        pass

    def describe(self) -> str:
        parties = self.coordinator.plan.parties
        return f"a vertical split's label party for {len(parties)} feature parties ({', '.join(parties)})"
