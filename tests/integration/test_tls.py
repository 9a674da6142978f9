"""TLS for the gRPC servers is a setting: with a certificate (here self-signed, made by
openssl for the test) the gateway serves TLS only; with a client CA it also requires
client certificates (mutual TLS)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conveyor.client import ConveyorClient, Unavailable
from conveyor.v1 import jobs_pb2
from tests.conftest import eventually
from tests.stack import Stack

pytestmark = pytest.mark.integration

MODEL = "claude-sonnet-4-5"
HEALTHCHECK = Path(__file__).resolve().parents[2] / "deploy" / "healthcheck.py"


def _healthcheck(address: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run the image's health check script against `address` with only `env`'s TLS settings."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_TLS_")}
    return subprocess.run(
        [sys.executable, str(HEALTHCHECK), "grpc", address],
        env={**environ, **env},
        capture_output=True,
        text=True,
        timeout=30,
    )


@dataclass(frozen=True)
class Pki:
    server_cert: Path
    server_key: Path
    ca_cert: Path
    client_cert: Path
    client_key: Path


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A self-signed server certificate for 127.0.0.1, and a CA with one client certificate."""
    d = tmp_path_factory.mktemp("tls")
    server_cert, server_key = d / "server.pem", d / "server.key"
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        "-keyout", str(server_key), "-out", str(server_cert), "-subj", "/CN=localhost",
        "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
    )  # fmt: skip
    ca_cert, ca_key = d / "ca.pem", d / "ca.key"
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        "-keyout", str(ca_key), "-out", str(ca_cert), "-subj", "/CN=conveyor test CA",
    )  # fmt: skip
    client_key, client_csr, client_cert = d / "client.key", d / "client.csr", d / "client.pem"
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(client_key),
        "-out", str(client_csr), "-subj", "/CN=conveyor test client",
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", str(client_csr), "-CA", str(ca_cert), "-CAkey", str(ca_key),
        "-CAcreateserial", "-days", "1", "-out", str(client_cert),
    )  # fmt: skip
    return Pki(server_cert, server_key, ca_cert, client_cert, client_key)


@pytest.fixture
def tls_gateway(stack: Stack, pki: Pki) -> Iterator[Stack]:
    stack.stop("gateway")
    try:
        stack.start(
            "gateway",
            CONVEYOR_TLS_CERT_FILE=str(pki.server_cert),
            CONVEYOR_TLS_KEY_FILE=str(pki.server_key),
        )
        yield stack
    finally:
        stack.stop("gateway")
        stack.start("gateway")


async def test_the_gateway_serves_tls_with_a_self_signed_certificate(
    tls_gateway: Stack, pki: Pki, api_key: str
) -> None:
    stack = tls_gateway
    async with ConveyorClient(
        stack.gateway,
        stack.notifier,
        api_key=api_key,
        secure=True,
        root_certificates=pki.server_cert.read_bytes(),
    ) as secure:
        job = await secure.submit(MODEL, "over TLS", max_tokens=8)
        assert job.tenant == "default"

        async def succeeded() -> bool:
            return (await secure.get(job.id)).status == jobs_pb2.JOB_STATUS_SUCCEEDED

        await eventually(succeeded)
        assert (await secure.get(job.id)).result_text

    async with ConveyorClient(stack.gateway, api_key=api_key, rpc_timeout=5) as plain:
        with pytest.raises(Unavailable):
            await plain.get(job.id)
    untrusted = pki.ca_cert.read_bytes()  # a CA that did not sign the server's certificate
    async with ConveyorClient(
        stack.gateway, api_key=api_key, secure=True, root_certificates=untrusted, rpc_timeout=5
    ) as wrong:
        with pytest.raises(Unavailable):
            await wrong.get(job.id)


def test_the_health_check_script_checks_a_gateway_serving_tls(tls_gateway: Stack, pki: Pki) -> None:
    server = {
        "CONVEYOR_TLS_CERT_FILE": str(pki.server_cert),
        "CONVEYOR_TLS_KEY_FILE": str(pki.server_key),
    }
    healthy = _healthcheck(tls_gateway.gateway, **server)
    assert healthy.returncode == 0, healthy.stderr
    named = _healthcheck(tls_gateway.gateway, **server, CONVEYOR_TLS_SERVER_NAME="localhost")
    assert named.returncode == 0, named.stderr
    untrusted = _healthcheck(
        tls_gateway.gateway, **server, CONVEYOR_TLS_ROOT_CERTS=str(pki.ca_cert)
    )
    assert untrusted.returncode == 1, "a certificate the check does not trust is unhealthy"
    assert _healthcheck(tls_gateway.gateway).returncode == 1, "plaintext to a TLS port"


async def test_with_a_client_ca_the_gateway_requires_a_client_certificate(
    stack: Stack, pki: Pki, api_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The readiness check of the restarted gateway presents this client certificate.
    monkeypatch.setenv("CONVEYOR_TLS_CLIENT_CERT_FILE", str(pki.client_cert))
    monkeypatch.setenv("CONVEYOR_TLS_CLIENT_KEY_FILE", str(pki.client_key))
    stack.stop("gateway")
    try:
        stack.start(
            "gateway",
            CONVEYOR_TLS_CERT_FILE=str(pki.server_cert),
            CONVEYOR_TLS_KEY_FILE=str(pki.server_key),
            CONVEYOR_TLS_CLIENT_CA_FILE=str(pki.ca_cert),
        )
        roots = pki.server_cert.read_bytes()
        async with ConveyorClient(
            stack.gateway,
            api_key=api_key,
            secure=True,
            root_certificates=roots,
            client_certificate=(pki.client_cert.read_bytes(), pki.client_key.read_bytes()),
        ) as with_cert:
            stats = await with_cert.stats()
            assert stats.tenant == "default"
        server = {
            "CONVEYOR_TLS_CERT_FILE": str(pki.server_cert),
            "CONVEYOR_TLS_KEY_FILE": str(pki.server_key),
        }
        client_cert = {
            "CONVEYOR_TLS_CLIENT_CERT_FILE": str(pki.client_cert),
            "CONVEYOR_TLS_CLIENT_KEY_FILE": str(pki.client_key),
        }
        checked = _healthcheck(stack.gateway, **server, **client_cert)
        assert checked.returncode == 0, checked.stderr
        assert _healthcheck(stack.gateway, **server).returncode == 1, "no client certificate"
        monkeypatch.delenv("CONVEYOR_TLS_CLIENT_CERT_FILE")
        monkeypatch.delenv("CONVEYOR_TLS_CLIENT_KEY_FILE")
        async with ConveyorClient(
            stack.gateway, api_key=api_key, secure=True, root_certificates=roots, rpc_timeout=5
        ) as without_cert:
            with pytest.raises(Unavailable):
                await without_cert.stats()
    finally:
        stack.stop("gateway")
        stack.start("gateway")
