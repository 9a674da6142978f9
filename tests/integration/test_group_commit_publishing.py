"""What follows a group commit's INSERT (services.gateway.group_insert): the statement's
jobs are handed to the publisher before its submits are answered, so a worker can start
on a job while its caller is still being answered, and the answers never wait for the
publishing to finish (accepted means committed; the outbox publishes what fails)."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.contract.validation import validate_submit
from conveyor.core.config import Settings
from conveyor.core.lifecycle import Job
from conveyor.db import jobs as db_jobs
from conveyor.v1 import jobs_pb2
from services.gateway.group_insert import GroupInsert

# The stack has migrated the database that `db` reaches.
pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("stack")]


def _job(tenant: str) -> db_jobs.NewJob:
    request = jobs_pb2.SubmitJobRequest(
        model="claude-sonnet-4-5",
        max_tokens=8,
        messages=[jobs_pb2.Message(role="user", content="Hello")],
    )
    return validate_submit(request, Settings(), tenant)


class _Publisher:
    """Records when publishing starts and makes its first step; finishes when told."""

    def __init__(self, log: list[str]) -> None:
        self.log = log
        self.release = asyncio.Event()
        self.published: list[Job] = []

    def after_commit(self, jobs: list[Job]) -> asyncio.Task[None]:
        self.log.append("publishing started")
        return asyncio.create_task(self._publish(jobs))

    async def _publish(self, jobs: list[Job]) -> None:
        self.log.append("messages handed to the broker connection")
        await self.release.wait()  # the broker's confirms, say
        self.published.extend(jobs)


async def test_the_jobs_are_handed_to_the_publisher_before_their_submits_are_answered(
    db: AsyncEngine,
) -> None:
    log: list[str] = []
    publisher = _Publisher(log)
    inserts = GroupInsert(db, after_commit=publisher.after_commit)
    jobs = [_job("publish-order")]

    async def submit() -> None:
        await inserts.insert(jobs, "tests")
        log.append("answered")

    await asyncio.wait_for(submit(), 30)
    assert log == [
        "publishing started",
        "messages handed to the broker connection",
        "answered",
    ]
    assert publisher.published == [], "the answer did not wait for the publishing to end"
    publisher.release.set()
    await inserts.close()
    assert [job.id for job in publisher.published] == [job.id for job in jobs]


async def test_a_failed_publishing_leaves_the_submit_accepted(db: AsyncEngine) -> None:
    async def failing(jobs: list[Job]) -> None:
        raise ConnectionError("the broker went away")

    inserts = GroupInsert(db, after_commit=lambda jobs: asyncio.ensure_future(failing(jobs)))
    jobs = [_job("publish-fails")]
    inserted = await asyncio.wait_for(inserts.insert(jobs, "tests"), 30)
    await inserts.close()
    assert list(inserted) == [jobs[0].id], "committed, so accepted: the outbox publishes it"
