"""Initial schema: jobs, job_events, job_attempts, job_counts; api_keys, tenants and
rate_buckets (authentication, per-tenant limits, shared token buckets).

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB, UUID

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", UUID(as_uuid=True), primary_key=True),
        sa.Column("tenant", sa.Text, nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("lane", sa.Text, nullable=False),
        sa.Column("priority", sa.SmallInteger, nullable=False, server_default="0"),
        sa.Column("model", sa.Text, nullable=False),
        sa.Column("request", JSONB, nullable=False),
        sa.Column("labels", JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.Column("idempotency_key", sa.Text),
        sa.Column("request_hash", sa.Text, nullable=False),
        sa.Column("max_attempts", sa.SmallInteger, nullable=False),
        sa.Column("attempts", sa.SmallInteger, nullable=False, server_default="0"),
        sa.Column("timeout_ms", sa.Integer, nullable=False),
        sa.Column("webhook_url", sa.Text),
        sa.Column("run_at", TS),
        sa.Column("published_at", TS),
        sa.Column("lease_id", UUID(as_uuid=True)),
        sa.Column("heartbeat_at", TS),
        sa.Column("result_text", sa.Text),
        sa.Column("stop_reason", sa.Text),
        sa.Column("input_tokens", sa.Integer),
        sa.Column("output_tokens", sa.Integer),
        sa.Column("cache_creation_input_tokens", sa.Integer),
        sa.Column("cache_read_input_tokens", sa.Integer),
        sa.Column("error", JSONB),
        sa.Column("dead_reason", sa.Text),
        sa.Column("trace_id", sa.Text),
        sa.Column("traceparent", sa.Text),
        sa.Column("seq", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.Column("started_at", TS),
        sa.Column("finished_at", TS),
        sa.Column("cancel_requested_at", TS),
        sa.Column("cancel_requested_by", sa.Text),
        sa.CheckConstraint(
            "status IN ('pending','scheduled','running','succeeded','failed','cancelled','dead')",
            name="jobs_status_valid",
        ),
        sa.UniqueConstraint("tenant", "idempotency_key", name="jobs_tenant_idempotency_key"),
    )
    op.create_index(
        "jobs_tenant_created", "jobs", ["tenant", sa.text("created_at DESC"), sa.text("id DESC")]
    )
    op.create_index("jobs_tenant_status", "jobs", ["tenant", "status"])
    op.create_index(
        "jobs_unpublished",
        "jobs",
        ["created_at"],
        postgresql_where=sa.text("published_at IS NULL AND status = 'pending'"),
    )
    op.create_index(
        "jobs_due", "jobs", ["run_at"], postgresql_where=sa.text("status = 'scheduled'")
    )

    op.create_table(
        "job_events",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column(
            "job_id",
            UUID(as_uuid=True),
            sa.ForeignKey("jobs.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("previous", sa.Text),
        sa.Column("attempt", sa.SmallInteger, nullable=False),
        sa.Column("detail", JSONB),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("actor", sa.Text),
    )
    op.create_index("job_events_job_seq", "job_events", ["job_id", "seq"])

    op.create_table(
        "job_attempts",
        sa.Column(
            "job_id",
            UUID(as_uuid=True),
            sa.ForeignKey("jobs.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("attempt", sa.SmallInteger, primary_key=True),
        sa.Column("lease_id", UUID(as_uuid=True), nullable=False),
        sa.Column("worker", sa.Text, nullable=False),
        sa.Column("started_at", TS, nullable=False),
        sa.Column("finished_at", TS),
        sa.Column("outcome", sa.Text),
        sa.Column("error", JSONB),
        sa.Column("input_tokens", sa.Integer),
        sa.Column("output_tokens", sa.Integer),
    )

    # GetStats reads counters, not the jobs table. They are sharded by backend so
    # that concurrent transitions of one tenant do not queue on one row.
    op.create_table(
        "job_counts",
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
    op.execute(JOB_COUNTS_FUNCTION)
    op.execute(JOB_COUNTS_TRIGGER)
    op.create_index(
        "jobs_tenant_finished",
        "jobs",
        ["tenant", sa.text("finished_at DESC")],
        postgresql_where=sa.text("status = 'succeeded'"),
    )

    _create_tenancy()


def _create_tenancy() -> None:
    """API keys, tenants with their limits, and the shared token buckets."""
    op.create_table(
        "api_keys",
        sa.Column("id", UUID(as_uuid=True), primary_key=True),
        sa.Column("tenant", sa.Text, nullable=False),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("role", sa.Text, nullable=False, server_default="member"),
        sa.Column("key_hash", sa.Text, nullable=False, unique=True),
        sa.Column("prefix", sa.Text, nullable=False),
        sa.Column("created_at", TS, nullable=False, server_default=sa.func.now()),
        sa.Column("revoked_at", TS),
        sa.Column("last_used_at", TS),
        sa.CheckConstraint("role IN ('member','admin')", name="api_keys_role_valid"),
    )
    op.create_index(
        "api_keys_tenant_name",
        "api_keys",
        ["tenant", "name"],
        unique=True,
        postgresql_where=sa.text("revoked_at IS NULL"),
    )
    op.create_table(
        "tenants",
        sa.Column("tenant", sa.Text, primary_key=True),
        sa.Column("created_at", TS, nullable=False, server_default=sa.func.now()),
        sa.Column("submit_per_minute", sa.Integer),
        sa.Column("max_running", sa.Integer),
        sa.Column("running", sa.Integer, nullable=False, server_default="0"),
    )
    op.execute(TENANT_RUNNING_FUNCTION)
    op.execute(TENANT_RUNNING_TRIGGER)
    op.create_table(
        "rate_buckets",
        sa.Column("bucket", sa.Text, primary_key=True),
        sa.Column("limit_per_min", sa.Float),
        sa.Column("capacity", sa.Float, nullable=False, server_default="0"),
        sa.Column("level", sa.Float, nullable=False, server_default="0"),
        sa.Column("last_grant", sa.Float, nullable=False, server_default="0"),
        sa.Column("updated_at", TS, nullable=False, server_default=sa.func.now()),
        sa.Column("blocked_until", TS),
        sa.Column("source", sa.Text),
        sa.Column("learned_at", TS),
    )


# A tenant with a concurrency limit counts its running jobs here, exactly: the
# worker's claim locks the tenant row and checks `running < max_running`; the
# count moves with every transition into or out of `running`. Tenants without a
# limit are not counted (the UPDATE matches nothing and locks nothing).
TENANT_RUNNING_FUNCTION = """
CREATE FUNCTION jobs_tenant_running() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF TG_OP = 'DELETE' THEN
    IF OLD.status = 'running' THEN
      UPDATE tenants SET running = running - 1
       WHERE tenant = OLD.tenant AND max_running IS NOT NULL;
    END IF;
  ELSIF TG_OP = 'INSERT' THEN
    IF NEW.status = 'running' THEN
      UPDATE tenants SET running = running + 1
       WHERE tenant = NEW.tenant AND max_running IS NOT NULL;
    END IF;
  ELSIF OLD.status = 'running' AND NEW.status <> 'running' THEN
    UPDATE tenants SET running = running - 1
     WHERE tenant = OLD.tenant AND max_running IS NOT NULL;
  ELSIF NEW.status = 'running' AND OLD.status <> 'running' THEN
    UPDATE tenants SET running = running + 1
     WHERE tenant = NEW.tenant AND max_running IS NOT NULL;
  END IF;
  RETURN NULL;
