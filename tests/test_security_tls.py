"""TLS, mutual TLS and the bearer token, end to end: `split-server` with mutual TLS and a token runs as a real
process; the other servers (TLS alone, plaintext, one that starts late) are built from split-server's flags in this
process; clients connect.

The certificates are made by the test itself (tests/security_support.py), never committed.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client_part import RemoteError, SplitClient
from client_part.stopping import Stopped
from client_part.transport import Transport
from server_part import cli as server_cli
from splitlearning import data
from splitlearning.contract import Spec
from splitlearning.models import load_part, make_optimizer
from splitlearning.security import TlsConfig
from tests.security_support import Pki, ServerProcess, make_pki, run_client, start_server, write_token

pytestmark = pytest.mark.processes  # split-server processes, started per module or per test

TOKEN = "s3cr3t-T0KEN-for-tests-7f1d2a"
WRONG_TOKEN = "wr0ng-T0KEN-offered-by-client-99"
DIGITS_IV = Spec((64,), np.dtype("float32"))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_token(tmp_path_factory.mktemp("token") / "token", TOKEN)


@pytest.fixture(scope="module")
def mtls_server(pki: Pki, token_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Mutual TLS and a bearer token, logging at DEBUG (so a leak into any log line would show)."""
    server = start_server(
        tmp_path_factory.mktemp("mtls"),
        *("--model", "digits-mlp", "--log-level", "DEBUG"),
        *("--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key), "--tls-ca", str(pki.ca.cert)),
        *("--auth-token-file", str(token_file)),
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def digits() -> data.Dataset:
    return data.digits()


def good_tls(pki: Pki) -> TlsConfig:
    return TlsConfig.from_files(pki.client.cert, pki.client.key, pki.ca.cert)


def handshake(target: str, tls: TlsConfig | None, token: str | None) -> None:
    """One handshake on a fresh channel (no waiting for readiness: a refused link fails the call at once)."""
    from splitlearning.security import Secret

    transport = Transport(target, 1 << 20, rpc_timeout=30, tls=tls, auth_token=Secret(token) if token else None)
    try:
        transport.handshake(DIGITS_IV, None, 32)
    finally:
        transport.close()


def refusal(target: str, tls: TlsConfig | None, token: str | None) -> RemoteError:
    with pytest.raises(RemoteError) as caught:
        handshake(target, tls, token)
    return caught.value


# -- mutual TLS ------------------------------------------------------------------------------------------------


def test_mtls_client_with_certificate_and_token_is_served(
    mtls_server: ServerProcess, pki: Pki, digits: data.Dataset
) -> None:
    bottom = load_part("digits-mlp", "client", 0)
    optimizer = make_optimizer("adam", 3e-3)  # the server's, as split-server's defaults make it
    with SplitClient(
        bottom, optimizer, target=mtls_server.target, tls=good_tls(pki), auth_token=TOKEN, connect_timeout=30
    ) as client:
        assert client.agreement.contract.iv == DIGITS_IV
        result = client.evaluate(digits.x_test[:64], digits.y_test[:64], batch_size=32)
        outputs = client.predict(digits.x_test[:8], batch_size=8)
    assert np.isfinite(result["loss"]) and 0.0 <= result["accuracy"] <= 1.0
    assert outputs.shape == (8, 10)


def test_mtls_refuses_a_client_without_a_certificate(mtls_server: ServerProcess, pki: Pki) -> None:
    error = refusal(mtls_server.target, TlsConfig.from_files(ca=pki.ca.cert), TOKEN)
    assert error.code == grpc.StatusCode.UNAVAILABLE


def test_mtls_refuses_a_certificate_from_another_ca(mtls_server: ServerProcess, pki: Pki) -> None:
    rogue = TlsConfig.from_files(pki.rogue_client.cert, pki.rogue_client.key, pki.ca.cert)
    error = refusal(mtls_server.target, rogue, TOKEN)
    assert error.code == grpc.StatusCode.UNAVAILABLE


def test_mtls_refuses_plaintext(mtls_server: ServerProcess) -> None:
    assert refusal(mtls_server.target, None, TOKEN).code == grpc.StatusCode.UNAVAILABLE


def test_client_refuses_a_server_its_ca_did_not_sign(mtls_server: ServerProcess, pki: Pki) -> None:
    trusting_rogue = TlsConfig.from_files(pki.client.cert, pki.client.key, pki.rogue_ca.cert)
    assert refusal(mtls_server.target, trusting_rogue, TOKEN).code == grpc.StatusCode.UNAVAILABLE


# -- the bearer token ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "token", [None, WRONG_TOKEN, TOKEN + "x", TOKEN[:-1]], ids=["missing", "wrong", "long", "short"]
)
def test_a_missing_or_wrong_token_is_unauthenticated(mtls_server: ServerProcess, pki: Pki, token: str | None) -> None:
    error = refusal(mtls_server.target, good_tls(pki), token)
    assert error.code == grpc.StatusCode.UNAUTHENTICATED
    assert "token" in error.details


def test_the_training_stream_and_every_rpc_need_the_token(mtls_server: ServerProcess, pki: Pki) -> None:
    from splitlearning.security import Secret

    transport = Transport(
        mtls_server.target, 1 << 20, rpc_timeout=30, tls=good_tls(pki), auth_token=Secret(WRONG_TOKEN)
    )
    iv = np.zeros((2, 64), "float32")
    labels = np.zeros((2,), "int64")
    try:
        for call in (
            lambda: transport.train(0, iv, labels, True),
            lambda: transport.evaluate(iv, labels, True),
            lambda: transport.predict(iv),
        ):
            with pytest.raises(RemoteError) as caught:
                call()
            assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
    finally:
        transport.close()


def test_health_checks_need_no_token(mtls_server: ServerProcess, pki: Pki) -> None:
    channel = grpc.secure_channel(mtls_server.target, good_tls(pki).channel_credentials())
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=30)
    finally:
        channel.close()
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_the_health_probe_speaks_mutual_tls(mtls_server: ServerProcess, pki: Pki) -> None:
    from splitlearning import health_probe

    tls_flags = ["--tls-ca", str(pki.ca.cert), "--tls-cert", str(pki.client.cert), "--tls-key", str(pki.client.key)]
    assert health_probe.main(["--target", mtls_server.target, "--timeout", "30", *tls_flags]) == 0
    assert health_probe.main(["--target", mtls_server.target, "--timeout", "30"]) == 1  # plaintext: refused


