"""Domain errors, each naming the gRPC status it maps to, so the training code imports no gRPC."""

from __future__ import annotations

from splitlearning.protocol import Reason


class SplitError(Exception):
    """Base of every error the server turns into a gRPC status; `status` is a `grpc.StatusCode` name, and
    `reason`, where set, goes with it as trailing metadata for programs (splitlearning/protocol.py)."""

    status = "UNKNOWN"
    reason: Reason | None = None


class InvalidRequest(SplitError):
    """The request itself is malformed or inconsistent (wrong shape, dtype, missing field, NaN)."""

    status = "INVALID_ARGUMENT"


class PreconditionFailed(SplitError):
    """A well-formed request that does not fit the server's state (contract mismatch, step out of order)."""

    status = "FAILED_PRECONDITION"


class CutMismatch(PreconditionFailed):
    """The client's part does not fit the server's: its IV is not the one the server's part takes."""

    reason = Reason.CUT_MISMATCH


class SessionNotFound(SplitError):
    """The request names a session the server does not hold."""

    status = "NOT_FOUND"


class TooLarge(SplitError):
    """The request is bigger than the limits agreed in the handshake."""

    status = "RESOURCE_EXHAUSTED"


class SessionBusy(SplitError):
    """Another client is training in the session (one client per session until multi-client training exists)."""

    status = "FAILED_PRECONDITION"


class ShuttingDown(SplitError):
    """The server is stopping (SIGTERM): retry once it is back."""

    status = "UNAVAILABLE"


class Conflict(SplitError):
    """A request that collides with another one in flight (a U-shape step whose old stream is still being
    wound up): safe to retry after a moment."""

    status = "ABORTED"


class StepMismatch(SplitError):
    """The client's part and the server's are at different steps, so together they are no model that was
    trained (a side restarted from an older checkpoint): the client must handshake again to agree on a step."""

    status = "ABORTED"


class TooManySessions(SplitError):
    """The server holds as many sessions as it may (`--max-sessions`): a new one cannot be opened now."""

    status = "RESOURCE_EXHAUSTED"


class SessionUnloaded(SplitError):
    """The session is not in memory (closed, idle too long, or the server restarted) but has checkpoints: a
    handshake naming it resumes it."""

    status = "ABORTED"
