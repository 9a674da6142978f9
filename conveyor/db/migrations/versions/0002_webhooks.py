"""Webhooks: deliveries (an outbox written by a trigger), their attempts, and the
per-job choice of which changes to POST.

A delivery row is written by the `jobs_webhook_*` triggers in the same
transaction as the status change it reports, whichever component makes it
(worker, gateway, dispatcher): a committed terminal status always has its
delivery, and nothing is written for jobs without a webhook URL (the triggers'
WHEN clauses skip them without calling the function). The row keeps the job's
state at that change (`job`, without the request), so the POSTed body describes
the change even if the job has moved on since. The notifier relays due rows to
the durable `conveyor.webhooks` queue and records every attempt.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB, UUID

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)

ENQUEUE_FUNCTION = """
CREATE OR REPLACE FUNCTION conveyor_enqueue_webhook() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  IF NEW.status IN ('succeeded', 'failed', 'cancelled', 'dead') OR NEW.webhook_all_events THEN
    INSERT INTO webhook_deliveries
      (id, job_id, tenant, url, seq, event, previous, job, status, next_attempt_at,
       created_at, updated_at)
    VALUES
      (gen_random_uuid(), NEW.id, NEW.tenant, NEW.webhook_url, NEW.seq, NEW.status,
       CASE WHEN TG_OP = 'UPDATE' THEN OLD.status END,
       to_jsonb(NEW) - 'request' - 'request_hash' - 'lease_id' - 'heartbeat_at'
                     - 'published_at' - 'traceparent',
       'pending', clock_timestamp(), clock_timestamp(), clock_timestamp())
    ON CONFLICT (job_id, seq) DO NOTHING;
  END IF;
  RETURN NULL;
END
$$;
"""


def upgrade() -> None:
    op.add_column(
        "jobs",
        sa.Column("webhook_all_events", sa.Boolean, nullable=False, server_default="false"),
    )
    op.create_table(
        "webhook_deliveries",
        sa.Column("id", UUID(as_uuid=True), primary_key=True),
        sa.Column(
            "job_id",
            UUID(as_uuid=True),
            sa.ForeignKey("jobs.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("tenant", sa.Text, nullable=False),
        sa.Column("url", sa.Text, nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("event", sa.Text, nullable=False),
        sa.Column("previous", sa.Text),
        sa.Column("job", JSONB, nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("attempts", sa.SmallInteger, nullable=False, server_default="0"),
        sa.Column("next_attempt_at", TS, nullable=False),
        sa.Column("published_at", TS),
        sa.Column("locked_until", TS),
        sa.Column("last_status_code", sa.Integer),
        sa.Column("last_error", sa.Text),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.Column("delivered_at", TS),
        sa.CheckConstraint(
            "status IN ('pending','succeeded','failed')", name="webhook_deliveries_status_valid"
        ),
        sa.UniqueConstraint("job_id", "seq", name="webhook_deliveries_job_seq"),
    )
    op.create_index(
        "webhook_deliveries_due",
        "webhook_deliveries",
        ["next_attempt_at"],
        postgresql_where=sa.text("status = 'pending'"),
    )
    op.create_table(
        "webhook_attempts",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column(
            "delivery_id",
            UUID(as_uuid=True),
            sa.ForeignKey("webhook_deliveries.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("attempt", sa.SmallInteger, nullable=False),
        sa.Column("started_at", TS, nullable=False),
        sa.Column("status_code", sa.Integer),
        sa.Column("latency_ms", sa.Float, nullable=False),
        sa.Column("error", sa.Text),
        sa.Column("notifier", sa.Text, nullable=False),
    )
    op.create_index("webhook_attempts_delivery", "webhook_attempts", ["delivery_id", "attempt"])

    op.execute(ENQUEUE_FUNCTION)
    op.execute(
        """
        CREATE TRIGGER jobs_webhook_submitted AFTER INSERT ON jobs FOR EACH ROW
          WHEN (NEW.webhook_url IS NOT NULL AND NEW.webhook_all_events)
          EXECUTE FUNCTION conveyor_enqueue_webhook()
        """
    )
    op.execute(
        """
        CREATE TRIGGER jobs_webhook_changed AFTER UPDATE OF status ON jobs FOR EACH ROW
          WHEN (NEW.webhook_url IS NOT NULL AND OLD.status IS DISTINCT FROM NEW.status)
          EXECUTE FUNCTION conveyor_enqueue_webhook()
        """
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER IF EXISTS jobs_webhook_changed ON jobs")
    op.execute("DROP TRIGGER IF EXISTS jobs_webhook_submitted ON jobs")
    op.execute("DROP FUNCTION IF EXISTS conveyor_enqueue_webhook()")
    op.drop_table("webhook_attempts")
    op.drop_table("webhook_deliveries")
    op.drop_column("jobs", "webhook_all_events")
