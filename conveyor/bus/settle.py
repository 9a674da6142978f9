"""What becomes of a delivered message: the one place a handler's outcome turns into
ack, nack or reject (as aio-pika's `patterns/master.py` does for its workers).

A consumer's handler returns an `Outcome` instead of settling the message itself:

- `ACK`: handled, or nothing left to do (the job row is the record): off the queue.
- `requeue(after_s)`: not handled now (a lost connection, a paused lane): back on its
  queue, after a pause so that a message nobody can handle yet does not loop.
- `REJECT`: never handleable (it cannot be parsed, or handling it failed for no
  transient reason): to the queue's dead-letter exchange, or dropped where there is none.

`consumer()` wraps a handler into the callback aio-pika calls, and maps an exception
the handler raised to an outcome through the caller's `on_error`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from enum import Enum
from typing import Any

from aio_pika.abc import AbstractIncomingMessage

log = logging.getLogger(__name__)


class Settle(Enum):
    ACK = "ack"
    REQUEUE = "requeue"
    REJECT = "reject"


@dataclass(frozen=True)
class Outcome:
    settle: Settle
    after_s: float = 0.0
    """For a requeue: how long the message stays unacknowledged first."""


ACK = Outcome(Settle.ACK)
REJECT = Outcome(Settle.REJECT)


def requeue(after_s: float = 0.0) -> Outcome:
    return Outcome(Settle.REQUEUE, after_s)


async def settle(message: AbstractIncomingMessage, outcome: Outcome) -> None:
    """Settle `message` as `outcome` says. A closed channel cannot settle anything, and
    RabbitMQ then redelivers the message by itself, so that failure is ignored."""
    if outcome.after_s > 0:
        await asyncio.sleep(outcome.after_s)
    with contextlib.suppress(Exception):
        match outcome.settle:
            case Settle.ACK:
                await message.ack()
            case Settle.REQUEUE:
                await message.nack(requeue=True)
            case Settle.REJECT:
                await message.reject(requeue=False)


Handler = Callable[[AbstractIncomingMessage], Awaitable[Outcome]]
OnError = Callable[[AbstractIncomingMessage, Exception], Outcome]


def consumer(
    handler: Handler, on_error: OnError
) -> Callable[[AbstractIncomingMessage], Coroutine[Any, Any, None]]:
    """The callback for `queue.consume`: run `handler`, then settle the message as it
    says; an exception is settled as `on_error` says (it logs what it needs to)."""

    async def consume(message: AbstractIncomingMessage) -> None:
        try:
            outcome = await handler(message)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            outcome = on_error(message, exc)
        await settle(message, outcome)

    return consume
