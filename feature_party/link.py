"""A feature party's calls to the label party: one stub, retries while the label party (or another party) is
not there, and the statuses that mean "join again" told apart from real refusals (docs/vertical.md)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

import grpc

from splitlearning.channels import open_channel
from splitlearning.protocol import MESSAGE_OVERHEAD, PSI_BYTES_PER_ID
from splitlearning.security import Secret, TlsConfig, auth_metadata
from splitlearning.v1 import split_learning_pb2 as pb
from splitlearning.v1 import split_learning_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

R = TypeVar("R")
# Statuses a retry of the same call can cure: the label party is restarting, or a party has not come yet.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


class Rejoin(Exception):
    """The membership changed (a party joined again, or the label party restarted): join again."""


class Refused(RuntimeError):
    """The label party refused a call for good: its status and message."""

    def __init__(self, what: str, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{what} refused: {code.name}: {details}")
        self.code = code
        self.details = details


class LabelPartyLink:
    """Calls the label party's VerticalService at `target`. A call failing with UNAVAILABLE (or its deadline) is
    tried again, with a growing pause, until `retry_timeout` seconds have passed without success; ABORTED raises
    `Rejoin`; any other status `Refused`."""

    def __init__(
        self,
        target: str,
        tls: TlsConfig | None = None,
        token: Secret | None = None,
        retry_timeout: float = 120.0,
        call_timeout: float = 600.0,
        max_ids: int = 1_000_000,
    ) -> None:
        self.target = target
        self._channel = open_channel(target, MESSAGE_OVERHEAD + PSI_BYTES_PER_ID * max_ids, tls)
        self._stub = pb_grpc.VerticalServiceStub(self._channel)
        self._metadata = auth_metadata(token)
        self.retry_timeout = retry_timeout
        self.call_timeout = call_timeout
        self.retries = 0

    def align(self, request: pb.AlignRequest) -> pb.AlignResponse:
        return self._call("Align", self._stub.Align, request)

    def match(self, request: pb.MatchRequest) -> pb.MatchResponse:
        return self._call("Match", self._stub.Match, request)

    def join(self, request: pb.JoinRequest) -> pb.JoinResponse:
        return self._call("Join", self._stub.Join, request)

    def step(self, request: pb.VerticalStepRequest) -> pb.VerticalStepResponse:
        return self._call(f"step {request.step}", self._stub.Step, request)

    def evaluate(self, request: pb.VerticalEvaluateRequest) -> pb.VerticalEvaluateResponse:
        return self._call(f"held-out batch {request.batch}", self._stub.Evaluate, request)

    def close(self) -> None:
        self._channel.close()

    def _call(self, what: str, method: Callable[..., R], request: object) -> R:
        started = time.monotonic()
        pause = 0.2
        while True:
            try:
                return method(request, timeout=self.call_timeout, metadata=self._metadata)
            except grpc.RpcError as error:
                code, details = error.code(), error.details() or ""
                if code is grpc.StatusCode.ABORTED:
                    raise Rejoin(f"{what}: {details}") from None
                if code not in RETRYABLE:
                    raise Refused(what, code, details) from None
                waited = time.monotonic() - started
                if waited >= self.retry_timeout:
                    raise Refused(what, code, f"{details} (still failing after {waited:.0f} s of retries)") from None
                self.retries += 1
                log.warning("%s: %s: %s; retrying in %.1f s", what, code.name, details, pause)
                time.sleep(pause)
                pause = min(pause * 2, 5.0)
