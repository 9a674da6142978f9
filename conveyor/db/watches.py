"""The reads of a watch stream (the notifier's WatchJob and WatchJobs): the watched
jobs as they are now, and their stored status changes after a sequence number."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.core.lifecycle import LIVE, Job
from conveyor.db import jobs as db_jobs
from conveyor.db.statements import as_json, sql, states

MAX_LABEL_JOBS = 1000
"""Unfinished jobs a label-filtered watch starts with, at most (the newest)."""

_BY_ID = sql("SELECT * FROM jobs WHERE tenant = :tenant AND id = ANY(CAST(:ids AS uuid[]))")
_LIVE_WITH_LABELS = sql(
    "SELECT * FROM jobs WHERE tenant = :tenant AND status = ANY(CAST(:live AS text[]))"
    " AND labels @> CAST(:labels AS jsonb) ORDER BY created_at DESC LIMIT :limit"
)


async def jobs_by_id(engine: AsyncEngine, tenant: str, ids: Sequence[uuid.UUID]) -> dict[str, Job]:
    """The tenant's jobs among `ids`, by id (as text); another tenant's are left out."""
    found = await _BY_ID.jobs(engine, {"tenant": tenant, "ids": list(ids)})
    return {str(job.id): job for job in found}


async def job_by_id(engine: AsyncEngine, tenant: str, job_id: uuid.UUID) -> Job | None:
    """The tenant's job `job_id`, or None."""
    return (await jobs_by_id(engine, tenant, [job_id])).get(str(job_id))


async def live_with_labels(
    engine: AsyncEngine, tenant: str, labels: Mapping[str, str]
) -> list[Job]:
    """The tenant's unfinished jobs carrying all `labels`, newest first (at most
    MAX_LABEL_JOBS)."""
    return await _LIVE_WITH_LABELS.jobs(
        engine,
        {
            "tenant": tenant,
            "live": states(LIVE),
            "labels": as_json(labels),
            "limit": MAX_LABEL_JOBS,
        },
    )


async def history(engine: AsyncEngine, job_id: str, after: int) -> list[Mapping[str, Any]]:
    """The job's stored status changes (`job_events` rows) above sequence `after`, in order."""
    async with engine.connect() as conn:
        return list(await db_jobs.history(conn, uuid.UUID(job_id), after))
