"""RabbitMQ: the topology, declared in this one place, and the job messages.

```
conveyor.jobs (direct) ──<lane>.<tenant>──▶ conveyor.lane.<lane>.<tenant>  (classic, durable,
                       ──<lane>──────────▶ conveyor.lane.<lane>             lazy, x-max-priority, DLX)
conveyor.dlx (fanout) ─────────▶ conveyor.dead          (dispatcher consumes)
(default exchange) ────────────▶ conveyor.webhooks      (durable; webhook deliveries,
                                                         consumed by the notifiers)
conveyor.events (topic, job.<status|delta>.<tenant>) ──▶ one queue per notifier
                (control.cancel.<tenant>, control.text.<tenant>, control.unwatch.<tenant>,
                 control.interest.<tenant>, control.tenant.<tenant>,
                 control.tenants.query) ──▶ one control queue per worker / publisher
```

Each tenant has its own queue per lane (fair sharing): a worker consumes every
tenant's queue of its lanes on one channel, and when one of its prefetch slots
frees up RabbitMQ offers it to those queues in turn (the channel's limiter
notifies blocked queues in a random rotation), so a tenant's backlog takes its
share of the workers, not all of them. Priority orders each queue. A tenant's
queues are declared by the first publisher that needs them, which then
announces the tenant (`control.tenant.<tenant>`) so that running workers start
consuming them; a starting worker reads the tenant list from Postgres and asks
publishers to announce again (`control.tenants.query`). The shared
`conveyor.lane.<lane>` queues serve CONVEYOR_FAIR_TENANTS=false.

Declaring is idempotent, so every service declares the whole topology at start.
Lanes are classic queues because quorum queues reject `x-max-priority`. They are
lazy (`x-queue-mode: lazy`, what RabbitMQ 3.12 does anyway) in the version 2
on-disk format (`x-queue-version: 2`): a waiting job's message lives on disk, not
in the broker's memory, which a non-lazy classic queue would otherwise fill with
every persistent message of a backlog. The queues keep one broker priority level
per contract priority (`x-max-priority` = CONVEYOR_MAX_PRIORITY): fewer levels
would not shrink a lazy queue's backlog, only each queue's fixed cost (a
sub-queue per level). A lane queue declared earlier with other arguments is used
as it is, with a warning (`declare_lane_queues`), since RabbitMQ refuses to
redeclare it.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import aio_pika
import aiormq
import orjson
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractQueue,
    AbstractRobustConnection,
    DeliveryMode,
    ExchangeType,
)
from aiormq.abc import ChannelFrame
from pamqp import commands as spec
from pamqp.body import ContentBody
from pamqp.header import ContentHeader

from conveyor.bus.control import publish_control

log = logging.getLogger(__name__)
T = TypeVar("T")

JOBS_EXCHANGE = "conveyor.jobs"
DEAD_LETTER_EXCHANGE = "conveyor.dlx"
DEAD_LETTER_QUEUE = "conveyor.dead"
EVENTS_EXCHANGE = "conveyor.events"
WEBHOOKS_QUEUE = "conveyor.webhooks"
"""Webhook deliveries due now (a delivery id per message), relayed from Postgres."""
JOB_CONTENT_TYPE = "application/vnd.conveyor.job+json"
PUBLISHED_AT_HEADER = "x-conveyor-published-at-ns"
"""Header with the publish time (ns since the epoch): the worker measures queue wait from it."""


def lane_queue(lane: str) -> str:
    """Name of the queue shared by every tenant's jobs of a lane (fairness off)."""
    return f"conveyor.lane.{lane}"


def tenant_lane_queue(lane: str, tenant: str) -> str:
    """Name of the queue that holds one tenant's jobs of a lane."""
    return f"conveyor.lane.{lane}.{tenant}"


def job_routing_key(lane: str, tenant: str | None) -> str:
    """Routing key of a job on `conveyor.jobs`: its tenant's lane queue, or the shared one."""
    return lane if tenant is None else f"{lane}.{tenant}"


def lane_of(routing_key: str | None) -> str:
    """The lane of a job's routing key (`<lane>` or `<lane>.<tenant>`)."""
    return (routing_key or "").split(".", 1)[0]


