"""Health checks of the Conveyor image: `python /opt/conveyor/healthcheck.py KIND [TARGET]`.

One image runs every service, so one script checks each the way it can be checked:

- `grpc HOST:PORT`: the gRPC health service answers SERVING (gateway, notifier);
  over TLS when the service serves TLS (`CONVEYOR_TLS_CERT_FILE` is set), trusting
  `CONVEYOR_TLS_ROOT_CERTS` or else that certificate itself, presenting
  `CONVEYOR_TLS_CLIENT_CERT_FILE` / `_KEY_FILE` when set (mutual TLS), and checking
  the certificate against `CONVEYOR_TLS_SERVER_NAME` when set (a certificate issued
  for a DNS name, checked at 127.0.0.1);
- `http URL`: the URL answers 200 (simulator, `http://127.0.0.1:8765/healthz`);
- `amqp`: this container holds an established TCP connection to the broker's port,
  taken from `CONVEYOR_AMQP_URL` (worker, dispatcher: they serve no endpoint, and
  their broker connection is what they cannot work without).

Exit status 0 when healthy, 1 when not, 2 on a usage error. Only the standard
library and grpcio (a dependency of the image) are used; nothing is written.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

TIMEOUT_S = 3.0
DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
TCP_TABLES = (Path("/proc/net/tcp"), Path("/proc/net/tcp6"))
TCP_ESTABLISHED = "01"
"""The `st` column of /proc/net/tcp for an established connection."""

USAGE = "usage: healthcheck.py grpc HOST:PORT | http URL | amqp"


def _channel(address: str, environ: Mapping[str, str]) -> Any:
    """A channel to `address`: TLS when the environment names a server certificate."""
    import grpc

    cert_file = environ.get("CONVEYOR_TLS_CERT_FILE")
    if not cert_file:
        return grpc.insecure_channel(address)
    roots = environ.get("CONVEYOR_TLS_ROOT_CERTS") or cert_file
    client_cert = environ.get("CONVEYOR_TLS_CLIENT_CERT_FILE")
    client_key = environ.get("CONVEYOR_TLS_CLIENT_KEY_FILE")
    mutual = bool(client_cert and client_key)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=Path(roots).read_bytes(),
        private_key=Path(client_key).read_bytes() if mutual and client_key else None,
        certificate_chain=Path(client_cert).read_bytes() if mutual and client_cert else None,
    )
    server_name = environ.get("CONVEYOR_TLS_SERVER_NAME")
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    return grpc.secure_channel(address, credentials, options=options)


def grpc_serving(
    address: str, timeout_s: float = TIMEOUT_S, environ: Mapping[str, str] | None = None
) -> bool:
    """Whether the gRPC health service at `address` reports the server SERVING."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        with _channel(address, os.environ if environ is None else environ) as channel:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout_s
            )
    except (grpc.RpcError, OSError):  # OSError: a certificate file that cannot be read
        return False
    return bool(response.status == health_pb2.HealthCheckResponse.SERVING)


def http_ok(url: str, timeout_s: float = TIMEOUT_S) -> bool:
    """Whether GET `url` answers 200."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return bool(response.status == 200)
    except (OSError, urllib.error.URLError, ValueError):
        return False


def amqp_port(url: str) -> int:
    """The broker port of an AMQP URL (5672, or 5671 for amqps, when it names none)."""
    parts = urlsplit(url)
    if parts.port is not None:
        return parts.port
    return 5671 if parts.scheme == "amqps" else 5672


def established_to(port: int, tables: Iterable[str]) -> bool:
    """Whether a /proc/net/tcp-style table lists an established connection to `port`.

    Each row is `sl local_address rem_address st ...`, addresses as `HEXIP:HEXPORT`.
    """
    for table in tables:
        for row in table.splitlines()[1:]:
            fields = row.split()
            if len(fields) < 4:
                continue
            remote_port = int(fields[2].rpartition(":")[2], 16)
            if remote_port == port and fields[3] == TCP_ESTABLISHED:
                return True
    return False


def broker_connected(environ: dict[str, str] | None = None) -> bool:
    """Whether this container (its network namespace) is connected to the broker."""
    env = dict(os.environ) if environ is None else environ
    port = amqp_port(env.get("CONVEYOR_AMQP_URL") or DEFAULT_AMQP_URL)
    tables = [path.read_text() for path in TCP_TABLES if path.exists()]
    return established_to(port, tables)


def main(argv: Sequence[str]) -> int:
    match list(argv):
        case ["grpc", address]:
            healthy = grpc_serving(address)
        case ["http", url]:
            healthy = http_ok(url)
        case ["amqp"]:
            healthy = broker_connected()
        case _:
            print(USAGE, file=sys.stderr)
            return 2
    if not healthy:
        print(f"unhealthy: {' '.join(argv)}", file=sys.stderr)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
