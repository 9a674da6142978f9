"""The batch lane: Message Batches recorded before they are created, and their jobs.

A batch row is written (status `recorded`, with its jobs in `batch_jobs`) before
`messages.batches.create` is called, so a dispatcher that dies in between leaves a
record the next one adopts; `marker` (a hash of the job ids) and the request count
let it find a batch that was created but never noted.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB, UUID

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "batches",
        sa.Column("id", UUID(as_uuid=True), primary_key=True),
        sa.Column("model", sa.Text, nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("provider_batch_id", sa.Text, unique=True),
        sa.Column("marker", sa.Text, nullable=False),
        sa.Column("request_count", sa.Integer, nullable=False),
        sa.Column("request_bytes", sa.BigInteger, nullable=False),
        sa.Column("traceparent", sa.Text),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("submitted_at", sa.DateTime(timezone=True)),
        sa.Column("expires_at", sa.DateTime(timezone=True)),
        sa.Column("next_poll_at", sa.DateTime(timezone=True)),
        sa.Column("polls", sa.Integer, nullable=False, server_default="0"),
        sa.Column("cancel_sent_at", sa.DateTime(timezone=True)),
        sa.Column("ended_at", sa.DateTime(timezone=True)),
        sa.Column("request_counts", JSONB),
        sa.Column("cost_micros", sa.BigInteger),
        sa.CheckConstraint(
            "status IN ('recorded', 'created', 'ended')", name="batches_status_known"
        ),
    )
    op.create_index(
        "batches_open", "batches", ["status", "next_poll_at"], postgresql_where="status <> 'ended'"
    )
    op.create_table(
        "batch_jobs",
        sa.Column(
            "batch_id",
            UUID(as_uuid=True),
            sa.ForeignKey("batches.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column(
            "job_id",
            UUID(as_uuid=True),
            sa.ForeignKey("jobs.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("outcome", sa.Text),
        sa.PrimaryKeyConstraint("batch_id", "job_id"),
    )
    op.create_index("batch_jobs_job", "batch_jobs", ["job_id"])
    # The batcher's pick: pending jobs of the batch lanes, oldest first.
    op.create_index(
        "jobs_pending_lane",
        "jobs",
        ["lane", "created_at"],
        postgresql_where="status = 'pending'",
    )


def downgrade() -> None:
    op.drop_index("jobs_pending_lane", table_name="jobs")
    op.drop_table("batch_jobs")
    op.drop_table("batches")
