"""One settings object for every service, read from environment variables.

Every variable is `CONVEYOR_<FIELD>` (e.g. `CONVEYOR_AMQP_URL`), except the
provider's own `ANTHROPIC_API_KEY` / `ANTHROPIC_BASE_URL` and the standard
`OTEL_*` variables, which keep their usual names. The defaults work against the
RabbitMQ and Postgres of a developer machine.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

LANES: tuple[str, ...] = ("interactive", "default", "bulk")
"""The lanes (queues) a job can run in; each is a RabbitMQ priority queue."""


class Settings(BaseSettings):
    """Configuration of Conveyor; see README "Configuration" for the table."""

    model_config = SettingsConfigDict(env_prefix="CONVEYOR_", extra="ignore")

    # Backing services.
    amqp_url: SecretStr = SecretStr("amqp://guest:guest@127.0.0.1:5672/")
    database_url: SecretStr = SecretStr("postgresql+asyncpg://postgres@127.0.0.1:5432/conveyor")
    db_pool_size: int = 10
    db_statement_timeout_s: float = Field(default=30.0, ge=0)
    """Postgres cancels a statement running longer (statement_timeout; 0: no limit)."""
    db_lock_timeout_s: float = Field(default=10.0, ge=0)
    """Postgres cancels a statement waiting longer for a lock (lock_timeout; 0: no limit)."""
    db_command_timeout_s: float = Field(default=60.0, gt=0)
    """The client gives up on a connection attempt or a statement without an answer
    after this long (an unreachable or hung server), and drops the connection."""
    migrate_on_start: bool = False

    # Listeners.
    gateway_host: str = "127.0.0.1"
    gateway_port: int = 50051
    notifier_host: str = "127.0.0.1"
    notifier_port: int = 50052
    simulator_host: str = "127.0.0.1"
    simulator_port: int = 8765
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    """The HTTP/JSON API (services/http): JobService and JobEvents over HTTP, SSE streams."""

    # Jobs.
    lanes: tuple[str, ...] = LANES
    default_lane: str = "default"
    default_max_attempts: int = 3
    default_timeout_s: float = 600.0
    max_priority: int = 9

    # Gateway.
    gateway_processes: int = Field(default=1, ge=1)
    """Gateway processes sharing the gateway port (SO_REUSEPORT): one runs on one core,
    so a busy machine wants one per core. Needs a fixed gateway_port."""
    grpc_reuse_port: bool = False
    """Let other processes listen on the same gRPC port (set for a supervisor's processes)."""
    gateway_group_interval_ms: float = Field(default=2.0, ge=0)
    """Submits arriving within this long of the last INSERT wait and share the next one
    (group commit); an idle gateway inserts at once."""
    gateway_max_waiting_jobs: int = Field(default=10_000, ge=1)
    """Jobs that may wait for a group-commit INSERT; a submit beyond them is refused
    RESOURCE_EXHAUSTED (nothing written) instead of queueing without bound."""
    grpc_max_concurrent_rpcs: int = Field(default=2000, ge=1)
    """Calls one gRPC server process (gateway, notifier) handles at once, streams
    included; more are refused RESOURCE_EXHAUSTED at once instead of queueing."""

    # HTTP API (services/http).
    http_gateway_target: str = ""
    """Where the HTTP API reaches the gateway (host:port); empty: gateway_host:gateway_port."""
    http_notifier_target: str = ""
    """Where the HTTP API reaches the notifier; empty: notifier_host:notifier_port."""
    http_cors_origins: tuple[str, ...] = ()
    """Browser origins allowed to call the HTTP API from another site, e.g.
    `["https://ops.example.com"]` (JSON list; `*` allows any). Empty: CORS off."""
    http_sse_heartbeat_s: float = Field(default=15.0, gt=0)
    """An idle Server-Sent Events stream gets a comment line this often, so proxies and
    browsers keep it open (and a vanished reader is noticed)."""
    http_sse_write_timeout_s: float = Field(default=30.0, gt=0)
    """A Server-Sent Events reader that takes no data for this long is disconnected."""

    # Worker.
    worker_lanes: tuple[str, ...] = LANES
    worker_concurrency: int = Field(default=256, ge=1)
    worker_heartbeat_s: float = 5.0
    worker_shutdown_grace_s: float = 30.0
    retry_base_s: float = 1.0
    retry_cap_s: float = 60.0

    # Dispatcher.
    lease_s: float = 30.0
    """A running job whose heartbeat is older than this is handed back to the queue."""
    outbox_after_s: float = 5.0
    """A pending job unconfirmed by the broker for this long is published again."""
    pending_republish_s: float = Field(default=300.0, gt=0)
    """A pending job published this long ago and still not claimed is published again
    (its message may be lost: a purged queue, a lost broker node); duplicates are harmless."""
    dispatcher_interval_s: float = 0.5
    schedule_misfire_grace_s: float = Field(default=60.0, gt=0)
    """A schedule's occurrence found later than this after its time counts as missed:
    the schedule's catch-up policy decides whether it runs (skip, once, all)."""
    schedule_max_catch_up: int = Field(default=100, ge=1, le=1000)
    """Missed occurrences a CATCH_UP_ALL schedule makes up at once unless it says."""
    retention_days: int = Field(default=30, ge=0)
    """Days a finished job (with its history, attempts and webhook deliveries) is kept
    before the dispatcher purges it; 0 keeps jobs forever. `conveyor tenants set
    --retention-days` overrides it per tenant."""
    retention_interval_s: float = Field(default=60.0, gt=0)
    """How often the dispatcher looks for finished jobs past their retention."""
    retention_batch: int = Field(default=500, ge=1, le=10_000)
    """Jobs purged per statement (each a short transaction of its own)."""

    # Batch lane (services/dispatcher/batcher.py): the Message Batches API at half price.
    batch_lanes: tuple[str, ...] = ()
    """Lanes whose jobs go through the Message Batches API instead of a worker (each
    must also be one of `lanes`), e.g. `["batch"]`. Empty: no batch lane."""
    batch_max_wait_s: float = Field(default=60.0, ge=0)
    """A batch is sent once its oldest job has waited this long (or it is full)."""
    batch_max_requests: int = Field(default=100_000, ge=1, le=100_000)
    """Requests per batch at most (the API allows 100,000)."""
    batch_max_bytes: int = Field(default=256 * 1024 * 1024, ge=1024, le=256 * 1024 * 1024)
    """Bytes of requests per batch at most (the API allows 256 MB)."""
    batch_poll_s: float = Field(default=5.0, gt=0)
    """First wait before polling a created batch; doubles per poll up to batch_poll_max_s."""
    batch_poll_max_s: float = Field(default=60.0, gt=0)
    batch_expired_policy: Literal["retry", "dead"] = "retry"
    """What becomes of a job whose batch request expired or was canceled at the API:
    `retry` (back to the batch lane while attempts remain) or `dead`."""
    batch_test_pause: str = ""
    """Test hook: the batcher stops (sleeps) after recording a batch (`recorded`), after
    the API created it but before that is noted (`api`), or after noting it (`created`),
    so a test can kill it there."""

    # Authentication, TLS and tenants.
    anonymous_tenant: str | None = None
    """Tenant of calls that carry no API key. Unset (the default): such calls are
    UNAUTHENTICATED. `make up` sets it so that key-less local calls work; a wrong key
    is refused whatever this says."""
    auth_cache_s: float = 10.0
    """How long a process remembers a resolved (or refused) API key; a revoked key
    stops working within this time."""
    auth_cache_size: int = Field(default=10_000, ge=1)
    """Valid API keys a process remembers (least recently used dropped first); refused
    keys have a cache of their own of the same size, so a flood of wrong keys cannot
    push out the valid ones."""
    allow_anonymous_on_network: bool = False
    """Let anonymous_tenant be set while a gRPC listener binds a non-loopback address
    (e.g. behind a proxy that authenticates). Off: such a service refuses to start."""
    tls_cert_file: Path | None = None
    """PEM certificate chain of the gRPC servers; with tls_key_file, they serve TLS only."""
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None
    """With it, clients must present a certificate signed by this CA (mutual TLS)."""
    fair_tenants: bool = True
    """Each tenant gets its own queue per lane and workers take from them in turn, so one
    tenant's backlog does not hold up another's jobs. Off: one shared queue per lane."""
    tenant_refresh_s: float = 10.0
    """How often a worker re-reads the tenant list (new tenants are also announced)."""
    tenant_submit_per_minute: int = Field(default=0, ge=0)
    """Default submit quota of a tenant (jobs per minute, 0 = unlimited); the tenants
    table overrides it per tenant."""

    # Input limits (requests beyond them are INVALID_ARGUMENT).
    max_prompt_chars: int = Field(default=1_000_000, ge=1)
    """System prompt and message texts together."""
    max_messages: int = Field(default=1000, ge=1)
    max_output_tokens: int = Field(default=128_000, ge=1)
    """Upper bound of max_tokens."""
    max_metadata_chars: int = Field(default=256, ge=1)
    """Length of each metadata value (the Messages API takes only `user_id`)."""
    max_labels: int = Field(default=32, ge=0)
    max_label_chars: int = Field(default=256, ge=1)
    """Length of each label key and value."""
    max_webhook_url_chars: int = Field(default=2048, ge=1)
    max_request_bytes: int = Field(default=15 * 1024 * 1024, ge=1024)
    """JSON size of a whole Messages API request body (SubmitJobRequest.request_json);
    the gRPC servers' receive limit is set above it (conveyor.server.runtime.max_request_bytes)."""
    max_request_images: int = Field(default=100, ge=0)
    """Image blocks in one request body (tool results and document contents included)."""
    max_request_documents: int = Field(default=100, ge=0)
    """Document blocks in one request body."""
    max_request_tools: int = Field(default=512, ge=0)
    """Tool definitions in one request body."""
    request_extra_keys: tuple[str, ...] = ()
    """Top-level request body keys the installed anthropic SDK does not know that are
    passed through unchecked, e.g. `["top_k"]` (JSON list): a new API parameter without
    a release. Any other unknown key is INVALID_ARGUMENT."""
    allowed_models: tuple[str, ...] = ()
    """Model names accepted (shell-style patterns, e.g. `claude-*`); empty: any well-formed name."""
    known_models: tuple[str, ...] = ()
    """Model names (shell-style patterns) that get their own metric labels and
    rate-limit state, besides the models the anthropic SDK names, the exact names of
    allowed_models and rate_limits; any other model is counted as `other`."""

    # Cost (conveyor.core.pricing) and tenants' budgets.
    prices: dict[str, dict[str, float]] = {}
    """Prices per model (exact name or shell-style pattern) in USD per million tokens,
    e.g. `{"my-model-*": {"input": 3, "output": 15}}`; optional `cache_write_5m`,
    `cache_write_1h`, `cache_read` (default: 1.25x, 2x, 0.1x input), `batch_factor`
    (0.5) and `web_search_per_1k` (10). Overrides or adds to the built-in table."""

    # Provider rate limits, shared by every worker through Postgres token buckets.
    rate_limits: dict[str, dict[str, float]] = {}
    """Per model, e.g. `{"claude-sonnet-4-5": {"requests_per_minute": 50,
    "input_tokens_per_minute": 30000, "output_tokens_per_minute": 8000}}`; `*` applies
    to every model. The limits learned from the provider's headers lower these."""
    rate_limit_learn: bool = True
    """Learn limits from the provider's `anthropic-ratelimit-*` response headers."""
    rate_limit_burst_s: float = Field(default=1.0, gt=0)
    """Bucket capacity, in seconds of the per-minute rate: how much may go at once."""
    rate_limit_batch_s: float = Field(default=0.25, gt=0)
    """A worker takes this many seconds' worth of budget per database round trip."""

    # Notifier: watch streams.
    notifier_watch_buffer: int = Field(default=4096, ge=16)
    """Events queued for one watch stream; a reader that falls further behind is cut
    off with RESOURCE_EXHAUSTED and resumes from its last sequence number."""
    notifier_max_watches: int = Field(default=10_000, ge=1)
    """Open WatchJob/WatchJobs streams per notifier; more are RESOURCE_EXHAUSTED."""
    notifier_max_watches_per_tenant: int = Field(default=1000, ge=1)
    """Open WatchJob/WatchJobs streams of one tenant per notifier; more are
    RESOURCE_EXHAUSTED, so one tenant cannot take every stream of a notifier."""
    notifier_job_log_bytes: int = Field(default=2 * 1024 * 1024, ge=1024)
    """Recent token deltas kept per running job (for resumes); older ones are dropped."""
    notifier_logs_bytes: int = Field(default=128 * 1024 * 1024, ge=1024)
    """Token deltas kept over all jobs; beyond it the biggest buffers are trimmed."""
    notifier_log_linger_s: float = 60.0
    """How long a job's deltas are kept after its attempt ended."""
    notifier_catchup_timeout_s: float = 2.0
    """How long to wait for the worker's text so far when no buffer covers a resume."""
    notifier_idle_check_s: float = 5.0
    """A quiet watch re-reads its jobs this often (catches changes a bus outage hid)."""

    # Webhooks (delivered by the notifier).
    webhook_secrets_key: SecretStr | None = None
    """Key (at least 32 characters) that encrypts the tenants' webhook signing secrets in
    the database; the notifier and `conveyor webhooks secret` need it. Unset: deliveries
    fail (never unsigned)."""
    webhook_secret_overlap_s: float = Field(default=24 * 3600.0, ge=0)
    """After `conveyor webhooks secret rotate`, the old secret still signs this long."""
    webhook_secrets_cache_s: float = Field(default=5.0, ge=0)
    """A notifier reads a tenant's signing secrets again after this long (so a rotation
    is signed with within it)."""
    webhook_allow_private: bool = False
    """Allow URLs resolving to loopback, private, link-local or reserved addresses."""
    webhook_allow_cidrs: tuple[str, ...] = ()
    """Networks allowed although not public, e.g. `["10.1.0.0/16"]` (JSON list)."""
    webhook_timeout_s: float = Field(default=10.0, gt=0)
    """Limit on one attempt: connect, send, and the receiver's answer."""
    webhook_retry_base_s: float = Field(default=1.0, gt=0)
    webhook_retry_cap_s: float = Field(default=600.0, gt=0)
    webhook_retry_window_s: float = Field(default=24 * 3600.0, gt=0)
    """A delivery not answered with a 2xx this long after its event is given up (failed)."""
    webhook_concurrency: int = Field(default=64, ge=1)
    """Attempts in flight per notifier (the queue's prefetch)."""
    webhook_per_host: int = Field(default=8, ge=1)
    """Attempts in flight per receiving host, counted by the address its name resolves
    to (so many names of one host share it); more wait, so one slow host cannot take
    every slot."""
    webhook_per_tenant: int = Field(default=16, ge=1)
    """Attempts in flight per tenant (per notifier); more wait, so one tenant's
    receivers cannot take every slot."""
    webhook_poll_s: float = Field(default=0.25, gt=0)
    """How often the relay looks for due deliveries (new ones and retries)."""
    webhook_republish_after_s: float = Field(default=300.0, gt=0)
    """A queued delivery with no attempt for this long is queued again (lost message)."""

    # Provider: `simulator` (the bundled stand-in, the default on a development machine)
    # or `anthropic` (the real API: a worker without ANTHROPIC_API_KEY refuses to start).
    provider: Literal["simulator", "anthropic"] = "simulator"
    anthropic_api_key: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("ANTHROPIC_API_KEY", "CONVEYOR_ANTHROPIC_API_KEY"),
    )
    anthropic_base_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("ANTHROPIC_BASE_URL", "CONVEYOR_ANTHROPIC_BASE_URL"),
    )
    anthropic_max_retries: int = 0

    # Observability. Tracing itself is configured by the standard OTEL_* variables.
    metrics_host: str = "127.0.0.1"
    gateway_metrics_port: int = 9101
    notifier_metrics_port: int = 9102
    worker_metrics_port: int = 9103
    dispatcher_metrics_port: int = 9104
    http_metrics_port: int = 9105
    jaeger_url: str | None = None
    """Base URL of a Jaeger UI; the CLI then prints a link to each job's trace."""

    # Local stack.
    run_dir: Path = Path("run")
    log_level: str = "INFO"
    log_json: bool | None = None
    """JSON log lines; None means JSON unless stderr is a terminal."""

    @field_validator("anonymous_tenant", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if value == "" else value

    @property
    def tls(self) -> bool:
        """Whether the gRPC servers serve TLS."""
        return self.tls_cert_file is not None and self.tls_key_file is not None

    @property
    def provider_base_url(self) -> str:
        """Where the worker sends Messages API calls: the simulator, or the real API
        (ANTHROPIC_BASE_URL overrides it, e.g. for a proxy)."""
        if self.provider == "simulator":
            return f"http://{self.simulator_host}:{self.simulator_port}"
        return self.anthropic_base_url or "https://api.anthropic.com"

    def metrics_port(self, service: str) -> int:
        """The Prometheus port of a service (0: no metrics endpoint)."""
        return int(getattr(self, f"{service}_metrics_port", 0))

    @property
    def gateway_target(self) -> str:
        return f"{self.gateway_host}:{self.gateway_port}"

    @property
    def notifier_target(self) -> str:
        return f"{self.notifier_host}:{self.notifier_port}"

    @property
    def http_target(self) -> str:
        return f"{self.http_host}:{self.http_port}"


class ConfigError(Exception):
    """Settings that a service cannot start with; it exits with this message."""


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once from the environment."""
    return Settings()


DEFAULT_TENANT = "default"
"""The development tenant: `make up` gives it a key and lets key-less calls act as it."""
