"""Service logs: known harmless noise of the libraries stays out of them."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Iterator

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from conveyor.core.logs import setup_logging
from tests.conftest import logged_errors


@pytest.fixture
def service_logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Logging set up as in a service process; `caplog` still sees what it logs."""
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    otel = logging.getLogger("opentelemetry.context")
    saved_filters = otel.filters[:]
    setup_logging("test", json=True)  # replaces the root's handlers, caplog's among them
    root.addHandler(caplog.handler)
    yield caplog
    root.handlers[:], root.level = saved_handlers, saved_level
    otel.filters[:] = saved_filters


async def test_a_streaming_span_closed_from_another_context_ends_without_an_error_line(
    service_logs: pytest.LogCaptureFixture,
) -> None:
    exported = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exported))
    tracer = provider.get_tracer("test")

    # As the gRPC instrumentation wraps a server stream whose client went away: the
    # span's context is entered in the call's context, the generator closed in another.
    async def stream() -> AsyncGenerator[int, None]:
        with tracer.start_as_current_span("WatchJob"):
            yield 1
            yield 2

    gen = stream()
    assert await anext(gen) == 1
    await asyncio.create_task(gen.aclose())  # a task runs in a copy of the context

    assert [s.name for s in exported.get_finished_spans()] == ["WatchJob"], "the span ended"
    assert logged_errors(service_logs) == []


def test_other_errors_of_opentelemetry_context_are_still_logged(
    service_logs: pytest.LogCaptureFixture,
) -> None:
    try:
        raise ValueError("something else")
    except ValueError:
        logging.getLogger("opentelemetry.context").exception("Failed to detach context")
    assert logged_errors(service_logs) == ["Failed to detach context"]
