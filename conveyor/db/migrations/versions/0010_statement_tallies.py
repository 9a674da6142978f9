"""Job counts and tenants' running counts kept per statement, not per row.

The `jobs_count` and `jobs_tenant_running` row triggers of the initial migration ran
two plpgsql calls per changed row, two upserts into `job_counts` and, for a tenant
with a limit, an UPDATE of its row. They become statement-level triggers over
transition tables (`jobs_tally_*`): a statement that moves many jobs (the worker's
grouped claims and finishes, the gateway's grouped INSERT, the dispatcher's sweeps)
makes one plpgsql call, one upsert of one row per (tenant, lane, status) it
changes and, when jobs entered or left running, one UPDATE of the limited tenants.

What they keep is unchanged: `job_counts` gets -1 on the key a job leaves and +1 on
the key it enters (with its tokens when it enters finished), in the backend's shard;
`tenants.running` moves with every change into or out of `running` while the
tenant has a limit, in the statement that makes the change, so the next claim,
which locks the tenant row, reads an exact count. Tenant rows are locked in tenant
order, so two statements that move jobs of the same tenants cannot deadlock on them.

Postgres allows transition tables only on single-event triggers without a column
list: the UPDATE trigger fires for every UPDATE of jobs and counts the rows whose
status changed: an UPDATE that leaves status alone (a heartbeat, an outbox stamp)
counts nothing, where the row trigger fired whenever status was SET, even to its
own value.

The jobs table also leaves a fifth of each new page free (fillfactor 80), so that a
heartbeat, which changes no indexed column, can write its row version on the same
page (a HOT update) instead of adding an entry to every index.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-05
"""

from __future__ import annotations

from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

_TOKENS = (
    "input_tokens",
    "output_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
)
_COUNTS = "jobs, " + ", ".join(_TOKENS)
_MOVE_COLUMNS = "tenant, lane, status, " + _COUNTS


def _entered(row: str) -> str:
    """The move of a job entering its key: +1, with its tokens once it is finished."""
    tokens = ", ".join(
        f"CASE WHEN {row}.finished_at IS NOT NULL THEN coalesce({row}.{t}, 0) ELSE 0 END"
        for t in _TOKENS
    )
    return f"{row}.tenant, {row}.lane, {row}.status, 1, {tokens}"


def _left(row: str) -> str:
    """The move of a job leaving its key: -1 (tokens stay counted)."""
    return f"{row}.tenant, {row}.lane, {row}.status, -1, 0, 0, 0, 0"


_MOVES = {
    "INSERT": f"SELECT {_entered('n')} FROM new_rows n",
    "DELETE": f"SELECT {_left('o')} FROM old_rows o",
    "UPDATE": f"""SELECT m.* FROM old_rows o JOIN new_rows n ON n.id = o.id,
           LATERAL (VALUES ({_left("o")}), ({_entered("n")})) AS m({_MOVE_COLUMNS})
     WHERE o.status <> n.status""",
}
# Jobs entering (+1) and leaving (-1) running, by tenant.
_RUNNING = {
    "INSERT": "SELECT tenant, 1 AS delta FROM new_rows WHERE status = 'running'",
    "DELETE": "SELECT tenant, -1 AS delta FROM old_rows WHERE status = 'running'",
    "UPDATE": """SELECT o.tenant, -1 AS delta FROM old_rows o JOIN new_rows n ON n.id = o.id
         WHERE o.status = 'running' AND n.status <> 'running'
        UNION ALL
        SELECT n.tenant, 1 FROM old_rows o JOIN new_rows n ON n.id = o.id
         WHERE n.status = 'running' AND o.status <> 'running'""",
}
_SUMS = ", ".join(f"sum({t})" for t in _TOKENS)
_ADD = ",\n          ".join(f"{t} = c.{t} + EXCLUDED.{t}" for t in _TOKENS)


def _function(event: str) -> str:
    # The tenants' UPDATE runs only when the upsert moved a running count: its plan
    # costs even when it matches nothing, and most statements move no running job.
    return f"""
CREATE FUNCTION jobs_tally_{event.lower()}() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
  running_moved boolean;
BEGIN
  WITH counted AS (
    INSERT INTO job_counts AS c (tenant, lane, status, shard, {_COUNTS})
    SELECT tenant, lane, status, pg_backend_pid() % 16, sum(jobs), {_SUMS}
      FROM ({_MOVES[event]}) AS moves ({_MOVE_COLUMNS})
     GROUP BY tenant, lane, status ORDER BY tenant, lane, status
    ON CONFLICT (tenant, lane, status, shard) DO UPDATE
      SET jobs = c.jobs + EXCLUDED.jobs,
          {_ADD}
    RETURNING c.status
  )
  SELECT coalesce(bool_or(status = 'running'), false) INTO running_moved FROM counted;
  IF running_moved THEN
    WITH running AS (
      SELECT tenant, sum(delta) AS delta FROM ({_RUNNING[event]}) AS moves
       GROUP BY tenant HAVING sum(delta) <> 0
    ), locked AS (
      SELECT t.tenant FROM tenants t JOIN running r ON r.tenant = t.tenant
       WHERE t.max_running IS NOT NULL ORDER BY t.tenant FOR UPDATE OF t
    )
    UPDATE tenants t SET running = t.running + r.delta
      FROM running r JOIN locked l ON l.tenant = r.tenant WHERE t.tenant = r.tenant;
  END IF;
  RETURN NULL;
END $$
"""


_TRANSITION_TABLES = {
    "INSERT": "NEW TABLE AS new_rows",
    "DELETE": "OLD TABLE AS old_rows",
    "UPDATE": "OLD TABLE AS old_rows NEW TABLE AS new_rows",
}


def upgrade() -> None:
    op.execute("DROP TRIGGER jobs_count ON jobs")
    op.execute("DROP TRIGGER jobs_tenant_running ON jobs")
    op.execute("DROP FUNCTION jobs_count()")
    op.execute("DROP FUNCTION jobs_tenant_running()")
    op.execute("ALTER TABLE jobs SET (fillfactor = 80)")
    for event, tables in _TRANSITION_TABLES.items():
        op.execute(_function(event))
        op.execute(
            f"CREATE TRIGGER jobs_tally_{event.lower()} AFTER {event} ON jobs"
            f" REFERENCING {tables} FOR EACH STATEMENT"
            f" EXECUTE FUNCTION jobs_tally_{event.lower()}()"
        )


def downgrade() -> None:
    op.execute("ALTER TABLE jobs RESET (fillfactor)")
    for event in _TRANSITION_TABLES:
        op.execute(f"DROP TRIGGER jobs_tally_{event.lower()} ON jobs")
        op.execute(f"DROP FUNCTION jobs_tally_{event.lower()}()")
    op.execute(_ROW_COUNT_FUNCTION)
    op.execute(
        "CREATE TRIGGER jobs_count AFTER INSERT OR DELETE OR UPDATE OF status ON jobs"
        " FOR EACH ROW EXECUTE FUNCTION jobs_count()"
    )
    op.execute(_ROW_RUNNING_FUNCTION)
    op.execute(
        "CREATE TRIGGER jobs_tenant_running AFTER INSERT OR DELETE OR UPDATE OF status ON jobs"
        " FOR EACH ROW EXECUTE FUNCTION jobs_tenant_running()"
    )


# The row triggers' functions as migration 0001 created them (for the downgrade).
_ROW_RUNNING_FUNCTION = """
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
_ROW_COUNT_FUNCTION = """
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
