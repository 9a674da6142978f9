"""Control messages of lane pauses and worker drains, on the events exchange.

The state itself lives in Postgres (`lane_pauses`, `workers.drain_requested_at`):
a message only tells running workers to act now rather than at their next
periodic read, so a lost message delays an action, never loses it.

- `control.lanes.<tenant|all>`: the lane pauses changed; workers read them again.
- `control.drain`: body = a worker id; that worker drains (finishes its calls,
  takes no new ones, exits).
"""

from __future__ import annotations

import aio_pika
from aio_pika.abc import AbstractExchange, DeliveryMode

LANES_BINDING = "control.lanes.*"
DRAIN_KEY = "control.drain"


def lanes_key(tenant: str) -> str:
    """Routing key of a lane-pause change of a tenant ("*" for every tenant: `all`)."""
    return f"control.lanes.{'all' if tenant == '*' else tenant}"


async def publish_control(events: AbstractExchange, routing_key: str, body: str) -> None:
    """Send a control message: transient and unroutable-is-fine, since each receiver also
    reads the state it is told about from Postgres when it starts."""
    await events.publish(
        aio_pika.Message(body=body.encode(), delivery_mode=DeliveryMode.NOT_PERSISTENT),
        routing_key=routing_key,
        mandatory=False,
    )


async def publish_lanes_changed(events: AbstractExchange, tenant: str) -> None:
    await publish_control(events, lanes_key(tenant), tenant)


async def publish_drain(events: AbstractExchange, worker_id: str) -> None:
    await publish_control(events, DRAIN_KEY, worker_id)
