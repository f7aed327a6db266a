"""`client_part.tls_failure`: which of gRPC's connection errors name a TLS failure, and what the client says.

The details are as grpcio 1.85 reports them (tests/test_security_tls.py gets them from live servers).
"""

from __future__ import annotations

import pytest

from client_part import tls_failure
from splitlearning.security import TlsConfig

LAST = "failed to connect to all addresses; last error: "
VERIFY = (
    LAST + "UNKNOWN: ipv4:127.0.0.1:41515: Tls handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: "
    "error:1000007d:SSL routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED: unable to get local issuer "
    "certificate: OK"
)
NAME = (
    LAST + "UNKNOWN: ipv4:127.0.0.1:39533: Custom verification check failed with error: UNAUTHENTICATED: "
    "Hostname Verification Check failed."
)
PLAINTEXT = (
    LAST + "UNKNOWN: ipv4:127.0.0.1:41193: Tls handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: "
    "error:100000f7:SSL routines:OPENSSL_internal:WRONG_VERSION_NUMBER: Invalid certificate verification context: OK"
)
CLOSED = LAST + "UNAVAILABLE: ipv4:127.0.0.1:33609: Socket closed"
REFUSED = LAST + "UNKNOWN: ipv4:127.0.0.1:1: Failed to connect to remote host: Connection refused"
TLS = TlsConfig(ca=b"-----BEGIN CERTIFICATE-----")


def test_a_certificate_from_another_ca_is_named_with_the_flag() -> None:
    said = tls_failure.explain(VERIFY, "h:1", TLS)
    assert said == (
        "TLS with the server at h:1 failed (gRPC: Tls handshake failed: CERTIFICATE_VERIFY_FAILED: unable to get "
        "local issuer certificate): its certificate is not signed by the CA in --tls-ca; give --tls-ca the CA "
        "that signed its --tls-cert"
    )
    assert "system's root CAs" in (tls_failure.explain(VERIFY, "h:1", TlsConfig()) or "")


def test_a_name_the_certificate_does_not_hold_is_named() -> None:
    assert "does not name 'srv.example'" in (tls_failure.explain(NAME, "srv.example:50051", TLS) or "")
    other = TlsConfig(ca=b"-----BEGIN CERTIFICATE-----", server_name="other")
    assert "does not name 'other'; check --target, or give --tls-server-name" in (
        tls_failure.explain(NAME, "srv.example:50051", other) or ""
    )


def test_a_plaintext_server_is_named() -> None:
    said = tls_failure.explain(PLAINTEXT, "h:1", TLS) or ""
    assert "(gRPC: Tls handshake failed: WRONG_VERSION_NUMBER)" in said and "the server speaks plaintext" in said


@pytest.mark.parametrize("details", [CLOSED, REFUSED, "", "DNS resolution failed for nowhere:1"])
def test_what_names_no_tls_failure_is_not_one(details: str) -> None:
    assert tls_failure.explain(details, "h:1", TLS) is None
    assert tls_failure.explain(VERIFY, "h:1", None) is None  # a plaintext client: gRPC did no TLS


def test_only_a_closed_connection_is_probed() -> None:
    assert tls_failure.worth_probing(CLOSED)
    assert not tls_failure.worth_probing(REFUSED)


@pytest.mark.parametrize(
    ("target", "address"),
    [
        ("localhost:50051", ("localhost", 50051)),
        ("dns:///srv.example:443", ("srv.example", 443)),
        ("[::1]:50051", ("::1", 50051)),
        ("ipv4:127.0.0.1:9", ("127.0.0.1", 9)),
        ("unix:/tmp/socket", None),
        ("srv.example", None),
    ],
)
def test_the_probe_s_address(target: str, address: tuple[str, int] | None) -> None:
    assert tls_failure._address(target) == address


def test_a_probe_that_finds_no_server_finds_nothing() -> None:
    assert tls_failure.probe(CLOSED, "127.0.0.1:1", TLS, lambda: False, budget=1.0) is None
