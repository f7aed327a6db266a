"""Test helpers for the security tests: a throw-away CA and certificates, made in a temporary directory.

Nothing here is committed: every run makes fresh keys (EC P-256, fast) with the `cryptography` package.
Also: launching `split-server` as a real process and waiting (bounded) for its port.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from splitlearning import subprocesses

ROOT = Path(__file__).resolve().parent.parent
SERVER_START_TIMEOUT = 60.0
CLIENT_TIMEOUT = 120


@dataclass(frozen=True)
class Issued:
    """A certificate and its key, as PEM files."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class Authority:
    """A CA: its certificate file, and what it needs to sign more."""

    name: str
    cert: Path
    _cert: x509.Certificate
    _key: ec.EllipticCurvePrivateKey
    directory: Path

    def issue(self, common_name: str, server: bool) -> Issued:
        """A leaf certificate signed by this CA; a server one names localhost and 127.0.0.1."""
        key = ec.generate_private_key(ec.SECP256R1())
        builder = _builder(common_name, key).issuer_name(self._cert.subject)
        builder = builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if server:
            names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        stem = self.directory / f"{self.name}-{common_name}"
        return Issued(_write_cert(stem.with_suffix(".crt"), cert), _write_key(stem.with_suffix(".key"), key))


def make_authority(directory: Path, name: str) -> Authority:
    """A self-signed CA named `name`, written to `directory`."""
    key = ec.generate_private_key(ec.SECP256R1())
    builder = _builder(f"{name} test CA", key).issuer_name(_name(f"{name} test CA"))
    builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
    builder = builder.add_extension(
        x509.KeyUsage(
            digital_signature=True,
            content_commitment=False,
            key_encipherment=False,
            data_encipherment=False,
            key_agreement=False,
            key_cert_sign=True,
            crl_sign=True,
            encipher_only=False,
            decipher_only=False,
        ),
        critical=True,
    )
    cert = builder.sign(key, hashes.SHA256())
    path = _write_cert(directory / f"{name}-ca.crt", cert)
    return Authority(name, path, cert, key, directory)


@dataclass(frozen=True)
class Pki:
    """One trusted CA with a server and a client certificate, and a rogue CA with its own client certificate."""

    ca: Authority
    server: Issued
    client: Issued
    rogue_ca: Authority
    rogue_client: Issued


def make_pki(directory: Path) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    ca, rogue = make_authority(directory, "trusted"), make_authority(directory, "rogue")
    return Pki(
        ca, ca.issue("server", server=True), ca.issue("client", server=False), rogue, rogue.issue("client", False)
    )


def write_token(path: Path, token: str) -> Path:
    path.write_text(token + "\n")
    path.chmod(0o600)
    return path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(common_name: str, key: ec.EllipticCurvePrivateKey) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )


def _write_cert(path: Path, cert: x509.Certificate) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> Path:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    path.write_bytes(pem)
    path.chmod(0o600)
    return path


# -- real processes ----------------------------------------------------------------------------------------------


def environment() -> dict[str, str]:
    """This process's environment, with this worktree first on the import path."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return {**os.environ, "PYTHONPATH": path, "TF_CPP_MIN_LOG_LEVEL": "2"}


@dataclass
class ServerProcess:
    process: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        subprocesses.stop(self.process, timeout=20)


def start_server(directory: Path, *args: str, name: str = "server", address: str = "127.0.0.1:0") -> ServerProcess:
    """`python -m server_part --address ADDRESS ARGS`, its output in a log file; waits for the port."""
    port_file, log = directory / f"{name}.port", directory / f"{name}.log"
    command = [sys.executable, "-m", "server_part", "--address", address, "--port-file", str(port_file), *args]
    with log.open("wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=environment(), cwd=ROOT)
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while not (port_file.exists() and port_file.read_text().strip()):
        if process.poll() is not None:
            raise RuntimeError(f"split-server exited with {process.returncode}:\n{log.read_text()}")
        if time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"split-server did not start within {SERVER_START_TIMEOUT} s:\n{log.read_text()}")
        time.sleep(0.05)
    return ServerProcess(process, int(port_file.read_text()), log)


def run_client(target: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`python -m client_part --target TARGET --model digits-mlp --connect-timeout 30 ARGS`, to the end."""
    command = [sys.executable, "-m", "client_part", "--target", target, "--model", "digits-mlp"]
    return subprocess.run(
        [*command, "--connect-timeout", "30", *args],
        env=environment(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=CLIENT_TIMEOUT,
        check=False,
    )
