"""Operations: schedules and their fired occurrences, a retention TTL per tenant,
the audit of bulk actions, lane pauses, and the live workers' heartbeat rows.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "schedules",
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
    op.create_index("schedules_tenant_created", "schedules", ["tenant", "created_at", "id"])
    op.create_index(
        "schedules_due",
        "schedules",
        ["next_fire_at"],
        postgresql_where=sa.text("NOT paused"),
    )
    op.create_table(
        "schedule_fires",
        sa.Column(
            "schedule_id",
            UUID(as_uuid=True),
            sa.ForeignKey("schedules.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("fire_at", sa.DateTime(timezone=True), primary_key=True),
        sa.Column("job_id", UUID(as_uuid=True), nullable=False),
        sa.Column("late", sa.Boolean, nullable=False, server_default="false"),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("schedule_fires_created", "schedule_fires", ["created_at"])

    op.add_column("tenants", sa.Column("retention_days", sa.Integer))
    # The retention purge walks finished jobs oldest first.
    op.create_index(
        "jobs_finished_at",
        "jobs",
        ["finished_at"],
        postgresql_where=sa.text("finished_at IS NOT NULL"),
    )

    op.create_table(
        "bulk_actions",
        sa.Column("id", UUID(as_uuid=True), primary_key=True),
        sa.Column("tenant", sa.Text, nullable=False),
        sa.Column("actor", sa.Text, nullable=False),
        sa.Column("action", sa.Text, nullable=False),
        sa.Column("filter", JSONB, nullable=False),
        sa.Column("matched", sa.Integer, nullable=False),
        sa.Column("changed", sa.Integer, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("bulk_actions_tenant_created", "bulk_actions", ["tenant", "created_at"])

    op.create_table(
        "lane_pauses",
        sa.Column("tenant", sa.Text, primary_key=True),
        sa.Column("lane", sa.Text, primary_key=True),
        sa.Column("paused_by", sa.Text, nullable=False),
        sa.Column("reason", sa.Text, nullable=False, server_default=""),
        sa.Column("paused_at", sa.DateTime(timezone=True), nullable=False),
    )

    op.create_table(
        "workers",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("host", sa.Text, nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("lanes", ARRAY(sa.Text), nullable=False),
        sa.Column("in_flight", sa.Integer, nullable=False, server_default="0"),
        sa.Column("concurrency", sa.Integer, nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("drain_requested_at", sa.DateTime(timezone=True)),
    )


def downgrade() -> None:
    op.drop_table("workers")
    op.drop_table("lane_pauses")
    op.drop_table("bulk_actions")
    op.drop_index("jobs_finished_at", table_name="jobs")
    op.drop_column("tenants", "retention_days")
    op.drop_table("schedule_fires")
    op.drop_table("schedules")
