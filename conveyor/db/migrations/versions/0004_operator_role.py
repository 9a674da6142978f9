"""The operator role of API keys: an operator key reads every tenant's statistics
(GetStats of another tenant or of all of them); `admin` keys keep their tenant's
rights only.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_constraint("api_keys_role_valid", "api_keys", type_="check")
    op.create_check_constraint(
        "api_keys_role_valid", "api_keys", "role IN ('member','admin','operator')"
    )


def downgrade() -> None:
    # Operator keys cannot be kept under the old constraint: they are revoked and
    # demoted to member, so no key keeps rights the old code would not check.
    op.execute(
        "UPDATE api_keys SET role = 'member', revoked_at = coalesce(revoked_at, now())"
        " WHERE role = 'operator'"
    )
    op.drop_constraint("api_keys_role_valid", "api_keys", type_="check")
    op.create_check_constraint("api_keys_role_valid", "api_keys", "role IN ('member','admin')")
