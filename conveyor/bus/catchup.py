"""Text so far, and who watches: the notifier's side of the worker's token deltas.

A worker publishes an attempt's token deltas only while a notifier watches it
(services.worker.interest). The registration is the text-so-far request: a notifier
that needs an attempt's deltas asks the worker running it (`control.text.<tenant>`,
bound by each worker's control queue; only the worker holding that attempt
answers) and names itself; the worker marks the attempt watched and, in the same
step, publishes the deltas it had not published and answers with every delta so far.
A request without a reply queue only registers (the notifier saw the RUNNING event
and receives everything on the bus). `control.unwatch.<tenant>` releases a watch;
`control.interest.<tenant>` is a lease on every attempt of a tenant (tenant-wide
watches), repeated while such a watch lasts.

The worker keeps the text of the attempts it runs in memory anyway (it makes the
result) and notes where each delta ends, published or not, so answering costs it
nothing on the hot path; nothing is written to Postgres per token. The answer gives
the deltas exactly as they are published (same pieces, same sequence numbers, built
by conveyor.bus.events.delta_event), so a stream mixing answered and live deltas is
the same as a live one. The answer holds every delta of the attempt up to the moment
the worker read it; the notifier's live subscription began before the request, and
every later delta is published, so the answer and the live stream overlap instead of
leaving a gap, and sequence numbers remove the overlap.

No answer within the timeout means no worker runs that attempt any more (it just
ended, or its worker is gone): the caller decides from Postgres what that means.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Protocol

import aio_pika
import orjson
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractIncomingMessage, DeliveryMode

from conveyor.bus.broker import (
    INTEREST_BINDING,
    TEXT_REQUEST_BINDING,
    UNWATCH_BINDING,
    interest_key,
    text_request_key,
    unwatch_key,
)
from conveyor.bus.events import delta_event
from conveyor.v1 import events_pb2

log = logging.getLogger(__name__)

Delta = tuple[int, str, int, int, str, str]
"""(output_tokens, text, kind, block index, block_json, citation_json) of one delta as
the worker sent it (see events.proto TokenDelta; the JSON as text): its sequence number
is the RUNNING event's plus output_tokens."""


class Holder(Protocol):
    """The worker's side: the attempts it runs and who watches them."""

    def text_so_far(
        self, job_id: uuid.UUID, attempt: int, watcher: str | None = None
    ) -> tuple[int, list[Delta]] | None:
        """(sequence of the attempt's RUNNING event, its deltas so far), or None if this
        worker does not run it; with `watcher`, that notifier now watches it."""

    def unwatch(self, job_id: uuid.UUID, attempt: int, watcher: str) -> None:
        """The notifier `watcher` no longer watches the attempt."""

    def tenant_interest(self, tenant: str, lease_s: float) -> None:
        """Publish every attempt of `tenant` for `lease_s` seconds."""


@dataclass(frozen=True)
class TextSoFar:
    """The deltas of one attempt so far, exactly as the worker published them (the same
    text in the same pieces, under the same sequence numbers)."""

    job_id: str
    attempt: int
    base_seq: int
    deltas: list[Delta]

    @property
    def last_seq(self) -> int:
        return self.base_seq + (self.deltas[-1][0] if self.deltas else 0)

    @property
    def count(self) -> int:
        return self.deltas[-1][0] if self.deltas else 0

    def events(self, tenant: str, after: int) -> list[events_pb2.JobEvent]:
        """The deltas above sequence number `after` as the events they were published as."""
        now_ns = time.time_ns()
        return [
            delta_event(
                self.job_id,
                tenant,
                self.base_seq + n,
                text,
                self.attempt,
                n,
                kind,
                index,
                block.encode(),
                cited.encode(),
                at_ns=now_ns,
            )
            for n, text, kind, index, block, cited in self.deltas
            if self.base_seq + n > after
        ]


async def serve_text_requests(
    channel: AbstractChannel, exchange: AbstractExchange, holder: Holder
) -> None:
    """Answer notifiers' requests for the text so far of attempts this worker runs, and
    take their watches, releases and tenant leases."""
    queue = await channel.declare_queue(exclusive=True, auto_delete=True)
    for binding in (TEXT_REQUEST_BINDING, UNWATCH_BINDING, INTEREST_BINDING):
        await queue.bind(exchange, binding)

    async def on_request(message: AbstractIncomingMessage) -> None:
        key = message.routing_key or ""
        try:
            request = orjson.loads(message.body)
            if key.startswith("control.interest."):
                holder.tenant_interest(key.split(".", 2)[2], float(request["lease_s"]))
                return
            job_id, attempt = uuid.UUID(request["job_id"]), int(request["attempt"])
            watcher = request.get("watcher")
            if watcher is not None and not isinstance(watcher, str):
                raise TypeError("watcher")
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            log.warning("malformed control message dropped", extra={"routing_key": key})
            return
        if key.startswith("control.unwatch."):
            if watcher is not None:
                holder.unwatch(job_id, attempt, watcher)
            return
        found = holder.text_so_far(job_id, attempt, watcher)
        if found is None or not message.reply_to:
            return  # another worker runs it, nobody does, or a registration only
        base_seq, deltas = found
        body = orjson.dumps(
            {"job_id": str(job_id), "attempt": attempt, "base_seq": base_seq, "deltas": deltas}
        )
        with contextlib.suppress(Exception):  # the asker gives up after its timeout anyway
            await channel.default_exchange.publish(
                aio_pika.Message(
                    body=body,
                    correlation_id=message.correlation_id,
                    delivery_mode=DeliveryMode.NOT_PERSISTENT,
                ),
                routing_key=message.reply_to,
            )

    await queue.consume(on_request, no_ack=True)