def event_routing_key(kind: str, tenant: str) -> str:
    """Routing key on the events exchange: `job.<status|delta>.<tenant>`."""
    return f"job.{kind}.{tenant}"


@dataclass(frozen=True)
class Topology:
    """The exchanges and queues every service shares."""

    jobs: AbstractExchange
    dead_letters: AbstractExchange
    events: AbstractExchange
    lanes: dict[str, AbstractQueue]
    dead_queue: AbstractQueue
    webhooks: AbstractQueue


async def connect(url: str, name: str) -> AbstractRobustConnection:
    """A connection that reconnects by itself after a broker restart."""
    return await aio_pika.connect_robust(url, client_properties={"connection_name": name})


async def declare_topology(
    channel: AbstractChannel, lanes: tuple[str, ...], max_priority: int
) -> Topology:
    """Declare (idempotently) every exchange and queue, and bind them."""
    jobs = await channel.declare_exchange(JOBS_EXCHANGE, ExchangeType.DIRECT, durable=True)
    dlx = await channel.declare_exchange(DEAD_LETTER_EXCHANGE, ExchangeType.FANOUT, durable=True)
    events = await channel.declare_exchange(EVENTS_EXCHANGE, ExchangeType.TOPIC, durable=True)
    dead_queue = await channel.declare_queue(
        DEAD_LETTER_QUEUE, durable=True, arguments={"x-queue-type": "classic"}
    )
    await dead_queue.bind(dlx, routing_key="")
    webhooks = await channel.declare_queue(
        WEBHOOKS_QUEUE, durable=True, arguments={"x-queue-type": "classic"}
    )
    queues = await declare_lane_queues(
        channel, {lane: lane_queue(lane) for lane in lanes}, _lane_arguments(max_priority)
    )
    for lane, queue in queues.items():
        await queue.bind(jobs, routing_key=lane)
    return Topology(
        jobs=jobs,
        dead_letters=dlx,
        events=events,
        lanes=queues,
        dead_queue=dead_queue,
        webhooks=webhooks,
    )


def _lane_arguments(max_priority: int) -> dict[str, Any]:
    """A lane queue's arguments: a lazy classic priority queue (format version 2) whose
    rejected and expired messages go to the dead-letter exchange."""
    return {
        "x-queue-type": "classic",
        "x-queue-mode": "lazy",
        "x-queue-version": 2,
        "x-max-priority": max_priority,
        "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
    }


async def declare_lane_queues(
    channel: AbstractChannel, names: Mapping[str, str], arguments: dict[str, Any]
) -> dict[str, AbstractQueue]:
    """Declare durable queues (lane -> queue name) with `arguments`.

    A queue that already exists with other arguments (declared by an older Conveyor,
    or with another CONVEYOR_MAX_PRIORITY) is declared passively and used as it is,
    with a warning: RabbitMQ never changes a queue's arguments, and refuses a declare
    with other ones (PRECONDITION_FAILED) by closing the channel. The arguments are
    therefore tried on a channel of their own, so that `channel`, which may carry
    consumers and unconfirmed publishes, stays open."""
    refused = await _refused_queues(channel, names.values(), arguments)
    queues: dict[str, AbstractQueue] = {}
    for lane, name in names.items():
        if name in refused:
            queues[lane] = await channel.declare_queue(name, durable=True, passive=True)
        else:
            queues[lane] = await channel.declare_queue(name, durable=True, arguments=arguments)
    return queues


_warned: set[str] = set()
"""Queues this process has warned about (once each)."""


async def _refused_queues(
    channel: AbstractChannel, names: Collection[str], arguments: dict[str, Any]
) -> set[str]:
    """The queues among `names` that exist with arguments other than `arguments`
    (the others are declared by the way)."""
    connection = (await channel.get_underlay_channel()).connection
    refused: set[str] = set()
    probe = await connection.channel(publisher_confirms=False)
    try:
        for name in names:
            try:
                await probe.queue_declare(name, durable=True, arguments=arguments)
            except aiormq.exceptions.ChannelPreconditionFailed as exc:
                refused.add(name)
                _warn_refused(name, arguments, exc)
                probe = await connection.channel(publisher_confirms=False)
    finally:
        if not probe.is_closed:
            await probe.close()
    return refused


