"""`split-health`: ask a server for its standard gRPC health (`grpc.health.v1`); exit 0 only on SERVING.

Made for container health checks (`healthcheck:` in docker-compose.yml): one `Check` call with a deadline,
no retries (the orchestrator retries), and no TensorFlow import, so a probe costs a fraction of a second.
Exit status: 0 SERVING, 1 anything else (NOT_SERVING, unknown service, unreachable, deadline passed),
2 bad usage.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING


@dataclass(frozen=True)
class ProbeConfig:
    target: str
    service: str
    timeout: float


def parse_args(argv: list[str] | None = None) -> ProbeConfig:
    parser = argparse.ArgumentParser(prog="split-health", description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="127.0.0.1:50051", help="the server's host:port (default: %(default)s)")
    parser.add_argument(
        "--service",
        default="",
        help="service to ask about: '' (the whole server, the default) or splitlearning.v1.SplitLearningService",
    )
    parser.add_argument(
        "--timeout", type=float, default=3.0, help="seconds to wait for the answer (default: %(default)s)"
    )
    config = ProbeConfig(**vars(parser.parse_args(argv)))
    if not config.timeout > 0:
        parser.error("--timeout must be positive")
    return config


def check(target: str, service: str = "", timeout: float = 3.0) -> str:
    """The server's status for `service` as its enum name ('SERVING', 'NOT_SERVING', ...).

    Raises `grpc.RpcError` when the server cannot be reached or does not answer within `timeout` seconds.
    """
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    try:
        status = check(config.target, config.service, config.timeout)
    except grpc.RpcError as error:
        code = error.code() if isinstance(error, grpc.Call) else None
        detail = error.details() if isinstance(error, grpc.Call) else str(error)
        print(f"{config.target}: {code.name if code else 'error'}: {detail}", file=sys.stderr)
        return 1
    print(f"{config.target}: {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    raise SystemExit(main())
