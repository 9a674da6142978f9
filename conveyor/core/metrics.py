"""Prometheus metrics of every service, served on a per-service port (0 turns it off).

One definition per metric, here, so the names and labels are the same whichever
service records them.

Model names come from tenants' requests, so they enter labels (and the worker's
rate-limit state) only through `ModelNames`: a known or allowed model keeps its
name, any other is counted as `other`, so a tenant inventing names cannot grow
the number of series or the limiter's memory without bound.
"""

from __future__ import annotations

import fnmatch
import logging
import typing
from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge, Histogram, start_http_server

if TYPE_CHECKING:
    from conveyor.core.config import Settings

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
COST_USD = Counter(
    "conveyor_cost_usd",
    "What finished attempts cost, in US dollars (priced models only; conveyor.core.pricing).",
    ["model", "lane"],
)
IN_FLIGHT = Gauge("conveyor_worker_in_flight", "Jobs this worker is running now.")
QUEUE_DEPTH = Gauge("conveyor_queue_depth", "Messages ready in a RabbitMQ queue.", ["queue"])
WATCHERS = Gauge("conveyor_watchers", "Open WatchJob streams on this notifier.")
HTTP_REQUESTS = Counter(
    "conveyor_http_requests", "Calls of the HTTP API, by route and status.", ["route", "status"]
)
HTTP_STREAMS = Gauge("conveyor_http_streams", "Open Server-Sent Events streams of the HTTP API.")
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
RETENTION_PURGED = Counter(
    "conveyor_retention_purged_rows",
    "Rows deleted by the retention purge and DeleteJob, by table.",
    ["table"],
)
SCHEDULE_FIRES = Counter(
    "conveyor_schedule_fires",
    "Schedule occurrences fired (a job each); late: made up by the catch-up policy.",
    ["late"],
)


OTHER_MODEL = "other"
"""The label (and limiter key) of every model that is neither known nor allowed."""
KNOWN_MODELS: tuple[str, ...] = (
    "claude-opus-4-1",
    "claude-opus-4-1-20250805",
    "claude-opus-4-0",
    "claude-opus-4-20250514",
    "claude-sonnet-4-5",
    "claude-sonnet-4-5-20250929",
    "claude-sonnet-4-0",
    "claude-sonnet-4-20250514",
    "claude-3-7-sonnet-latest",
    "claude-3-7-sonnet-20250219",
    "claude-3-5-haiku-latest",
    "claude-3-5-haiku-20241022",
    "claude-3-haiku-20240307",
)
"""Model names known besides those the installed anthropic SDK lists (`sdk_models`)."""
_WILDCARDS = frozenset("*?[")


def sdk_models() -> frozenset[str]:
    """The model names of the anthropic SDK's `Model` type (its literal strings)."""
    try:
        from anthropic.types import Model
    except ImportError:  # pragma: no cover - the worker depends on it
        return frozenset()

    def names(tp: object) -> Iterable[str]:
        for arg in typing.get_args(tp):
            if isinstance(arg, str):
                yield arg
            else:
                yield from names(arg)

    return frozenset(names(Model))


class ModelNames:
    """What a model name becomes in metric labels and limiter state: itself when it
    is known or allowed, else `other`.

    Known: the SDK's model names, KNOWN_MODELS, the exact (pattern-free) names of
    CONVEYOR_ALLOWED_MODELS, the models CONVEYOR_RATE_LIMITS names, and what
    CONVEYOR_KNOWN_MODELS matches (shell-style patterns, the operator's choice).
    A pattern of allowed_models such as `claude-*` does not count: it admits
    unboundedly many names.
    """

    def __init__(self, exact: Iterable[str], patterns: Iterable[str] = ()) -> None:
        self.exact = frozenset(exact)
        self.patterns = tuple(patterns)

    @classmethod
    def from_settings(cls, settings: Settings) -> ModelNames:
        allowed = (m for m in settings.allowed_models if not _WILDCARDS & set(m))
        limited = (m for m in settings.rate_limits if m != "*")
        exact = {*sdk_models(), *KNOWN_MODELS, *allowed, *limited}
        return cls(exact, settings.known_models)

    def __call__(self, model: str) -> str:
        if model in self.exact:
            return model
        if any(fnmatch.fnmatchcase(model, p) for p in self.patterns):
            return model
        return OTHER_MODEL


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
