"""GetStats: a tenant's (or every tenant's) job counts, token totals, run-time
percentiles, costs with their prompt-cache report, and queue depths."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta

from aio_pika.abc import AbstractConnection
from google.protobuf.duration_pb2 import Duration
from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.bus import broker
from conveyor.contract.convert import check_text, timestamp, to_datetime
from conveyor.core.config import Settings
from conveyor.core.errors import InvalidArgument, PermissionDenied
from conveyor.core.pricing import cache_saved_micros
from conveyor.db import job_stats as stats_db
from conveyor.db import tenants as tenants_db
from conveyor.server.auth import Principal
from conveyor.v1 import jobs_pb2


def _token_totals(tokens: Mapping[str, int]) -> jobs_pb2.Usage:
    """Usage of token totals by field name (input_tokens, output_tokens, cache_...)."""
    usage = jobs_pb2.Usage()
    for name, value in tokens.items():
        setattr(usage, name, value)
    return usage


COST_WINDOW = timedelta(hours=24)
"""GetStats's cost window when the request names none: the last 24 hours."""


def _cost_stats(row: stats_db.CostRow) -> jobs_pb2.CostStats:
    """A cost row with its prompt cache report: the share of input read from the cache
    and what those reads saved against the input price."""
    tokens = row.tokens
    read = tokens["cache_read_input_tokens"]
    total_in = read + tokens["input_tokens"] + tokens["cache_creation_input_tokens"]
    return jobs_pb2.CostStats(
        tenant=row.tenant,
        model=row.model,
        lane=row.lane,
        jobs=row.jobs,
        unpriced_jobs=row.unpriced_jobs,
        cost_micros=row.cost_micros,
        tokens=_token_totals(tokens),
        cache_read_ratio=read / total_in if total_in else 0.0,
        cache_saved_micros=cache_saved_micros(row.model, read) or 0,
    )


def _duration(seconds: float | None) -> Duration:
    d = Duration()
    d.FromTimedelta(timedelta(seconds=seconds or 0.0))
    return d


async def get_stats(
    engine: AsyncEngine,
    connection: AbstractConnection,
    settings: Settings,
    caller: Principal,
    request: jobs_pb2.GetStatsRequest,
) -> jobs_pb2.GetStatsResponse:
    """GetStats: job counts, token totals, run-time percentiles, costs and queue depths,
    of the caller's tenant, of another (operators) or of all (operators)."""
    tenant = request.tenant or caller.tenant
    check_text(tenant, "tenant")
    if (request.all_tenants or tenant != caller.tenant) and not caller.operator:
        raise PermissionDenied("only an operator key reads other tenants' statistics")
    until = to_datetime(request.until, "until") if request.HasField("until") else None
    until = until or datetime.now(UTC)
    since = (
        to_datetime(request.since, "since") if request.HasField("since") else until - COST_WINDOW
    )
    if since >= until:
        raise InvalidArgument("since", "must lie before `until`")
    per_tenant: dict[str, stats_db.TenantSummary] = {}
    async with engine.connect() as conn:
        if request.all_tenants:
            summary, per_tenant = await stats_db.stats_all(conn)
            names = await tenants_db.tenant_names(conn)
        else:
            summary = await stats_db.stats(conn, tenant)
            names = [tenant]
        costs = await stats_db.cost_rows(
            conn, None if request.all_tenants else tenant, since, until
        )
    response = jobs_pb2.GetStatsResponse(
        run_time_p50=_duration(summary.run_time_p50_s),
        run_time_p95=_duration(summary.run_time_p95_s),
        tokens=_token_totals(summary.tokens),
        tenant="*" if request.all_tenants else tenant,
        costs=[_cost_stats(row) for row in costs],
        since=timestamp(since),
        until=timestamp(until),
    )
    lanes: dict[str, jobs_pb2.LaneStats] = {
        lane: jobs_pb2.LaneStats(lane=lane) for lane in settings.lanes
    }
    for (lane, status), n in summary.counts.items():
        response.counts[status] = response.counts[status] + n
        lanes.setdefault(lane, jobs_pb2.LaneStats(lane=lane)).counts[status] = n
    for name, part in sorted(per_tenant.items()):
        response.tenants.append(
            jobs_pb2.TenantStats(tenant=name, counts=part.counts, tokens=_token_totals(part.tokens))
        )
    # A tenant's statistics count its own queues only. The shared lane queues and
    # the dead-letter queue hold every tenant's messages: only an operator sees
    # their depths (all-tenant statistics, or any tenant's with fairness off);
    # anyone else gets them left out (0), never other tenants' figures.
    shared = caller.operator and (request.all_tenants or not settings.fair_tenants)
    wanted: list[tuple[str, str]] = []
    for lane in lanes:
        if settings.fair_tenants:
            wanted += [(lane, broker.tenant_lane_queue(lane, name)) for name in names]
        if shared:
            wanted.append((lane, broker.lane_queue(lane)))
    extra = [broker.DEAD_LETTER_QUEUE] if caller.operator else []
    depths = await broker.queue_depths(connection, [q for _, q in wanted] + extra)
    for lane, queue in wanted:
        lanes[lane].queue_depth += depths.get(queue, 0)
    if caller.operator:
        response.dead_letter_depth = depths.get(broker.DEAD_LETTER_QUEUE, 0)
    response.lanes.extend(lanes.values())
    return response
