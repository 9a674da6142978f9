"""Structured logging: one line per event, JSON when stderr is not a terminal.

Log with `log.info("job claimed", extra={"job_id": ...})`; any extra field becomes
a key of the JSON line, and the current span's trace and span ids are added.
Prompts and results are never logged.
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import Any

import orjson
from opentelemetry import trace

_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        span = trace.get_current_span().get_span_context()
        if span.is_valid:
            line["trace_id"] = format(span.trace_id, "032x")
            line["span_id"] = format(span.span_id, "016x")
        for key, value in record.__dict__.items():
            if key not in _STANDARD:
                line[key] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


class TextFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__("%(asctime)s %(levelname)-5s " + service + " %(message)s%(fields)s")

    def format(self, record: logging.LogRecord) -> str:
        extra = {k: v for k, v in record.__dict__.items() if k not in _STANDARD and k != "fields"}
        record.fields = "".join(f" {k}={v}" for k, v in extra.items())
        return super().format(record)


class _StreamClosedElsewhere(logging.Filter):
    """Drops OpenTelemetry's "Failed to detach context" when a server-streaming call ends
    early (its client went away): gRPC closes the instrumentation's generator from
    another context, so resetting the span's context token fails, after the span has
    ended as it should (open-telemetry/opentelemetry-python-contrib#2357). One error
    line with a traceback per closed WatchJob would bury the real ones."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (
            record.msg == "Failed to detach context"
            and isinstance(exc, ValueError)
            and "different Context" in str(exc)
        )


def setup_logging(service: str, level: str = "INFO", json: bool | None = None) -> None:
    """Configure the root logger for a service process."""
    use_json = (not sys.stderr.isatty()) if json is None else json
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service) if use_json else TextFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("aio_pika", "aiormq", "httpx", "httpx2", "httpcore", "anthropic", "sqlalchemy"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("opentelemetry.context").addFilter(_StreamClosedElsewhere())
