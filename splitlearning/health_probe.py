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
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from splitlearning.security import TlsConfig

SERVING = health_pb2.HealthCheckResponse.SERVING


@dataclass(frozen=True)
class ProbeConfig:
    target: str
    service: str
    timeout: float
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_server_name: str | None = None

    def tls(self) -> TlsConfig | None:
        """TLS when any TLS flag is given (health needs no token: the server exempts it)."""
        if self.tls_ca is None and self.tls_cert is None and self.tls_key is None and self.tls_server_name is None:
            return None
        return TlsConfig.from_files(self.tls_cert, self.tls_key, self.tls_ca, self.tls_server_name)


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
    parser.add_argument("--tls-ca", type=Path, default=None, help="TLS: PEM CA the server's certificate chains to")
    parser.add_argument("--tls-cert", type=Path, default=None, help="mutual TLS: PEM client certificate")
    parser.add_argument("--tls-key", type=Path, default=None, help="mutual TLS: PEM key of --tls-cert")
    parser.add_argument("--tls-server-name", default=None, help="TLS: name to check in the server's certificate")
    config = ProbeConfig(**vars(parser.parse_args(argv)))
    if not config.timeout > 0:
        parser.error("--timeout must be positive")
    return config


def check(target: str, service: str = "", timeout: float = 3.0, tls: TlsConfig | None = None) -> str:
    """The server's status for `service` as its enum name ('SERVING', 'NOT_SERVING', ...).

    Raises `grpc.RpcError` when the server cannot be reached or does not answer within `timeout` seconds.
    """
    with _channel(target, tls) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


def _channel(target: str, tls: TlsConfig | None) -> grpc.Channel:
    if tls is None:
        return grpc.insecure_channel(target)
    options = [("grpc.ssl_target_name_override", tls.server_name)] if tls.server_name else []
    return grpc.secure_channel(target, tls.channel_credentials(), options=options)


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    try:
        tls = config.tls()
    except ValueError as error:
        print(f"split-health: {error}", file=sys.stderr)
        return 2
    try:
        status = check(config.target, config.service, config.timeout, tls)
    except grpc.RpcError as error:
        code = error.code() if isinstance(error, grpc.Call) else None
        detail = error.details() if isinstance(error, grpc.Call) else str(error)
        print(f"{config.target}: {code.name if code else 'error'}: {detail}", file=sys.stderr)
        return 1
    print(f"{config.target}: {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    raise SystemExit(main())