def _warn_refused(name: str, arguments: dict[str, Any], exc: Exception) -> None:
    if name in _warned:
        return
    _warned.add(name)
    log.warning(
        "queue %s exists with other arguments and is used as it is; to give it %s, delete it"
        " while it is empty and no service runs (rabbitmqctl delete_queue %s --if-empty):"
        " the next service to start declares it again",
        name,
        arguments,
        name,
        extra={"queue": name, "refused": str(exc)},
    )


async def declare_tenant_lanes(
    channel: AbstractChannel, tenant: str, lanes: tuple[str, ...], max_priority: int
) -> dict[str, AbstractQueue]:
    """Declare (idempotently) a tenant's queue of every lane, bound to `conveyor.jobs`."""
    jobs = await channel.declare_exchange(JOBS_EXCHANGE, ExchangeType.DIRECT, durable=True)
    queues = await declare_lane_queues(
        channel,
        {lane: tenant_lane_queue(lane, tenant) for lane in lanes},
        _lane_arguments(max_priority),
    )
    for lane, queue in queues.items():
        await queue.bind(jobs, routing_key=job_routing_key(lane, tenant))
    return queues


@dataclass(frozen=True)
class JobMessage:
    """What a lane queue carries: a pointer to the job row, not the request."""

    job_id: uuid.UUID
    tenant: str

    def encode(self) -> bytes:
        return orjson.dumps({"job_id": str(self.job_id), "tenant": self.tenant})

    @classmethod
    def decode(cls, body: bytes) -> JobMessage:
        """Parse a message body; raises ValueError when it is not a job message."""
        try:
            data = orjson.loads(body)
            return cls(job_id=uuid.UUID(data["job_id"]), tenant=str(data["tenant"]))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"not a job message: {exc}") from exc


def job_amqp_message(
    message: JobMessage, priority: int, headers: dict[str, Any] | None = None
) -> aio_pika.Message:
    """The persistent AMQP message that queues one job."""
    return aio_pika.Message(
        body=message.encode(),
        content_type=JOB_CONTENT_TYPE,
        delivery_mode=DeliveryMode.PERSISTENT,
        priority=priority,
        message_id=str(message.job_id),
        headers=headers or {},
    )


async def publish_job(
    exchange: AbstractExchange,
    message: JobMessage,
    lane: str,
    priority: int,
    headers: dict[str, Any] | None = None,
    routing_key: str | None = None,
    timeout_s: float | None = None,
) -> None:
    """Publish a job to its lane (its tenant's queue with `routing_key`) and wait for
    the broker's confirm (TimeoutError after `timeout_s`)."""
    await exchange.publish(
        job_amqp_message(message, priority, headers),
        routing_key=routing_key or lane,
        mandatory=True,
        timeout=timeout_s,
    )


@dataclass(frozen=True)
class JobPublish:
    """One job's message and where it goes (`publish_jobs`)."""

    message: JobMessage
    routing_key: str
    priority: int
    headers: dict[str, Any]


class Unroutable(Exception):
    """The broker returned a job's message: no queue is bound to its routing key."""


PUBLISH_CHUNK = 500
"""Messages written to the socket together at most."""