def test_the_token_never_appears_in_logs_or_errors(mtls_server: ServerProcess, pki: Pki) -> None:
    details = [refusal(mtls_server.target, good_tls(pki), t).details for t in (WRONG_TOKEN, TOKEN + "x", None)]
    handshake(mtls_server.target, good_tls(pki), TOKEN)  # a served call, logged at DEBUG too
    log = mtls_server.log_text()
    assert "refused" in log and "bearer token" in log  # the refusals were logged ...
    for secret in (TOKEN, WRONG_TOKEN):  # ... without the expected token or the one offered
        assert secret not in log
        for detail in details:
            assert secret not in detail


def test_the_client_cli_trains_over_mtls_with_a_token(
    mtls_server: ServerProcess, pki: Pki, token_file: Path, tmp_path: Path
) -> None:
    history = tmp_path / "history.json"
    result = run_client(
        mtls_server.target,
        *("--epochs", "1", "--batch-size", "128", "--log-level", "DEBUG", "--history-json", str(history)),
        *("--tls-ca", str(pki.ca.cert), "--tls-cert", str(pki.client.cert), "--tls-key", str(pki.client.key)),
        *("--auth-token-file", str(token_file)),
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert history.exists()
    assert TOKEN not in output
    assert TOKEN not in mtls_server.log_text()


# -- TLS without client certificates ---------------------------------------------------------------------------


def test_tls_server_trains_a_client_that_checks_it(
    pki: Pki, digits: data.Dataset, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    flags = ["--model", "digits-mlp", "--optimizer", "sgd", "--learning-rate", "0.01"]
    server = server_cli.build(
        server_cli.parse_args([*flags, "--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key)])
    )
    target = f"127.0.0.1:{server.start('127.0.0.1:0')}"
    try:
        assert refusal(target, None, None).code == grpc.StatusCode.UNAVAILABLE  # plaintext is refused
        bottom = load_part("digits-mlp", "client", 0)
        tls = TlsConfig.from_files(ca=pki.ca.cert)  # no client certificate: this server does not ask for one
        with SplitClient(bottom, "sgd", target=target, tls=tls, connect_timeout=30) as client:
            before = [np.array(w) for w in client.model.get_weights()]
            client.fit(digits.x_train[:64], digits.y_train[:64], batch_size=32, epochs=1, verbose=0)
            assert client.step == 2
            assert not np.allclose(before[0], client.model.get_weights()[0])
        server_log = [r.getMessage() for r in caplog.records if r.name.startswith("server_part")]
        assert any("TLS" in line for line in server_log), server_log
    finally:
        server.stop(grace=1.0)


# -- a TLS failure ends the wait for the server at once (issue 19) ----------------------------------------------

# Far below the connect timeout the clients are given (120 s): the failure was named, not waited out.
TLS_FAILURE_BOUND = 10.0


@pytest.fixture(scope="module")
def plaintext_server() -> Iterator[str]:
    """A plaintext split-server of these flags, in this process (what the client meets is its first bytes); its
    address."""
    server = server_cli.build(server_cli.parse_args(["--model", "digits-mlp"]))
    port = server.start("127.0.0.1:0")
    yield f"127.0.0.1:{port}"
    server.stop(grace=1.0)


def connect_failure(target: str, tls: TlsConfig | None, timeout: float = 120) -> tuple[str, float]:
    """The error of a client that waits up to `timeout` s for the server at `target`, and how long it took."""
    transport = Transport(target, 1 << 20, rpc_timeout=30, tls=tls)
    started = time.monotonic()
    try:
        with pytest.raises(ConnectionError) as caught:
            transport.wait_ready(timeout)
    finally:
        transport.close()
    return str(caught.value), time.monotonic() - started


@pytest.mark.parametrize(
    ("case", "words"),
    [
        ("client trusts another CA", ["CERTIFICATE_VERIFY_FAILED", "not signed by the CA in --tls-ca"]),
        ("another server name", ["Hostname Verification", "does not name 'elsewhere.example'", "--tls-server-name"]),
        ("no client certificate", ["Socket closed", "requires a client certificate", "give --tls-cert and --tls-key"]),
        ("client certificate from another CA", ["Socket closed", "requires a client certificate", "--tls-cert was"]),
        ("plaintext client", ["Socket closed", "speaks TLS and this client plaintext", "give --tls-ca"]),
    ],
)
def test_a_tls_mismatch_is_named_at_once(mtls_server: ServerProcess, pki: Pki, case: str, words: list[str]) -> None:
    tls = {
        "client trusts another CA": TlsConfig.from_files(pki.client.cert, pki.client.key, pki.rogue_ca.cert),
        "another server name": TlsConfig.from_files(
            pki.client.cert, pki.client.key, pki.ca.cert, server_name="elsewhere.example"
        ),
        "no client certificate": TlsConfig.from_files(ca=pki.ca.cert),
        "client certificate from another CA": TlsConfig.from_files(
            pki.rogue_client.cert, pki.rogue_client.key, pki.ca.cert
        ),
        "plaintext client": None,
    }[case]
    message, seconds = connect_failure(mtls_server.target, tls)
    assert seconds < TLS_FAILURE_BOUND, (seconds, message)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_a_tls_client_at_a_plaintext_server_is_told_at_once(plaintext_server: str, pki: Pki) -> None:
    message, seconds = connect_failure(plaintext_server, TlsConfig.from_files(ca=pki.ca.cert))
    assert seconds < TLS_FAILURE_BOUND, (seconds, message)
    assert "WRONG_VERSION_NUMBER" in message and "the server speaks plaintext" in message


def test_the_client_cli_names_a_tls_failure_in_one_line(mtls_server: ServerProcess, pki: Pki) -> None:
    result = run_client(mtls_server.target, "--connect-timeout", "120", "--tls-ca", str(pki.rogue_ca.cert))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    [line] = [line for line in result.stderr.splitlines() if " ERROR split-client: " in line]
    assert "CERTIFICATE_VERIFY_FAILED" in line and "give --tls-ca the CA that signed its --tls-cert" in line
    # gRPC's own log line of the failed handshake (its C core's) is left to --log-level DEBUG.
    assert "Handshake failed" not in result.stderr, result.stderr


def test_a_tls_client_waits_for_a_server_that_starts_later(pki: Pki) -> None:
    target = unused_target()
    server = server_cli.build(server_cli.parse_args([*server_tls_flags(pki), "--model", "digits-mlp"]))

    def start() -> None:
        time.sleep(1.0)  # meanwhile every connection attempt is refused (gRPC's backoff from 0.2 s: several)
        server.start(target)

    starter = threading.Thread(target=start)
    starter.start()
    try:
        handshake_after_wait(target, good_tls(pki), connect_timeout=120)
    finally:
        starter.join()
        server.stop(grace=1.0)


def test_a_tls_client_waits_out_the_connect_timeout_for_an_absent_server(pki: Pki) -> None:
    # 1.5 s: several refused connection attempts (gRPC's backoff from 0.2 s) and looks at the cause (every 0.5 s)
    message, seconds = connect_failure(unused_target(), good_tls(pki), 1.5)
    assert seconds >= 1.5
    assert "no server answered at 127.0.0.1:" in message and "within 1.5 s" in message


def test_a_stop_ends_a_tls_client_s_wait_within_a_second(pki: Pki) -> None:
    transport = Transport(unused_target(), 1 << 20, rpc_timeout=30, tls=good_tls(pki))
    asked: list[float] = []
    threading.Timer(1.5, lambda: asked.append(time.monotonic())).start()
    try:
        with pytest.raises(Stopped, match="waiting for the server"):
            transport.wait_ready(120, lambda: bool(asked))
        stopped = time.monotonic()
    finally:
        transport.close()
    assert stopped - asked[0] < 1.0


def unused_target() -> str:
    """A loopback address where nothing listens (connections are refused)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"


def server_tls_flags(pki: Pki) -> list[str]:
    return ["--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key), "--tls-ca", str(pki.ca.cert)]


def handshake_after_wait(target: str, tls: TlsConfig, connect_timeout: float) -> None:
    transport = Transport(target, 1 << 20, rpc_timeout=30, tls=tls)
    try:
        transport.wait_ready(connect_timeout)
        transport.handshake(DIGITS_IV, None, 32)
    finally:
        transport.close()
