"""Credentials both parts load: TLS material, the shared bearer token, and what counts as a loopback address.

Secrets never go into a log line, an exception message or a `repr`: errors name the file, never its content,
and the token travels inside `Secret`, whose `repr` and `str` hide it.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from splitlearning import cli

# Metadata key and scheme of the bearer token (gRPC metadata keys are lower case).
AUTH_METADATA_KEY = "authorization"
AUTH_SCHEME = "Bearer "


class Secret:
    """A string that does not show itself: `repr`/`str`/f-strings print `Secret(***)`."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret(***)"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def read_token(path: Path | str) -> Secret:
    """The bearer token in `path` (surrounding whitespace stripped); errors name the file, never the token."""
    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ValueError(
            f"--auth-token-file: cannot read {str(path)!r}: {error.strerror or type(error).__name__}"
        ) from None
    except UnicodeDecodeError:
        raise ValueError(f"--auth-token-file: {str(path)!r} is not UTF-8 text") from None
    token = raw.strip()
    if not token:
        raise ValueError(f"--auth-token-file: {str(path)!r} is empty")
    if any(c.isspace() or not c.isprintable() or not c.isascii() for c in token):
        raise ValueError(f"--auth-token-file: {str(path)!r} must hold one token of printable ASCII, no spaces")
    return Secret(token)


def auth_metadata(token: Secret | None) -> tuple[tuple[str, str], ...]:
    """The per-call metadata carrying `token` (built once, reused on every call); empty without a token."""
    return ((AUTH_METADATA_KEY, AUTH_SCHEME + token.reveal()),) if token is not None else ()


@dataclass(frozen=True)
class TlsConfig:
    """PEM material for one side of a TLS link.

    Server: `cert` + `key` serve TLS; `ca` also set requires client certificates signed by that CA (mTLS).
    Client: `ca` is the root the server's certificate must chain to (None: the system's roots); `cert` + `key`
    are presented to a server that asks for them. `server_name` overrides the name checked in the server's
    certificate (for a target given as an address the certificate does not name).
    """

    cert: bytes | None = field(default=None, repr=False)
    key: bytes | None = field(default=None, repr=False)
    ca: bytes | None = field(default=None, repr=False)
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError("TLS: a certificate and its private key go together (--tls-cert with --tls-key)")

    @classmethod
    def from_files(
        cls,
        cert: Path | str | None = None,
        key: Path | str | None = None,
        ca: Path | str | None = None,
        server_name: str | None = None,
    ) -> TlsConfig:
        return cls(_read_pem(cert, "--tls-cert"), _read_pem(key, "--tls-key"), _read_pem(ca, "--tls-ca"), server_name)

    @property
    def mutual(self) -> bool:
        """On a server: client certificates are required."""
        return self.ca is not None

    def server_credentials(self) -> grpc.ServerCredentials:
        if self.cert is None or self.key is None:
            raise ValueError("TLS on the server needs --tls-cert and --tls-key (--tls-ca alone is not enough)")
        return grpc.ssl_server_credentials(
            [(self.key, self.cert)], root_certificates=self.ca, require_client_auth=self.ca is not None
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert
        )


def _read_pem(path: Path | str | None, flag: str) -> bytes | None:
    if path is None:
        return None
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise ValueError(f"{flag}: cannot read {str(path)!r}: {error.strerror or type(error).__name__}") from None
    if b"-----BEGIN " not in data:
        raise ValueError(f"{flag}: {str(path)!r} is not a PEM file")
    return data


def is_loopback(address: str) -> bool:
    """Whether `host:port` names a loopback interface only (127.0.0.0/8, ::1, localhost)."""
    if address.startswith(("unix:", "unix-abstract:")):
        return True
    host = address.rsplit(":", 1)[0] if address.count(":") == 1 or address.startswith("[") else address
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def describe(tls: TlsConfig | None, token: Secret | None) -> str:
    """How a server guards its calls, for its start-up line: 'mutual TLS, bearer token' and the like."""
    transport = "mutual TLS" if tls and tls.mutual else "TLS" if tls else "plaintext"
    return f"{transport}, {'bearer token' if token is not None else 'no authentication'}"


def server_tls(cert: Path | None, key: Path | None, ca: Path | None) -> TlsConfig | None:
    """The server's TLS from its flags: None (plaintext) when no file is given."""
    if cert is None and key is None and ca is None:
        return None
    if cert is None or key is None:
        raise ValueError("TLS on the server needs --tls-cert and --tls-key (--tls-ca adds client certificates)")
    return TlsConfig.from_files(cert, key, ca)


def client_tls(
    cert: Path | None, key: Path | None, ca: Path | None, server_name: str | None, enabled: bool = False
) -> TlsConfig | None:
    """The client's TLS from its flags: on when any TLS flag is given (or `enabled`), else None (plaintext)."""
    if not enabled and cert is None and key is None and ca is None and server_name is None:
        return None
    return TlsConfig.from_files(cert, key, ca, server_name)


def add_server_flags(parser: cli.Flags) -> None:
    """--tls-cert, --tls-key, --tls-ca, --auth-token-file for `split-server`."""
    cli.add(parser, "--tls-cert", type=Path, default=None, help="PEM certificate chain: serve TLS (with --tls-key)")
    cli.add(parser, "--tls-key", type=Path, default=None, help="PEM private key of --tls-cert")
    cli.add(parser, "--tls-ca", type=Path, default=None, help="PEM CA: require client certificates it signed (mTLS)")
    cli.add(
        parser,
        "--auth-token-file",
        type=Path,
        default=None,
        help="file holding the bearer token every RPC must carry (health checks excepted)",
    )


def add_client_flags(parser: cli.Flags) -> None:
    """--tls, --tls-ca, --tls-cert, --tls-key, --tls-server-name, --auth-token-file for `split-client`."""
    cli.add(parser, "--tls", action="store_true", help="use TLS with the system's root CAs (implied by --tls-*)")
    cli.add(parser, "--tls-ca", type=Path, default=None, help="PEM CA the server's certificate must chain to")
    cli.add(parser, "--tls-cert", type=Path, default=None, help="PEM client certificate for mutual TLS")
    cli.add(parser, "--tls-key", type=Path, default=None, help="PEM private key of --tls-cert")
    cli.add(parser, "--tls-server-name", default=None, help="name to check in the server's certificate")
    cli.add(parser, "--auth-token-file", type=Path, default=None, help="file holding the server's bearer token")