async def publish_jobs(
    exchange: AbstractExchange, jobs: Sequence[JobPublish], timeout_s: float | None = None
) -> list[BaseException | None]:
    """Publish jobs (persistent, mandatory) and wait for the broker's confirms; for each
    job, None once confirmed, else why not (the error, a TimeoutError after `timeout_s`,
    `Unroutable`).

    The messages of up to PUBLISH_CHUNK jobs are written to the socket together, with
    one drain and one timer: aiormq's `basic_publish` takes the channel lock, a timer,
    a write and a drain per message, which cost a busy gateway more than anything else
    it does per job. Delivery tags and confirms are kept as `basic_publish` keeps them,
    so both can publish on the same channel; a channel that is not aiormq's with
    confirms (never the case here) publishes message by message.
    """
    if not jobs:
        return []
    channel = None
    if isinstance(exchange, aio_pika.Exchange):
        try:
            channel = await exchange.channel.get_underlay_channel()
        except Exception as exc:  # closed, or never opened
            return [exc] * len(jobs)
    if not isinstance(channel, aiormq.Channel) or not channel.publisher_confirms:
        return list(
            await asyncio.gather(
                *(_publish_one(exchange, job, timeout_s) for job in jobs), return_exceptions=True
            )
        )
    loop = asyncio.get_running_loop()
    deadline = None if timeout_s is None else loop.time() + timeout_s
    results: list[BaseException | None] = [None] * len(jobs)
    confirms: list[tuple[int, asyncio.Future[Any]]] = []
    for start in range(0, len(jobs), PUBLISH_CHUNK):
        chunk = jobs[start : start + PUBLISH_CHUNK]
        try:
            async with asyncio.timeout_at(deadline):
                futures = await _write_jobs(channel, exchange.name, chunk)
        except Exception as exc:  # not written, or not known to be: the outbox's
            results[start : start + len(chunk)] = [exc] * len(chunk)
            continue
        confirms.extend(enumerate(futures, start))
    if confirms:
        remaining = None if deadline is None else max(0.0, deadline - loop.time())
        await asyncio.wait([f for _, f in confirms], timeout=remaining)
    # A confirm still due is left to come (or to fail with the channel), not cancelled:
    # aiormq answers a returned message on its future whatever the future's state.
    for i, future in confirms:
        if not future.done():
            results[i] = TimeoutError(f"no confirm within {timeout_s} s")
        elif future.cancelled():
            results[i] = asyncio.CancelledError()
        elif (error := future.exception()) is not None:
            results[i] = error
        elif not isinstance(future.result(), spec.Basic.Ack):  # returned: unroutable
            results[i] = Unroutable(f"no queue is bound to {jobs[i].routing_key!r}")
    return results


async def _publish_one(
    exchange: AbstractExchange, job: JobPublish, timeout_s: float | None
) -> None:
    await publish_job(
        exchange,
        job.message,
        lane="",
        priority=job.priority,
        headers=job.headers,
        routing_key=job.routing_key,
        timeout_s=timeout_s,
    )


async def _write_jobs(
    channel: aiormq.Channel, exchange: str, jobs: Sequence[JobPublish]
) -> list[asyncio.Future[Any]]:
    """Write the jobs' messages to the channel in one frame of frames and wait for the
    write's drain; their confirms' futures, in order (what `basic_publish` does for one
    message, for many: see aiormq's `Channel.basic_publish`)."""
    frames: list[Any] = []
    ids: list[str] = []
    for job in jobs:
        body = job.message.encode()
        if len(body) >= channel.max_content_size:  # a job pointer is ~80 bytes
            raise ValueError("a job message larger than a frame")
        message_id = str(job.message.job_id)
        ids.append(message_id)
        properties = spec.Basic.Properties(
            content_type=JOB_CONTENT_TYPE,
            delivery_mode=DeliveryMode.PERSISTENT.value,
            priority=job.priority,
            message_id=message_id,
            headers=job.headers,
        )
        frames.append(
            spec.Basic.Publish(exchange=exchange, routing_key=job.routing_key, mandatory=True)
        )
        frames.append(ContentHeader(properties=properties, body_size=len(body)))
        frames.append(ContentBody(body))
    drained: asyncio.Future[Any] = channel.create_future()
    payload = ChannelFrame.marshall(channel.number, frames, drained)
    async with channel.lock:
        first = channel.delivery_tag + 1
        futures: list[asyncio.Future[Any]] = []
        for tag, message_id in enumerate(ids, first):
            future: asyncio.Future[Any] = channel.create_future()
            channel.confirmations[tag] = future
            channel.message_id_delivery_tag[message_id] = tag
            futures.append(future)
        channel.delivery_tag = first + len(ids) - 1
        sent = False
        try:
            await channel.write_queue.put(payload)
            sent = True
            for tag, (message_id, future) in enumerate(zip(ids, futures, strict=True), first):
                future.add_done_callback(_forget(channel, message_id, tag))
            await drained
        except BaseException:
            if not sent:  # the broker never saw them: their tags are reused
                channel.delivery_tag = first - 1
                for tag, message_id in enumerate(ids, first):
                    channel.confirmations.pop(tag, None)
                    if channel.message_id_delivery_tag.get(message_id) == tag:
                        del channel.message_id_delivery_tag[message_id]
                for future in futures:
                    future.cancel()
            drained.cancel()
            raise
    return futures


