"""The notifier's hub: per-job delta buffers, what they can replay, and the watchers' inboxes."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

from aio_pika.abc import AbstractIncomingMessage

from conveyor.bus.catchup import TextSoFar
from conveyor.bus.events import BATCH_CONTENT_TYPE, EVENT_CONTENT_TYPE, TEXT
from conveyor.v1 import events_pb2, jobs_pb2
from services.notifier.hub import Hub, Watcher

JOB = "7c1d0c4e-0000-4000-8000-000000000001"


def running(seq: int, attempt: int = 1) -> events_pb2.JobEvent:
    return events_pb2.JobEvent(
        job_id=JOB,
        sequence=seq,
        tenant="t",
        status_changed=events_pb2.StatusChanged(
            status=jobs_pb2.JOB_STATUS_RUNNING, attempt=attempt
        ),
    )


def delta(seq: int, text: str, pieces: int, attempt: int = 1) -> events_pb2.JobEvent:
    return events_pb2.JobEvent(
        job_id=JOB,
        sequence=seq,
        tenant="t",
        token_delta=events_pb2.TokenDelta(text=text, attempt=attempt, output_tokens=pieces),
    )


def bus_message(body: bytes, content_type: str = EVENT_CONTENT_TYPE) -> AbstractIncomingMessage:
    message: Any = SimpleNamespace(
        body=body, headers={}, routing_key="job.x.t", content_type=content_type
    )
    return cast(AbstractIncomingMessage, message)


async def feed(hub: Hub, *events: events_pb2.JobEvent) -> None:
    for event in events:
        await hub.on_message(bus_message(event.SerializeToString()))


def texts(events: list[events_pb2.JobEvent]) -> str:
    return "".join(e.token_delta.text for e in events)


async def test_a_log_started_by_the_running_event_replays_the_whole_attempt() -> None:
    hub = Hub()
    await feed(hub, running(10), delta(11, "a", 1), delta(13, "bc", 3), delta(14, "d", 4))

    log = hub.logs[JOB]
    assert log.covers(10) and log.count == 4
    assert texts(log.after(10)) == "abcd"
    assert texts(log.after(11)) == "bcd", "resuming after a delta gives the rest"
    assert texts(log.after(14)) == ""


async def test_a_log_joined_mid_attempt_replays_only_what_follows_its_first_delta() -> None:
    hub = Hub()
    await feed(hub, delta(13, "bc", 3), delta(14, "d", 4))

    log = hub.logs[JOB]
    assert not log.covers(10) and not log.covers(12)
    assert log.covers(13) and texts(log.after(13)) == "d"


async def test_deltas_of_an_attempt_that_was_taken_over_are_ignored() -> None:
    hub = Hub()
    await feed(hub, running(10, attempt=1), delta(11, "old", 1, attempt=1))
    await feed(hub, running(1_000_012, attempt=2), delta(13, "zombie", 3, attempt=1))
    await feed(hub, delta(1_000_013, "new", 1, attempt=2))

    log = hub.logs[JOB]
    assert log.attempt == 2 and texts(log.after(0)) == "new"


async def test_a_log_over_its_cap_drops_its_oldest_deltas_and_says_so() -> None:
    hub = Hub(job_log_bytes=1500)
    await feed(hub, running(10), *(delta(10 + i, "x" * 100, i) for i in range(1, 21)))

    log = hub.logs[JOB]
    assert log.nbytes <= 1500 and hub.bytes == log.nbytes
    assert not log.covers(10)
    assert log.covers(log.held_from) and log.after(log.held_from)[0].sequence == log.held_from + 1


async def test_the_workers_answer_completes_a_log_joined_mid_attempt_without_overlap() -> None:
    hub = Hub()
    await feed(hub, delta(13, "bc", 3), delta(14, "d", 4))
    answer = TextSoFar(
        JOB, 1, base_seq=10, deltas=[(1, "a", TEXT, 0, "", ""), (3, "bc", TEXT, 0, "", "")]
    )

    hub.merge(answer, "t")

    log = hub.logs[JOB]
    assert log.covers(10)
    assert texts(log.after(10)) == "abcd"
    assert [e.sequence for e in log.after(10)] == [11, 13, 14]


async def test_a_watcher_too_far_behind_is_marked_overflowed_and_keeps_what_was_queued() -> None:
    hub = Hub()
    watcher = Watcher("t", limit=3)
    hub.watch_job(watcher, JOB)
    await feed(hub, running(10), *(delta(10 + i, "x", i) for i in range(1, 6)))

    assert watcher.overflowed
    assert [e.sequence for e in watcher.queue] == [10, 11, 12]


async def test_a_dashboard_watcher_gets_no_deltas_unless_it_asked() -> None:
    hub = Hub()
    watcher = Watcher("t", limit=100, deltas=False, labels={"team": "a"})
    hub.watch_tenant(watcher)
    await feed(hub, running(10), delta(11, "x", 1))

    assert [e.WhichOneof("payload") for e in watcher.queue] == ["status_changed"]


async def test_a_lost_bus_connection_ends_every_stream_and_forgets_the_logs() -> None:
    hub = Hub()
    watcher = Watcher("t", limit=100)
    hub.watch_job(watcher, JOB)
    await feed(hub, running(10), delta(11, "a", 1))

    hub.reset()

    assert watcher.broken and not hub.logs and hub.bytes == 0


async def test_a_batch_of_status_changes_reaches_each_jobs_watchers_in_order() -> None:
    hub = Hub()
    other = "7c1d0c4e-0000-4000-8000-000000000002"
    mine, theirs = Watcher("t", 16), Watcher("t", 16)
    hub.watch_job(mine, JOB)
    hub.watch_job(theirs, other)
    first, second = running(10), running(20)
    second.job_id = other
    later = running(30, attempt=2)
    batch = events_pb2.JobEventBatch(
        entries=[
            events_pb2.JobEventBatch.Entry(event=e, traceparent="") for e in (first, second, later)
        ]
    )
    await hub.on_message(bus_message(batch.SerializeToString(), BATCH_CONTENT_TYPE))

    assert [e.sequence for e in mine.queue] == [10, 30]
    assert [e.sequence for e in theirs.queue] == [20]
    assert hub.events_seen == 3
