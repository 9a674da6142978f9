"""A service whose metrics port is taken still runs, without its metrics endpoint."""

from __future__ import annotations

import socket

from conveyor.core.metrics import serve_metrics


def test_a_taken_metrics_port_is_not_fatal() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert serve_metrics("127.0.0.1", port) == 0


def test_port_zero_turns_metrics_off() -> None:
    assert serve_metrics("127.0.0.1", 0) == 0
