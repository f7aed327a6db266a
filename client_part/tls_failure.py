"""Telling a TLS failure from a server that is not up yet, while the client waits to connect.

gRPC reports why a connection attempt failed in the details of a call that does not wait for readiness. Most TLS
failures are named there: the server's certificate not signed by the client's CA, a name the certificate does
not hold, a server that speaks plaintext. Two are not: a server that requires client certificates and refuses
the client's (or its absence), and a plaintext client at a TLS server. gRPC says only "Socket closed" for both,
as for any peer that hangs up. For those, `probe` makes one TLS handshake of its own (no verification, no
client certificate, nothing sent after it): a server that completes it speaks TLS, and one that then closes
the connection before sending a byte (an HTTP/2 server sends its settings at once) refused the client's
certificate. Anything else (connection refused, a name that does not resolve) is not a TLS failure: the
client keeps waiting.
"""

from __future__ import annotations

import re
import select
import socket
import ssl
import time
from collections.abc import Callable
from typing import TypeVar

from client_part import stopping
from splitlearning.security import TlsConfig

# Words in gRPC's details that name a TLS failure (lower case).
_TLS_WORDS = ("handshake failed", "ssl", "tls", "certificate", "hostname verification", "peer name")
# gRPC's details when the peer closed a connection it had accepted: worth a probe.
_CLOSED_WORDS = ("socket closed", "connection reset", "end of file")
_PROBE_SECONDS = 3.0  # the probe's whole budget; it looks at `stop` every `stopping.POLL`
_CONNECT_SECONDS = 0.5  # its TCP connect (the peer accepted one a moment ago)

T = TypeVar("T")


def explain(details: str, target: str, tls: TlsConfig | None) -> str | None:
    """One line naming the TLS failure in gRPC's `details` of a failed connection, and the flag to check; None
    when `details` name no TLS failure (then `probe` may still find one)."""
    lowered = details.lower()
    if tls is None or not any(word in lowered for word in _TLS_WORDS):
        return None
    said = f"TLS with the server at {target} failed (gRPC: {_cause(details)})"
    if "certificate_verify_failed" in lowered or "certificate verify failed" in lowered:
        trusted = "the CA in --tls-ca" if tls.ca is not None else "the system's root CAs (no --tls-ca given)"
        return f"{said}: its certificate is not signed by {trusted}; give --tls-ca the CA that signed its --tls-cert"
    if "hostname verification" in lowered or "peer name" in lowered or "server name" in lowered:
        name = tls.server_name or _host(target) or target
        return (
            f"{said}: its certificate does not name {name!r}; check --target, or give --tls-server-name a name "
            "the certificate holds"
        )
    if "wrong_version_number" in lowered or "wrong version number" in lowered:
        return (
            f"{said}: the server speaks plaintext (started without --tls-cert); start it with --tls-cert and "
            "--tls-key, or drop this client's --tls flags"
        )
    return f"{said}; check --tls-ca, --tls-cert, --tls-key and --tls-server-name"


def worth_probing(details: str) -> bool:
    """Whether gRPC's `details` say the peer closed a connection it accepted (what `probe` looks into)."""
    lowered = details.lower()
    return any(word in lowered for word in _CLOSED_WORDS)


