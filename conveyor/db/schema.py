"""The tables, as SQLAlchemy Core metadata (Alembic migrations create them)."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB, UUID

from conveyor.core.lifecycle import JobState

metadata = sa.MetaData()

STATUS_VALUES = tuple(state.value for state in JobState)

# fillfactor 80 (migration 0010): room on each page for heartbeats' HOT updates.
jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("id", UUID(as_uuid=True), primary_key=True),
    sa.Column("tenant", sa.Text, nullable=False),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("lane", sa.Text, nullable=False),
    sa.Column("priority", sa.SmallInteger, nullable=False, server_default="0"),
    sa.Column("model", sa.Text, nullable=False),
    # The Messages API body minus model: system, messages, max_tokens, ...
    sa.Column("request", JSONB, nullable=False),
    sa.Column("labels", JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
    sa.Column("idempotency_key", sa.Text),
    sa.Column("request_hash", sa.Text, nullable=False),
    sa.Column("max_attempts", sa.SmallInteger, nullable=False),
    sa.Column("attempts", sa.SmallInteger, nullable=False, server_default="0"),
    sa.Column("timeout_ms", sa.Integer, nullable=False),
    sa.Column("webhook_url", sa.Text),
    # Webhook on every status change, not only terminal ones (migration 0002).
    sa.Column("webhook_all_events", sa.Boolean, nullable=False, server_default="false"),
    sa.Column("run_at", sa.DateTime(timezone=True)),
    # Outbox: NULL until the broker confirmed the job's message.
    sa.Column("published_at", sa.DateTime(timezone=True)),
    # Fencing token of the current attempt; a late writer with another lease loses.
    sa.Column("lease_id", UUID(as_uuid=True)),
    sa.Column("heartbeat_at", sa.DateTime(timezone=True)),
    sa.Column("result_text", sa.Text),
    sa.Column("stop_reason", sa.Text),
    sa.Column("input_tokens", sa.Integer),
    sa.Column("output_tokens", sa.Integer),
    sa.Column("cache_creation_input_tokens", sa.Integer),
    sa.Column("cache_read_input_tokens", sa.Integer),
    # The whole final message but its text: {"id", "model", "content", "stop_sequence",
    # "usage"} as the provider returned them (migration 0006).
    sa.Column("result", JSONB),
    sa.Column("error", JSONB),
    sa.Column("dead_reason", sa.Text),
    sa.Column("trace_id", sa.Text),
    # W3C traceparent of the submit, so later publishes (retries) join the job's trace.
    sa.Column("traceparent", sa.Text),
    # Sequence number of the job's latest event (WatchJob resumes from it).
    sa.Column("seq", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("started_at", sa.DateTime(timezone=True)),
    sa.Column("finished_at", sa.DateTime(timezone=True)),
    sa.Column("cancel_requested_at", sa.DateTime(timezone=True)),
    # Who asked for the cancel (the actor of the `cancelled` transition that follows).
    sa.Column("cancel_requested_by", sa.Text),
    # What the job's attempts cost, micro-dollars; NULL: unfinished or unpriced model.
    sa.Column("cost_micros", sa.BigInteger),
    # What the tenant's budget ledger counts for the job (its reservation, then its
    # cost), and the UTC day it counts in; NULL: no budget at submit (migration 0009).
    sa.Column("budget_micros", sa.BigInteger),
    sa.Column("budget_day", sa.Date),
    sa.CheckConstraint(sa.column("status").in_(STATUS_VALUES), name="jobs_status_valid"),
    sa.UniqueConstraint("tenant", "idempotency_key", name="jobs_tenant_idempotency_key"),
)
sa.Index("jobs_tenant_created", jobs.c.tenant, jobs.c.created_at.desc(), jobs.c.id.desc())
sa.Index("jobs_tenant_status", jobs.c.tenant, jobs.c.status)
sa.Index(
    "jobs_unpublished",
    jobs.c.created_at,
    postgresql_where=sa.text("published_at IS NULL AND status = 'pending'"),
)
sa.Index("jobs_due", jobs.c.run_at, postgresql_where=sa.text("status = 'scheduled'"))
sa.Index(
    "jobs_pending_published",
    jobs.c.published_at,
    postgresql_where=sa.text("status = 'pending' AND published_at IS NOT NULL"),
)

job_events = sa.Table(
    "job_events",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column(
        "job_id", UUID(as_uuid=True), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False
    ),
    sa.Column("seq", sa.BigInteger, nullable=False),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("previous", sa.Text),
    sa.Column("attempt", sa.SmallInteger, nullable=False),
    sa.Column("detail", JSONB),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    # Who caused the transition: "<tenant>/<key name>"; NULL for Conveyor's own moves.
    sa.Column("actor", sa.Text),
)
sa.Index("job_events_job_seq", job_events.c.job_id, job_events.c.seq)

job_attempts = sa.Table(
    "job_attempts",
    metadata,
    sa.Column(
        "job_id", UUID(as_uuid=True), sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    ),
    sa.Column("attempt", sa.SmallInteger, primary_key=True),
    sa.Column("lease_id", UUID(as_uuid=True), nullable=False),
    sa.Column("worker", sa.Text, nullable=False),
    sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("finished_at", sa.DateTime(timezone=True)),
    sa.Column("outcome", sa.Text),
    sa.Column("error", JSONB),
    sa.Column("input_tokens", sa.Integer),
    sa.Column("output_tokens", sa.Integer),
)

# Maintained by the `jobs_tally_*` statement triggers (migration 0010); GetStats sums it.
job_counts = sa.Table(
    "job_counts",
    metadata,
    sa.Column("tenant", sa.Text, primary_key=True),
    sa.Column("lane", sa.Text, primary_key=True),
    sa.Column("status", sa.Text, primary_key=True),
    sa.Column("shard", sa.SmallInteger, primary_key=True),
    sa.Column("jobs", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("input_tokens", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("output_tokens", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("cache_creation_input_tokens", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("cache_read_input_tokens", sa.BigInteger, nullable=False, server_default="0"),
)
sa.Index(
    "jobs_tenant_finished",
    jobs.c.tenant,
    jobs.c.finished_at.desc(),
    postgresql_where=sa.text("status = 'succeeded'"),
)

# API keys: only the SHA-256 of a key is stored; `prefix` is its first characters,
# to recognise a key in listings.
api_keys = sa.Table(
    "api_keys",
    metadata,
    sa.Column("id", UUID(as_uuid=True), primary_key=True),
    sa.Column("tenant", sa.Text, nullable=False),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("role", sa.Text, nullable=False, server_default="member"),
    sa.Column("key_hash", sa.Text, nullable=False, unique=True),
    sa.Column("prefix", sa.Text, nullable=False),
    sa.Column(
        "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
    ),
    sa.Column("revoked_at", sa.DateTime(timezone=True)),
    sa.Column("last_used_at", sa.DateTime(timezone=True)),
    # member, admin (a tenant's) or operator (every tenant's stats; migration 0004).
    sa.CheckConstraint("role IN ('member','admin','operator')", name="api_keys_role_valid"),
)
sa.Index(
    "api_keys_tenant_name",
    api_keys.c.tenant,
    api_keys.c.name,
    unique=True,
    postgresql_where=sa.text("revoked_at IS NULL"),
)

# Every tenant that has jobs or keys; its lane queues exist in RabbitMQ. Limits that
# are NULL fall back to the settings (submit quota) or mean "unlimited" (max_running).
# `running` is kept by the `jobs_tally_*` triggers (migration 0010) while max_running is set.
tenants = sa.Table(
    "tenants",
    metadata,
    sa.Column("tenant", sa.Text, primary_key=True),
    sa.Column(
        "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
    ),
    sa.Column("submit_per_minute", sa.Integer),
    sa.Column("max_running", sa.Integer),
    sa.Column("running", sa.Integer, nullable=False, server_default="0"),
    # Days finished jobs are kept; NULL: CONVEYOR_RETENTION_DAYS (migration 0007).
    sa.Column("retention_days", sa.Integer),
    # Budgets in micro-dollars per UTC day and month; NULL: none (migration 0009).
    sa.Column("daily_budget_micros", sa.BigInteger),
    sa.Column("monthly_budget_micros", sa.BigInteger),
)

# A budgeted tenant's spend in its current UTC day and month, reservations of
# unfinished jobs included (services.gateway.budgets; the `jobs_budget` trigger).
tenant_spend = sa.Table(
    "tenant_spend",
    metadata,
    sa.Column("tenant", sa.Text, primary_key=True),
    sa.Column("day", sa.Date, nullable=False),
    sa.Column("day_micros", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("month", sa.Date, nullable=False),
    sa.Column("month_micros", sa.BigInteger, nullable=False, server_default="0"),
)

# Token buckets shared by every process (see conveyor.db.buckets): provider rate limits
# ("model:<model>:<dimension>") and submit quotas ("submit:<tenant>").
rate_buckets = sa.Table(
    "rate_buckets",
    metadata,
    sa.Column("bucket", sa.Text, primary_key=True),
    sa.Column("limit_per_min", sa.Float),
    sa.Column("capacity", sa.Float, nullable=False, server_default="0"),
    sa.Column("level", sa.Float, nullable=False, server_default="0"),
    sa.Column("last_grant", sa.Float, nullable=False, server_default="0"),
    sa.Column(
        "updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
    ),
    sa.Column("blocked_until", sa.DateTime(timezone=True)),
    sa.Column("source", sa.Text),
    sa.Column("learned_at", sa.DateTime(timezone=True)),
)

# Tenants' webhook signing secrets (migration 0003), sealed under
# CONVEYOR_WEBHOOK_SECRETS_KEY (conveyor.server.webhooks.SecretBox). The current one has no
# expires_at; after a rotation the previous one signs too until its expires_at.
webhook_secrets = sa.Table(
    "webhook_secrets",
    metadata,
    sa.Column("id", UUID(as_uuid=True), primary_key=True),
    sa.Column(
        "tenant", sa.Text, sa.ForeignKey("tenants.tenant", ondelete="CASCADE"), nullable=False
    ),
    sa.Column("sealed", sa.LargeBinary, nullable=False),
    sa.Column(
        "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
    ),
    sa.Column("expires_at", sa.DateTime(timezone=True)),
)
sa.Index("webhook_secrets_tenant", webhook_secrets.c.tenant, webhook_secrets.c.created_at)
sa.Index(
    "webhook_secrets_current",
    webhook_secrets.c.tenant,
    unique=True,
    postgresql_where=sa.text("expires_at IS NULL"),
)

# Webhook deliveries (migration 0002): one row per job status change to report,
# written by the `jobs_webhook_*` triggers with the job's state at that change
# (`job`); the notifier relays due rows to the `conveyor.webhooks` queue.
webhook_deliveries = sa.Table(
    "webhook_deliveries",
    metadata,
    sa.Column("id", UUID(as_uuid=True), primary_key=True),
    sa.Column(
        "job_id", UUID(as_uuid=True), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False
    ),
    sa.Column("tenant", sa.Text, nullable=False),
    sa.Column("url", sa.Text, nullable=False),
    sa.Column("seq", sa.BigInteger, nullable=False),
    sa.Column("event", sa.Text, nullable=False),
    sa.Column("previous", sa.Text),
    sa.Column("job", JSONB, nullable=False),
    # pending (due at next_attempt_at), succeeded, failed (gave up or refused).
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("attempts", sa.SmallInteger, nullable=False, server_default="0"),
    sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
    # Outbox: NULL until the relay put the delivery on the queue (again, for a retry).
    sa.Column("published_at", sa.DateTime(timezone=True)),
    # A notifier is making an attempt until then.
    sa.Column("locked_until", sa.DateTime(timezone=True)),
    sa.Column("last_status_code", sa.Integer),
    sa.Column("last_error", sa.Text),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("delivered_at", sa.DateTime(timezone=True)),
    sa.CheckConstraint(
        "status IN ('pending','succeeded','failed')", name="webhook_deliveries_status_valid"
    ),
    sa.UniqueConstraint("job_id", "seq", name="webhook_deliveries_job_seq"),
)
sa.Index(
    "webhook_deliveries_due",
    webhook_deliveries.c.next_attempt_at,
    postgresql_where=sa.text("status = 'pending'"),
)

webhook_attempts = sa.Table(
    "webhook_attempts",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column(
        "delivery_id",
        UUID(as_uuid=True),
        sa.ForeignKey("webhook_deliveries.id", ondelete="CASCADE"),
        nullable=False,
    ),
    sa.Column("attempt", sa.SmallInteger, nullable=False),
    sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
    # HTTP status of the answer; NULL when there was none (refused, timeout, connection).
    sa.Column("status_code", sa.Integer),
    sa.Column("latency_ms", sa.Float, nullable=False),
    sa.Column("error", sa.Text),
    sa.Column("notifier", sa.Text, nullable=False),
)
sa.Index("webhook_attempts_delivery", webhook_attempts.c.delivery_id, webhook_attempts.c.attempt)

# ---------------------------------------------------------------- operations (migration 0007)

# The retention purge walks finished jobs oldest first.
sa.Index(
    "jobs_finished_at", jobs.c.finished_at, postgresql_where=sa.text("finished_at IS NOT NULL")
)

# Recurring jobs: a cron expression in a time zone, or an interval from start_at, plus the
# job template (a serialized SubmitJobRequest). next_fire_at is the first occurrence not
# handled yet (NULL while paused).
schedules = sa.Table(
    "schedules",
    metadata,
    sa.Column("id", UUID(as_uuid=True), primary_key=True),
    sa.Column("tenant", sa.Text, nullable=False),
    sa.Column("name", sa.Text, nullable=False, server_default=""),
    sa.Column("cron", sa.Text),
    sa.Column("time_zone", sa.Text, nullable=False, server_default="UTC"),
    sa.Column("interval_ms", sa.BigInteger),
    sa.Column("start_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("template", sa.LargeBinary, nullable=False),
    sa.Column("catch_up", sa.Text, nullable=False, server_default="skip"),
    sa.Column("max_catch_up", sa.Integer, nullable=False),
    sa.Column("paused", sa.Boolean, nullable=False, server_default="false"),
    sa.Column("next_fire_at", sa.DateTime(timezone=True)),
    sa.Column("last_fire_at", sa.DateTime(timezone=True)),
    sa.Column("last_job_id", UUID(as_uuid=True)),
    sa.Column("created_by", sa.Text),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("catch_up IN ('skip','once','all')", name="schedules_catch_up_valid"),
    sa.CheckConstraint(
        "(cron IS NULL) <> (interval_ms IS NULL)", name="schedules_cron_or_interval"
    ),
)
sa.Index("schedules_tenant_created", schedules.c.tenant, schedules.c.created_at, schedules.c.id)
sa.Index("schedules_due", schedules.c.next_fire_at, postgresql_where=sa.text("NOT paused"))

# One row per fired occurrence, inserted in the transaction that inserts its job: the
# primary key makes each occurrence fire once, however many dispatchers run.
schedule_fires = sa.Table(
    "schedule_fires",
    metadata,
    sa.Column(
        "schedule_id",
        UUID(as_uuid=True),
        sa.ForeignKey("schedules.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column("fire_at", sa.DateTime(timezone=True), primary_key=True),
    sa.Column("job_id", UUID(as_uuid=True), nullable=False),
    # Fired by the catch-up policy (found later than the misfire grace).
    sa.Column("late", sa.Boolean, nullable=False, server_default="false"),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)
sa.Index("schedule_fires_created", schedule_fires.c.created_at)

# The audit of bulk actions (CancelJobs, RetryJobs, RedriveDeadJobs); each job changed
# names the action's id in its history.
bulk_actions = sa.Table(
    "bulk_actions",
    metadata,
    sa.Column("id", UUID(as_uuid=True), primary_key=True),
    sa.Column("tenant", sa.Text, nullable=False),
    sa.Column("actor", sa.Text, nullable=False),
    sa.Column("action", sa.Text, nullable=False),
    sa.Column("filter", JSONB, nullable=False),
    sa.Column("matched", sa.Integer, nullable=False),
    sa.Column("changed", sa.Integer, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)
sa.Index("bulk_actions_tenant_created", bulk_actions.c.tenant, bulk_actions.c.created_at)

# Paused lanes: of one tenant, or of every tenant (tenant '*'). Workers read it at start
# and on each control message, so a restarted worker respects it.
lane_pauses = sa.Table(
    "lane_pauses",
    metadata,
    sa.Column("tenant", sa.Text, primary_key=True),
    sa.Column("lane", sa.Text, primary_key=True),
    sa.Column("paused_by", sa.Text, nullable=False),
    sa.Column("reason", sa.Text, nullable=False, server_default=""),
    sa.Column("paused_at", sa.DateTime(timezone=True), nullable=False),
)

# Live workers: each upserts its row on every heartbeat and deletes it at exit.
workers = sa.Table(
    "workers",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("host", sa.Text, nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("lanes", sa.ARRAY(sa.Text), nullable=False),
    sa.Column("in_flight", sa.Integer, nullable=False, server_default="0"),
    sa.Column("concurrency", sa.Integer, nullable=False),
    sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("drain_requested_at", sa.DateTime(timezone=True)),
)
