"""Prometheus metrics of every service, served on a per-service port (0 turns it off).

One definition per metric, here, so the names and labels are the same whichever
service records them.
"""

from __future__ import annotations

import logging

from prometheus_client import Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

JOBS_SUBMITTED = Counter("conveyor_jobs_submitted", "Jobs accepted by the gateway.", ["lane"])
JOBS_STARTED = Counter("conveyor_jobs_started", "Attempts started by workers.", ["lane"])
JOBS_FINISHED = Counter(
    "conveyor_jobs_finished",
    "Jobs that reached a terminal status (succeeded, failed, cancelled, dead).",
    ["lane", "status"],
)
JOBS_RETRIED = Counter(
    "conveyor_jobs_retried", "Attempts that failed transiently and were rescheduled.", ["lane"]
)
QUEUE_WAIT = Histogram(
    "conveyor_queue_wait_seconds",
    "From publish to claim by a worker.",
    ["lane"],
    buckets=_LATENCY_BUCKETS,
)
RUN_TIME = Histogram(
    "conveyor_run_seconds",
    "One attempt, claim to outcome written.",
    ["lane", "outcome"],
    buckets=_LATENCY_BUCKETS,
)
TOKENS = Counter("conveyor_tokens", "Tokens reported by the provider.", ["model", "direction"])
IN_FLIGHT = Gauge("conveyor_worker_in_flight", "Jobs this worker is running now.")
QUEUE_DEPTH = Gauge("conveyor_queue_depth", "Messages ready in a RabbitMQ queue.", ["queue"])
WATCHERS = Gauge("conveyor_watchers", "Open WatchJob streams on this notifier.")
RATE_LIMIT_WAIT = Histogram(
    "conveyor_rate_limit_wait_seconds",
    "Time a model call waited for provider budget (calls that waited).",
    ["model"],
    buckets=_LATENCY_BUCKETS,
)
PROVIDER_THROTTLED = Counter(
    "conveyor_provider_throttled", "Calls the provider answered 429 (rate limited).", ["model"]
)
TENANT_DEFERRED = Counter(
    "conveyor_tenant_deferred",
    "Deliveries handed back because their tenant was at its concurrency limit.",
    ["tenant"],
)


def serve_metrics(host: str, port: int) -> int:
    """Expose /metrics on host:port (0 disables); returns the port, or 0 if none.

    A taken port (a second worker on the same host) costs the metrics endpoint,
    not the service.
    """
    if port <= 0:
        return 0
    try:
        start_http_server(port, addr=host)
    except OSError as exc:
        log.warning("metrics endpoint not started", extra={"port": port, "error": repr(exc)})
        return 0
    return port
