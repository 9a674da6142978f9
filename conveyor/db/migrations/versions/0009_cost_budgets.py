"""Cost and budgets: each job's cost, tenants' daily and monthly budgets and their ledger.

`jobs.cost_micros` is what the job's attempts cost in micro-dollars (NULL: not
finished, or its model is unpriced). A tenant with a budget has one
`tenant_spend` row: the spend of its current UTC day and month (reservations of
unfinished jobs included). A submit reserves its worst case there with one
conditional statement; `jobs.budget_micros` is what the ledger counts for the job
(NULL: no budget when submitted) and `jobs.budget_day` the day it counts in. The
`jobs_budget` trigger moves the ledger when a job's status or cost changes: a
finished job counts its real cost, so the unused part of its reservation is
released whatever finished it (worker, cancel, stalled recovery, dead letter).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

BUDGET_FUNCTION = """
CREATE FUNCTION jobs_budget() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
  target bigint;
  delta bigint;
BEGIN
  -- Finished: the real cost. Otherwise at least the reservation (a retry keeps it).
  IF NEW.status IN ('succeeded', 'failed', 'cancelled', 'dead') THEN
    target := coalesce(NEW.cost_micros, 0);
  ELSE
    target := greatest(OLD.budget_micros, coalesce(NEW.cost_micros, 0));
  END IF;
  delta := target - OLD.budget_micros;
  IF delta <> 0 THEN
    -- Only a period still current moves; a past one is closed.
    UPDATE tenant_spend
       SET day_micros = day_micros + CASE WHEN day = NEW.budget_day THEN delta ELSE 0 END,
           month_micros = month_micros
                          + CASE WHEN month = date_trunc('month', NEW.budget_day)::date
                                 THEN delta ELSE 0 END
     WHERE tenant = NEW.tenant;
    NEW.budget_micros := target;
  END IF;
  RETURN NEW;
END $$
"""
BUDGET_TRIGGER = """
CREATE TRIGGER jobs_budget BEFORE UPDATE OF status, cost_micros ON jobs
  FOR EACH ROW WHEN (OLD.budget_micros IS NOT NULL) EXECUTE FUNCTION jobs_budget()
"""


def upgrade() -> None:
    op.add_column("jobs", sa.Column("cost_micros", sa.BigInteger))
    op.add_column("jobs", sa.Column("budget_micros", sa.BigInteger))
    op.add_column("jobs", sa.Column("budget_day", sa.Date))
    op.add_column("tenants", sa.Column("daily_budget_micros", sa.BigInteger))
    op.add_column("tenants", sa.Column("monthly_budget_micros", sa.BigInteger))
    op.create_table(
        "tenant_spend",
        sa.Column("tenant", sa.Text, primary_key=True),
        sa.Column("day", sa.Date, nullable=False),
        sa.Column("day_micros", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("month", sa.Date, nullable=False),
        sa.Column("month_micros", sa.BigInteger, nullable=False, server_default="0"),
    )
    op.execute(BUDGET_FUNCTION)
    op.execute(BUDGET_TRIGGER)


def downgrade() -> None:
    op.execute("DROP TRIGGER IF EXISTS jobs_budget ON jobs")
    op.execute("DROP FUNCTION IF EXISTS jobs_budget()")
    op.drop_table("tenant_spend")
    op.drop_column("tenants", "monthly_budget_micros")
    op.drop_column("tenants", "daily_budget_micros")
    op.drop_column("jobs", "budget_day")
    op.drop_column("jobs", "budget_micros")
    op.drop_column("jobs", "cost_micros")