END $$
"""
TENANT_RUNNING_TRIGGER = """
CREATE TRIGGER jobs_tenant_running AFTER INSERT OR DELETE OR UPDATE OF status ON jobs
  FOR EACH ROW EXECUTE FUNCTION jobs_tenant_running()
"""


JOB_COUNTS_FUNCTION = """
CREATE FUNCTION jobs_count() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
  my_shard smallint := pg_backend_pid() % 16;
BEGIN
  IF TG_OP IN ('UPDATE', 'DELETE') THEN
    INSERT INTO job_counts AS c (tenant, lane, status, shard, jobs)
    VALUES (OLD.tenant, OLD.lane, OLD.status, my_shard, -1)
    ON CONFLICT (tenant, lane, status, shard) DO UPDATE SET jobs = c.jobs - 1;
  END IF;
  IF TG_OP IN ('INSERT', 'UPDATE') THEN
    INSERT INTO job_counts AS c (tenant, lane, status, shard, jobs, input_tokens, output_tokens,
                                 cache_creation_input_tokens, cache_read_input_tokens)
    VALUES (NEW.tenant, NEW.lane, NEW.status, my_shard, 1,
            CASE WHEN NEW.finished_at IS NOT NULL THEN coalesce(NEW.input_tokens, 0) ELSE 0 END,
            CASE WHEN NEW.finished_at IS NOT NULL THEN coalesce(NEW.output_tokens, 0) ELSE 0 END,
            CASE WHEN NEW.finished_at IS NOT NULL
                 THEN coalesce(NEW.cache_creation_input_tokens, 0) ELSE 0 END,
            CASE WHEN NEW.finished_at IS NOT NULL
                 THEN coalesce(NEW.cache_read_input_tokens, 0) ELSE 0 END)
    ON CONFLICT (tenant, lane, status, shard) DO UPDATE
      SET jobs = c.jobs + 1,
          input_tokens = c.input_tokens + EXCLUDED.input_tokens,
          output_tokens = c.output_tokens + EXCLUDED.output_tokens,
          cache_creation_input_tokens = c.cache_creation_input_tokens
                                        + EXCLUDED.cache_creation_input_tokens,
          cache_read_input_tokens = c.cache_read_input_tokens + EXCLUDED.cache_read_input_tokens;
  END IF;
  RETURN NULL;
END $$
"""
JOB_COUNTS_TRIGGER = """
CREATE TRIGGER jobs_count AFTER INSERT OR DELETE OR UPDATE OF status ON jobs
  FOR EACH ROW EXECUTE FUNCTION jobs_count()
"""


def downgrade() -> None:
    op.drop_table("rate_buckets")
    op.execute("DROP TRIGGER IF EXISTS jobs_tenant_running ON jobs")
    op.execute("DROP FUNCTION IF EXISTS jobs_tenant_running()")
    op.drop_table("tenants")
    op.drop_table("api_keys")
    op.execute("DROP TRIGGER IF EXISTS jobs_count ON jobs")
    op.execute("DROP FUNCTION IF EXISTS jobs_count()")
    op.drop_table("job_counts")
    op.drop_table("job_attempts")
    op.drop_table("job_events")
    op.drop_table("jobs")