def probe(
    details: str, target: str, tls: TlsConfig | None, stop: Callable[[], bool], budget: float = _PROBE_SECONDS
) -> str | None:
    """One line naming the TLS failure behind gRPC's "Socket closed" (`details`), found by a handshake of our
    own, and the flag to check; None when the handshake finds none. `Stopped` as soon as `stop()` says so."""
    address = _address(target)
    if address is None:
        return None
    host, port = address
    server_name = (tls.server_name if tls else None) or host
    answer = _hello(host, port, server_name, stop, time.monotonic() + budget)
    said = f"(gRPC: {_cause(details)})"
    if tls is None and answer is not None:  # it completed a TLS handshake: it speaks TLS
        return (
            f"the server at {target} speaks TLS and this client plaintext {said}: give --tls-ca (the CA that signed "
            "its certificate), or --tls to trust the system's root CAs"
        )
    if tls is not None and answer == b"":  # handshake done, then closed unasked: our certificate was refused
        mine = (
            "this client gave none: give --tls-cert and --tls-key"
            if tls.cert is None
            else "check that --tls-cert was signed by the CA the server was given with --tls-ca"
        )
        return (
            f"TLS with the server at {target} failed {said}: it closed the connection right after the handshake, "
            f"as a server that requires a client certificate from its CA (mutual TLS) does; {mine}"
        )
    return None


def _hello(host: str, port: int, server_name: str, stop: Callable[[], bool], deadline: float) -> bytes | None:
    """A TLS handshake with `host:port` and the first bytes that follow it (b"": the server closed the connection
    first; None: no handshake, or nothing either way before `deadline`)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # a diagnosis: nothing is sent after the handshake, nothing trusted
    context.set_alpn_protocols(["h2"])
    try:
        raw = socket.create_connection((host, port), timeout=_CONNECT_SECONDS)
    except OSError:
        return None
    raw.setblocking(False)
    sni = None if _is_ip(server_name) else server_name
    with context.wrap_socket(raw, server_hostname=sni, do_handshake_on_connect=False) as conn:
        try:
            _nonblocking(conn, conn.do_handshake, stop, deadline)
            return _nonblocking(conn, lambda: conn.recv(64), stop, deadline)
        except (ssl.SSLError, OSError, TimeoutError) as error:
            if isinstance(error, ssl.SSLError) and "CERTIFICATE_REQUIRED" in str(error.reason):
                return b""  # a TLS 1.3 server's alert where it sends one: refused for want of a certificate
            if isinstance(error, ConnectionResetError | ssl.SSLEOFError) and conn.version() is not None:
                return b""  # closed after the handshake
            return None


def _nonblocking(conn: ssl.SSLSocket, operation: Callable[[], T], stop: Callable[[], bool], deadline: float) -> T:
    while True:
        try:
            return operation()
        except ssl.SSLWantReadError:
            wanted: tuple[list[ssl.SSLSocket], list[ssl.SSLSocket]] = ([conn], [])
        except ssl.SSLWantWriteError:
            wanted = ([], [conn])
        if stop():
            raise stopping.Stopped("stopped on request while waiting for the server")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("TLS probe timed out")
        select.select(*wanted, [], min(stopping.POLL, remaining))


def _cause(details: str) -> str:
    """gRPC's details, short: the last error without the address list and OpenSSL's internal prefixes."""
    text = details.split("last error: ", 1)[-1]
    text = re.sub(r"^[A-Z_]+: (?:ipv4|ipv6|unix|unix-abstract):\S+?: ", "", text)
    text = re.sub(r" \(TSI_[A-Z_]+\): SSL_ERROR_SSL: error:[0-9a-f]+:SSL routines:OPENSSL_internal:", ": ", text)
    text = re.sub(r": Invalid certificate verification context", "", text)
    return text.removesuffix(": OK").strip()


def _address(target: str) -> tuple[str, int] | None:
    """(host, port) of a `host:port`, `[v6]:port`, `dns:///host:port` or `ipv4:`/`ipv6:` target; None for others
    (unix sockets, several addresses, another resolver)."""
    for scheme in ("dns:///", "dns:", "ipv4:", "ipv6:"):
        target = target.removeprefix(scheme)
    if "/" in target or "," in target or ":" not in target or target.startswith("unix"):
        return None
    host, _, port = target.rpartition(":")
    if not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def _host(target: str) -> str | None:
    address = _address(target)
    return address[0] if address else None


def _is_ip(name: str) -> bool:
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in name else socket.AF_INET, name)
    except OSError:
        return False
    return True
