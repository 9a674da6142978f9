"""`deploy/healthcheck.py`, the image's health check, tells a healthy service from an
unhealthy one: gRPC health, an HTTP 200, or an established connection to the broker.
"""

from __future__ import annotations

import http.server
import importlib.util
import threading
from collections.abc import Iterator
from concurrent import futures
from types import ModuleType
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tests.unit.deploy_files import DEPLOY


def load_healthcheck() -> ModuleType:
    spec = importlib.util.spec_from_file_location("deploy_healthcheck", DEPLOY / "healthcheck.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def healthcheck() -> ModuleType:
    return load_healthcheck()


@pytest.fixture
def health_server() -> Iterator[tuple[str, health.HealthServicer]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        server.stop(grace=None)


def test_healthcheck_grpc_is_healthy_only_while_serving(
    healthcheck: ModuleType, health_server: tuple[str, health.HealthServicer]
) -> None:
    address, servicer = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert healthcheck.main(["grpc", address]) == 0
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert healthcheck.main(["grpc", address]) == 1


def test_healthcheck_grpc_is_unhealthy_when_nothing_listens(healthcheck: ModuleType) -> None:
    assert not healthcheck.grpc_serving("127.0.0.1:1", timeout_s=1.0)


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
        self.send_response(200 if self.path == "/healthz" else 503)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_healthcheck_http_is_healthy_only_on_200(healthcheck: ModuleType) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        assert healthcheck.main(["http", f"{base}/healthz"]) == 0
        assert healthcheck.main(["http", f"{base}/elsewhere"]) == 1
    finally:
        server.shutdown()
        server.server_close()
    assert healthcheck.main(["http", f"{base}/healthz"]) == 1


TCP_TABLE = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000 10001
   1: 0200A8C0:D431 0300A8C0:1628 01 00000000:00000000 00:00000000 00000000 10001
   2: 0200A8C0:D432 0400A8C0:1538 06 00000000:00000000 00:00000000 00000000 10001
"""


def test_healthcheck_amqp_looks_for_an_established_connection_to_the_broker_port(
    healthcheck: ModuleType,
) -> None:
    assert healthcheck.established_to(5672, [TCP_TABLE])  # 0x1628, state 01
    assert not healthcheck.established_to(5432, [TCP_TABLE])  # 0x1538 is TIME_WAIT (06)
    assert not healthcheck.established_to(8080, [TCP_TABLE])  # 0x1F90 is only listening
    assert healthcheck.amqp_port("amqp://u:p@rabbitmq:5673/") == 5673
    assert healthcheck.amqp_port("amqp://u:p@rabbitmq/") == 5672
    assert healthcheck.amqp_port("amqps://u:p@rabbitmq/") == 5671


def test_healthcheck_refuses_an_unknown_check(healthcheck: ModuleType) -> None:
    assert healthcheck.main([]) == 2
    assert healthcheck.main(["tcp", "127.0.0.1:1"]) == 2
