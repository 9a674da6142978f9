"""Whether a started service is ready: `GET /healthz`, the gRPC health check, or a
"ready" line in its log."""

from __future__ import annotations

import os
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc

from .processes import RunDir, Started, alive
from .services import Service

READY_TIMEOUT_S = 30.0


LOG_READY_MIN_AGE_S = 2.0
"""A service checked by its log must also have stayed alive this long."""
POLL_S = 0.2


READY_LINE = re.compile(rb"\bready\b", re.IGNORECASE)


def http_ok(address: str, path: str = "/healthz") -> bool:
    try:
        with urllib.request.urlopen(f"http://{address}{path}", timeout=1.0) as resp:
            return bool(resp.status == 200)
    except (OSError, urllib.error.URLError, ValueError):
        return False


def _channel(address: str, tls_cert: Path | None) -> grpc.Channel:
    if tls_cert is None:
        return grpc.insecure_channel(address)
    roots = os.environ.get("CONVEYOR_TLS_ROOT_CERTS")
    cert, key = (
        os.environ.get("CONVEYOR_TLS_CLIENT_CERT_FILE"),
        os.environ.get("CONVEYOR_TLS_CLIENT_KEY_FILE"),
    )
    credentials = grpc.ssl_channel_credentials(
        root_certificates=Path(roots or tls_cert).read_bytes(),
        private_key=Path(key).read_bytes() if cert and key else None,
        certificate_chain=Path(cert).read_bytes() if cert and key else None,
    )
    return grpc.secure_channel(address, credentials)


def grpc_serving(address: str, tls_cert: Path | None = None) -> bool:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        with _channel(address, tls_cert) as channel:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=1.0
            )
    except grpc.RpcError:
        return False
    return bool(response.status == health_pb2.HealthCheckResponse.SERVING)


def endpoint_ready(service: Service) -> bool:
    """For services with an address: whether something there answers healthy."""
    if service.check == "http":
        return http_ok(service.address)
    if service.check == "grpc":
        return grpc_serving(service.address, service.tls_cert)
    return False


def log_says_ready(path: Path, offset: int) -> bool:
    try:
        with path.open("rb") as f:
            f.seek(offset)
            return READY_LINE.search(f.read()) is not None
    except OSError:
        return False


def wait_ready(
    service: Service,
    run: RunDir,
    deadline: float,
    started: Started | None,
    pid: int,
) -> str | None:
    """Poll until the service is ready; None when it is, else why not."""
    while True:
        if started is not None:
            code = started.proc.poll()
            if code is not None:
                return f"exited with status {code}"
        elif not alive(pid):
            return "exited"
        if service.check == "log":
            if started is None:
                return None  # it was running before: alive is all we can ask
            old_enough = time.monotonic() - started.started_at >= LOG_READY_MIN_AGE_S
            if old_enough and log_says_ready(run.log_file(service), started.log_offset):
                return None
        elif endpoint_ready(service):
            return None
        if time.monotonic() >= deadline:
            return "not ready in time"
        time.sleep(POLL_S)
