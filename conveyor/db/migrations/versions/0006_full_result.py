"""The whole final message of a job: one jsonb `result` column holding the
response's id and model, its content blocks, stop_sequence and the whole usage
object (the columns result_text, stop_reason and the token counts stay, for
listings and statistics).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("result", JSONB))


def downgrade() -> None:
    op.drop_column("jobs", "result")
