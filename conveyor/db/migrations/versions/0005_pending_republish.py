"""An index for the dispatcher's republish of pending jobs whose message was lost
(a purged or lost queue): pending jobs by when their message was published.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "jobs_pending_published",
        "jobs",
        ["published_at"],
        postgresql_where="status = 'pending' AND published_at IS NOT NULL",
    )


def downgrade() -> None:
    op.drop_index("jobs_pending_published", table_name="jobs")