class TextSoFarClient:
    """The notifier's side: ask for an attempt's text so far and wait for the answer
    (which also registers the watch of `watcher`, this notifier's id, if given);
    register, release and lease watches.

    Concurrent requests for the same attempt share one round trip.
    """

    def __init__(
        self, channel: AbstractChannel, exchange: AbstractExchange, watcher: str | None = None
    ) -> None:
        self.channel = channel
        self.exchange = exchange
        self.watcher = watcher
        self.reply_queue = ""
        self._waiting: dict[str, asyncio.Future[TextSoFar]] = {}
        self._shared: dict[tuple[str, int], asyncio.Task[TextSoFar | None]] = {}

    async def start(self) -> None:
        queue = await self.channel.declare_queue(exclusive=True, auto_delete=True)
        self.reply_queue = queue.name
        await queue.consume(self._on_reply, no_ack=True)

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        future = self._waiting.pop(message.correlation_id or "", None)
        if future is None or future.done():
            return
        try:
            data = orjson.loads(message.body)
            future.set_result(
                TextSoFar(
                    job_id=str(data["job_id"]),
                    attempt=int(data["attempt"]),
                    base_seq=int(data["base_seq"]),
                    deltas=[
                        (int(n), str(t), int(k), int(i), str(b), str(c))
                        for n, t, k, i, b, c in data["deltas"]
                    ],
                )
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            future.set_exception(ValueError(f"malformed text reply: {exc}"))

    async def fetch(
        self,
        tenant: str,
        job_id: str,
        attempt: int,
        timeout_s: float,  # noqa: ASYNC109 - a wait for an answer, passed on as an expiry
    ) -> TextSoFar | None:
        """The attempt's deltas so far, or None if no worker answered in time."""
        key = (job_id, attempt)
        task = self._shared.get(key)
        if task is None:
            task = asyncio.create_task(self._fetch(tenant, job_id, attempt, timeout_s))
            self._shared[key] = task
            task.add_done_callback(lambda _: self._shared.pop(key, None))
        return await asyncio.shield(task)

    async def _fetch(
        self,
        tenant: str,
        job_id: str,
        attempt: int,
        timeout_s: float,  # noqa: ASYNC109
    ) -> TextSoFar | None:
        correlation = uuid.uuid4().hex
        future: asyncio.Future[TextSoFar] = asyncio.get_running_loop().create_future()
        self._waiting[correlation] = future
        try:
            await self.exchange.publish(
                aio_pika.Message(
                    body=self._body(job_id, attempt),
                    correlation_id=correlation,
                    reply_to=self.reply_queue,
                    expiration=timeout_s,
                    delivery_mode=DeliveryMode.NOT_PERSISTENT,
                ),
                routing_key=text_request_key(tenant),
                mandatory=False,
            )
            return await asyncio.wait_for(future, timeout_s)
        except (TimeoutError, ValueError):
            return None
        finally:
            self._waiting.pop(correlation, None)

    def _body(self, job_id: str, attempt: int) -> bytes:
        request: dict[str, object] = {"job_id": job_id, "attempt": attempt}
        if self.watcher is not None:
            request["watcher"] = self.watcher
        return orjson.dumps(request)

    async def _control(self, routing_key: str, body: bytes) -> None:
        await self.exchange.publish(
            aio_pika.Message(body=body, delivery_mode=DeliveryMode.NOT_PERSISTENT),
            routing_key=routing_key,
            mandatory=False,
        )

    async def register(self, tenant: str, job_id: str, attempt: int) -> None:
        """Watch the attempt without asking for its text so far (the RUNNING event was
        seen here: its deltas, all of them, come on the bus)."""
        await self._control(text_request_key(tenant), self._body(job_id, attempt))

    async def unwatch(self, tenant: str, job_id: str, attempt: int) -> None:
        """No longer watch the attempt."""
        await self._control(unwatch_key(tenant), self._body(job_id, attempt))

    async def lease(self, tenant: str, lease_s: float) -> None:
        """Have every attempt of `tenant` published for `lease_s` seconds."""
        await self._control(interest_key(tenant), orjson.dumps({"lease_s": lease_s}))