def _forget(channel: aiormq.Channel, message_id: str, tag: int) -> Callable[[Any], None]:
    """Drop a message id's delivery tag once its confirm is in (as `basic_publish` does)."""

    def forget(_: Any) -> None:
        if channel.message_id_delivery_tag.get(message_id) == tag:
            del channel.message_id_delivery_tag[message_id]

    return forget


def cancel_routing_key(tenant: str) -> str:
    """Routing key of the control message asking workers to abort a running job."""
    return f"control.cancel.{tenant}"


CANCEL_BINDING = "control.cancel.#"


async def publish_cancel(events: AbstractExchange, job_id: uuid.UUID, tenant: str) -> None:
    """Tell every worker to abort the job if it is running it."""
    await publish_control(events, cancel_routing_key(tenant), str(job_id))


TENANT_ANNOUNCE_BINDING = "control.tenant.*"
TENANTS_QUERY_KEY = "control.tenants.query"


def tenant_announce_key(tenant: str) -> str:
    """Routing key of the announcement that a tenant's lane queues exist."""
    return f"control.tenant.{tenant}"


async def announce_tenant(events: AbstractExchange, tenant: str) -> None:
    """Tell the workers that `tenant` has lane queues to consume."""
    await publish_control(events, tenant_announce_key(tenant), tenant)


async def ask_for_tenants(events: AbstractExchange) -> None:
    """Ask every publisher to announce the tenants it has declared (a worker starting)."""
    await events.publish(
        aio_pika.Message(body=b"", delivery_mode=DeliveryMode.NOT_PERSISTENT),
        routing_key=TENANTS_QUERY_KEY,
        mandatory=False,
    )


TEXT_REQUEST_BINDING = "control.text.#"
"""Workers bind this: a notifier asks for the text so far of a running attempt (and
registers its watch of that attempt: conveyor.bus.catchup)."""
UNWATCH_BINDING = "control.unwatch.#"
"""Workers bind this: a notifier no longer watches an attempt."""
INTEREST_BINDING = "control.interest.#"
"""Workers bind this: a notifier has a tenant-wide watch (a lease on the tenant's deltas)."""


def text_request_key(tenant: str) -> str:
    """Routing key of a notifier's request for a running attempt's text so far."""
    return f"control.text.{tenant}"


def unwatch_key(tenant: str) -> str:
    """Routing key of a notifier's release of its watch of an attempt."""
    return f"control.unwatch.{tenant}"


def interest_key(tenant: str) -> str:
    """Routing key of a notifier's lease on every delta of a tenant."""
    return f"control.interest.{tenant}"


async def on_existing_queues(
    connection: AbstractConnection,
    names: Iterable[str],
    action: Callable[[AbstractQueue], Awaitable[T]],
) -> dict[str, T]:
    """`action`'s result for each named queue that exists (found by a passive declare);
    a missing queue, or a failed action, is left out.

    A channel of its own, opened again when needed: a passive declare of a missing
    queue (a tenant that never submitted to a lane) closes the channel it ran on.
    """
    results: dict[str, T] = {}
    channel: AbstractChannel | None = None
    try:
        for name in names:
            try:
                if channel is None or channel.is_closed:
                    channel = await connection.channel()
                queue = await channel.declare_queue(name, passive=True)
                results[name] = await action(queue)
            except Exception as exc:  # missing, or the broker away: advisory
                log.debug("queue unavailable", extra={"queue": name, "error": repr(exc)})
    finally:
        if channel is not None and not channel.is_closed:
            await channel.close()
    return results


async def _depth(queue: AbstractQueue) -> int:
    return int(queue.declaration_result.message_count or 0)


async def queue_depths(connection: AbstractConnection, names: Iterable[str]) -> dict[str, int]:
    """Messages ready in each named queue that exists (the passive declare's count)."""
    return await on_existing_queues(connection, names, _depth)


async def _purge(queue: AbstractQueue) -> None:
    await queue.purge()


async def purge_queues(connection: AbstractConnection, names: Iterable[str]) -> None:
    """Empty each named queue that exists (benchmarks and tests start from empty queues)."""
    await on_existing_queues(connection, names, _purge)
