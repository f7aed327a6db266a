"""Safe defaults: loopback unless told otherwise, a loud warning for plaintext on the network, no secret shown."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from client_part.cli import parse_args as client_args
from server_part import SplitServer
from server_part.cli import parse_args as server_args
from splitlearning.security import TlsConfig, is_loopback, read_token
from tests.conftest import build_top, make_loss
from tests.security_support import make_pki, write_token

TOKEN = "Zq8-very-private-token-31337"


def test_the_server_binds_loopback_by_default() -> None:
    assert server_args([]).address.startswith("127.0.0.1:")
    assert SplitServer.start.__defaults__ == ("127.0.0.1:0",)


@pytest.mark.parametrize(
    ("address", "loopback"),
    [
        ("127.0.0.1:50051", True),
        ("127.0.0.2:1", True),
        ("localhost:50051", True),
        ("[::1]:50051", True),
        ("unix:/tmp/split.sock", True),
        ("0.0.0.0:50051", False),
        ("[::]:50051", False),
        ("10.0.0.5:50051", False),
        ("example.org:443", False),
    ],
)
def test_what_counts_as_loopback(address: str, loopback: bool) -> None:
    assert is_loopback(address) is loopback


def _start_and_stop(address: str, tls: TlsConfig | None, caplog: pytest.LogCaptureFixture) -> list[str]:
    server = SplitServer(build_top(), make_loss(), "sgd", auth_token=TOKEN, tls=tls)
    with caplog.at_level(logging.INFO, logger="server_part"):
        server.start(address)
        server.stop(grace=0)
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_plaintext_on_a_network_address_warns_loudly(caplog: pytest.LogCaptureFixture) -> None:
    warnings = _start_and_stop("0.0.0.0:0", None, caplog)
    assert any("INSECURE" in w and "without TLS" in w and "token" in w for w in warnings), warnings
    assert all(TOKEN not in r.getMessage() for r in caplog.records)


def test_plaintext_on_loopback_does_not_warn(caplog: pytest.LogCaptureFixture) -> None:
    assert not any("INSECURE" in w for w in _start_and_stop("127.0.0.1:0", None, caplog))


def test_tls_on_a_network_address_does_not_warn(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    tls = TlsConfig.from_files(pki.server.cert, pki.server.key)
    assert not any("INSECURE" in w for w in _start_and_stop("0.0.0.0:0", tls, caplog))


def test_the_token_file_is_read_and_never_shown(tmp_path: Path) -> None:
    secret = read_token(write_token(tmp_path / "token", TOKEN))
    assert secret.reveal() == TOKEN
    for shown in (repr(secret), str(secret), f"{secret}", repr([secret])):
        assert TOKEN not in shown


@pytest.mark.parametrize("content", ["", "   \n", f"{TOKEN} {TOKEN}", f"{TOKEN}\x01"])
def test_a_bad_token_file_is_refused_without_showing_it(tmp_path: Path, content: str) -> None:
    path = tmp_path / "token"
    path.write_text(content)
    with pytest.raises(ValueError, match="--auth-token-file") as caught:
        read_token(path)
    assert TOKEN not in str(caught.value)


def test_a_missing_token_file_names_the_file() -> None:
    with pytest.raises(ValueError, match="cannot read"):
        read_token("/nonexistent/token")


def test_tls_material_and_configs_hide_their_secrets(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    tls = TlsConfig.from_files(pki.client.cert, pki.client.key, pki.ca.cert)
    assert b"PRIVATE KEY" in (tls.key or b"")
    assert "PRIVATE" not in repr(tls)
    token_file = write_token(tmp_path / "token", TOKEN)
    for config in (
        server_args(["--auth-token-file", str(token_file)]),
        client_args(["--auth-token-file", str(token_file), "--tls-ca", str(pki.ca.cert)]),
    ):
        assert TOKEN not in repr(config)


def test_a_certificate_needs_its_key(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    with pytest.raises(ValueError, match="--tls-key"):
        TlsConfig.from_files(cert=pki.server.cert)
    with pytest.raises(ValueError, match="not a PEM"):
        TlsConfig.from_files(ca=write_token(tmp_path / "junk", "not a certificate"))
