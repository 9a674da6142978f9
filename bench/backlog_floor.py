"""The floor under RabbitMQ's memory for a backlog of queued jobs.

Each measurement starts a RabbitMQ node of its own (devtools.sandbox.PrivateRabbit,
nothing else on it), reads its resident memory idle, fills one durable queue with
`messages` persistent messages (publisher confirms), waits for the queue to settle
and reads it again:

- a lane queue as Conveyor declares it (lazy, priority, dead-letter exchange) with
  job messages as the outbox publishes them (job pointer body, traceparent and
  publish-time headers, message id, priority 0);
- the smallest persistent message (empty body, no properties) in a lazy queue of
  format version 2 without priorities: what RabbitMQ itself needs per message.

The idle node's RSS bounds the backlog's RSS from below whatever the queues do; per
message, the queue process's own memory (`rabbitmqctl list_queues memory`) over the
messages (the node's RSS change is within the noise of a node settling after boot).

    python -m bench.backlog_floor [--messages N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aio_pika

from bench.harness import memory_kb
from conveyor.bus import broker
from devtools.sandbox import PrivateRabbit

MB = 1024 * 1024
SETTLE_S = 5.0
IN_FLIGHT = 500


async def _fill(url: str, arguments: dict[str, Any], messages: int, job_shaped: bool) -> None:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        queue = await channel.declare_queue("backlog", durable=True, arguments=arguments)
        slots = asyncio.Semaphore(IN_FLIGHT)

        async def one() -> None:
            if job_shaped:
                traceparent = f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01"
                headers = {"traceparent": traceparent, broker.PUBLISHED_AT_HEADER: time.time_ns()}
                job = broker.JobMessage(uuid.uuid4(), "default")
                message = broker.job_amqp_message(job, 0, headers)
            else:
                message = aio_pika.Message(b"", delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
            async with slots:
                await channel.default_exchange.publish(message, routing_key=queue.name)

        await asyncio.gather(*(one() for _ in range(messages)))


def _queue_bytes(node: PrivateRabbit) -> int:
    rows = json.loads(node.ctl("list_queues", "-q", "memory", "--formatter", "json"))
    return sum(int(row.get("memory") or 0) for row in rows)


def _rss_bytes(node: PrivateRabbit) -> int:
    pid = node.pid()
    return memory_kb(pid).get("VmRSS", 0) * 1024 if pid is not None else 0


def _one_node(
    label: str, arguments: dict[str, Any], messages: int, job_shaped: bool
) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="backlog-floor-") as root:
        node = PrivateRabbit(Path(root), f"backlog-floor-{uuid.uuid4().hex[:8]}")
        try:
            node.start()
            time.sleep(SETTLE_S)
            idle = _rss_bytes(node)
            asyncio.run(_fill(node.amqp_url, arguments, messages, job_shaped))
            time.sleep(SETTLE_S)
            full = _rss_bytes(node)
            queue = _queue_bytes(node)
        finally:
            node.remove()
    return {
        f"{label}: node RSS idle (MB)": idle / MB,
        f"{label}: node RSS with {messages:,} queued (MB)": full / MB,
        f"{label}: queue process memory per message (bytes)": queue / messages,
    }


def measure(messages: int) -> dict[str, float]:
    """The figures above, labelled with their unit."""
    lazy_plain = {"x-queue-type": "classic", "x-queue-mode": "lazy", "x-queue-version": 2}
    return _one_node("lane queue, job messages", broker._lane_arguments(9), messages, True) | (
        _one_node("lazy queue, empty persistent messages", lazy_plain, messages, False)
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.backlog_floor", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--messages", type=int, default=100_000, help="messages queued")
    args = parser.parse_args(argv)
    for label, value in measure(args.messages).items():
        print(f"  {label}: {value:,.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
