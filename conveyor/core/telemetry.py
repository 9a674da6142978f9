"""OpenTelemetry tracing for every service, configured from the standard OTEL_* variables.

- Export: OTLP when `OTEL_EXPORTER_OTLP_ENDPOINT` (or the traces-specific variable)
  is set, over gRPC unless `OTEL_EXPORTER_OTLP_PROTOCOL` says http/protobuf;
  `OTEL_TRACES_EXPORTER=console` prints spans; otherwise nothing is exported.
- Without an exporter, spans are not recorded (sampler off) but still carry trace
  ids, so every job records one and the context keeps flowing at almost no cost.
- W3C `traceparent` travels in gRPC metadata (instrumented servers) and in AMQP
  message headers (`inject_headers` / `context_from_headers` here).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased, TraceIdRatioBased

TRACER_NAME = "conveyor"
_exporting = False


def _exporter() -> tuple[SpanExporter | None, bool]:
    """The configured exporter, and whether it should be batched."""
    choice = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    if choice == "none":
        return None, False
    if choice == "console":
        return ConsoleSpanExporter(), False
    if choice == "otlp" or (not choice and endpoint):
        protocol = os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc").strip().lower()
        if protocol.startswith("http"):
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            return OTLPSpanExporter(), True
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcExporter,
        )

        return GrpcExporter(), True
    return None, False


def setup_tracing(service: str) -> TracerProvider:
    """Install the process's tracer provider; returns it (shut it down to flush)."""
    global _exporting
    name = os.environ.get("OTEL_SERVICE_NAME") or f"conveyor-{service}"
    exporter, batched = _exporter()
    _exporting = exporter is not None
    ratio = float(os.environ.get("OTEL_TRACES_SAMPLER_ARG", "1.0") or 1.0)
    sampler = ParentBased(TraceIdRatioBased(ratio)) if _exporting else ALWAYS_OFF
    provider = TracerProvider(resource=Resource.create({"service.name": name}), sampler=sampler)
    if exporter is not None:
        provider.add_span_processor(
            BatchSpanProcessor(exporter) if batched else SimpleSpanProcessor(exporter)
        )
    trace.set_tracer_provider(provider)
    return provider


def exporting() -> bool:
    """Whether spans leave this process (instrumentation is only worth its cost then)."""
    return _exporting


@functools.cache
def tracer() -> trace.Tracer:
    # Made once: get_tracer costs a few percent of a busy gateway. One made before
    # setup_tracing is a proxy that follows the provider set later.
    return trace.get_tracer(TRACER_NAME)


def inject_headers(ctx: otel_context.Context | None = None) -> dict[str, str]:
    """W3C trace-context headers for the current (or given) context."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=ctx)
    return carrier


def context_from_headers(headers: Mapping[str, Any] | None) -> otel_context.Context:
    """The context carried by message headers (AMQP values may be bytes)."""
    carrier = {
        str(k): (v.decode() if isinstance(v, bytes) else str(v)) for k, v in (headers or {}).items()
    }
    return propagate.extract(carrier)


def traceparent_context(traceparent: str | None) -> otel_context.Context | None:
    """The context of a stored `traceparent`, or None."""
    return propagate.extract({"traceparent": traceparent}) if traceparent else None


def current_ids() -> tuple[str, str]:
    """(trace id, traceparent) of the current span; empty strings without a valid span."""
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return "", ""
    return format(ctx.trace_id, "032x"), inject_headers().get("traceparent", "")
