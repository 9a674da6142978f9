"""Per-tenant webhook signing secrets.

Each tenant signs its webhooks with secrets of its own (`conveyor webhooks secret
rotate`), so no tenant can forge another's. A secret is stored encrypted under
CONVEYOR_WEBHOOK_SECRETS_KEY (see conveyor.server.webhooks.SecretBox): HMAC signing needs
the secret itself, so a hash would not do. The current secret has no `expires_at`;
a rotation gives the previous one an `expires_at` (the overlap), until which both
sign. At most one current secret per tenant.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import UUID

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "webhook_secrets",
        sa.Column("id", UUID(as_uuid=True), primary_key=True),
        sa.Column(
            "tenant",
            sa.Text,
            sa.ForeignKey("tenants.tenant", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("sealed", sa.LargeBinary, nullable=False),
        sa.Column("created_at", TS, nullable=False, server_default=sa.func.now()),
        sa.Column("expires_at", TS),
    )
    op.create_index("webhook_secrets_tenant", "webhook_secrets", ["tenant", "created_at"])
    op.create_index(
        "webhook_secrets_current",
        "webhook_secrets",
        ["tenant"],
        unique=True,
        postgresql_where=sa.text("expires_at IS NULL"),
    )


def downgrade() -> None:
    op.drop_table("webhook_secrets")
