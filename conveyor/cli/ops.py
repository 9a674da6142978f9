"""Operations commands: schedules, bulk actions (with a progress bar), lanes, workers."""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from conveyor.cli import output
from conveyor.cli.base import (
    EXIT_FAILED,
    EXIT_OK,
    KEY_VALUE,
    SECONDS,
    STATUSES,
    _Converting,
    connection,
    connection_options,
    fail,
    run,
)
from conveyor.cli.jobs import json_option
from conveyor.cli.submit import _Namespace, build_submit_request, job_options
from conveyor.client import CATCH_UP_VALUES, ConveyorClient
from conveyor.v1 import jobs_pb2, operations_pb2, schedules_pb2

MAX_LIMIT = 10_000
"""The most jobs one bulk call acts on (the server's bound)."""
QUEUED = (jobs_pb2.JOB_STATUS_PENDING, jobs_pb2.JOB_STATUS_SCHEDULED)


def _datetime(text: str) -> datetime:
    """ISO 8601, e.g. 2026-01-31, 2026-01-31T08:00, 2026-01-31T08:00:00Z (naive: local)."""
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"not an ISO 8601 date or time: {text!r}") from None


DATETIME = _Converting("ISO-8601", _datetime)


# --------------------------------------------------------------------------- schedules


@click.group("schedules")
def schedules() -> None:
    """Recurring jobs: a cron expression (with a time zone) or an interval, and a job."""


@schedules.command("create")
@job_options
@click.option("--cron", default="", metavar="EXPR", help='e.g. "0 3 * * *"')
@click.option("--time-zone", default="", metavar="TZ", help="of the cron (default UTC)")
@click.option("--every", type=SECONDS, default=None, help="an interval in seconds instead")
@click.option("--name", "schedule_name", default="")
@click.option("--catch-up", type=click.Choice(sorted(CATCH_UP_VALUES)), default="skip")
@click.option("--max-catch-up", type=click.IntRange(min=0), default=0)
@click.option("--start", type=DATETIME, default=None, help="first occurrence not before this")
@click.option("--paused", is_flag=True, help="create it paused")
@connection_options
@run
async def schedules_create(**params: Any) -> int:
    """Create a schedule that submits the job described by the flags; print its id."""
    ns = _Namespace(params)
    if bool(ns.cron) == (ns.every is not None):
        return fail("give --cron or --every (one of them)")
    template = build_submit_request(ns)
    async with connection().client() as client:
        schedule = await client.create_schedule(
            template,
            cron=ns.cron,
            time_zone=ns.time_zone,
            interval=timedelta(seconds=ns.every) if ns.every is not None else None,
            name=ns.schedule_name,
            catch_up=ns.catch_up,
            max_catch_up=ns.max_catch_up,
            start_time=ns.start,
            paused=ns.paused,
        )
    print(schedule.id)
    print(f"next run: {output.timestamp(schedule, 'next_fire_time')} UTC", file=sys.stderr)
    return EXIT_OK


def _recurrence(s: schedules_pb2.Schedule) -> str:
    if s.cron:
        return f"{s.cron} ({s.time_zone or 'UTC'})"
    return f"every {output.seconds(s.interval)}"


@schedules.command("list")
@json_option
@connection_options
@run
async def schedules_list(as_json: bool) -> int:
    """The tenant's schedules, oldest first."""
    found: list[schedules_pb2.Schedule] = []
    token = ""
    async with connection().client() as client:
        while True:
            page, token = await client.list_schedules(page_size=100, page_token=token)
            found.extend(page)
            if not token:
                break
    if as_json:
        output.print_json([output.message_dict(s) for s in found])
        return EXIT_OK
    t = output.table("ID", "NAME", "WHEN", "STATE", "NEXT (UTC)", "LAST (UTC)", "CATCH-UP")
    for s in found:
        t.add_row(
            s.id,
            s.name or "-",
            _recurrence(s),
            "[yellow]paused[/]" if s.paused else "active",
            output.timestamp(s, "next_fire_time"),
            output.timestamp(s, "last_fire_time"),
            schedules_pb2.CatchUp.Name(s.catch_up).removeprefix("CATCH_UP_").lower(),
        )
    output.show(t)
    return EXIT_OK


def _schedule_action(
    name: str, doc: str, act: Callable[[ConveyorClient, str], Awaitable[Any]]
) -> None:
    @schedules.command(name, help=doc)
    @click.argument("id")
    @connection_options
    @run
    async def command(id: str) -> int:
        async with connection().client() as client:
            result = await act(client, id)
        if isinstance(result, schedules_pb2.Schedule):
            output.print_json(output.message_dict(result))
        else:
            print(f"{id} {name}d")
        return EXIT_OK


_schedule_action("get", "Print a schedule as JSON.", lambda c, i: c.get_schedule(i))
_schedule_action(
    "pause", "Stop a schedule firing (until resumed).", lambda c, i: c.pause_schedule(i)
)
_schedule_action("resume", "Let a paused schedule fire again.", lambda c, i: c.resume_schedule(i))
_schedule_action("delete", "Delete a schedule (its jobs stay).", lambda c, i: c.delete_schedule(i))


# --------------------------------------------------------------------------- bulk actions


@click.group("bulk")
def bulk() -> None:
    """Cancel, retry or redrive many jobs at once, in audited batches, with a progress bar."""


def filter_options(f: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(
        [
            click.option("--status", "statuses", type=STATUSES, multiple=True),
            click.option("--lane", default=""),
            click.option("--label", type=KEY_VALUE, multiple=True),
            click.option("--model", default=""),
            click.option("--created-after", type=DATETIME, default=None),
            click.option("--created-before", type=DATETIME, default=None),
            click.option("--limit", type=click.IntRange(min=0), default=0, help="0: all"),
            click.option("--batch", type=click.IntRange(1, MAX_LIMIT), default=500),
            click.option("--dry-run", is_flag=True, help="only count the matching jobs"),
            click.option("--yes", is_flag=True, help="do not ask (required when not a terminal)"),
            json_option,
        ]
    ):
        f = option(f)
    return f


@dataclass
class Phase:
    """A filter's statuses for one pass of a bulk action. `once`: one call (for running
    jobs, which still match after being asked to stop), else batches until none match."""

    statuses: list[Any] = field(default_factory=list)
    once: bool = False
    counted: int = 0
    """What its dry run matched (at most 10,000): a phase that matched none is skipped."""


Action = Callable[[int, bool, Phase], Awaitable[operations_pb2.BulkActionResponse]]
"""(limit, dry_run, phase) -> the server's answer."""


async def count(act: Action, phases: list[Phase], limit: int) -> dict[str, Any]:
    """How many jobs the phases match (a dry run each; at most 10,000 per phase)."""
    matched = 0
    for phase in phases:
        wanted = min(limit - matched, MAX_LIMIT) if limit else MAX_LIMIT
        if wanted > 0:
            phase.counted = (await act(wanted, True, phase)).matched
            matched += phase.counted
    return {"matched": matched, "changed": 0, "cancel_requested": 0, "action_ids": []}


async def apply_in_batches(
    what: str, phases: list[Phase], act: Action, limit: int, batch: int, yes: bool
) -> dict[str, Any]:
    """Count with a dry run, confirm, then act in batches of `batch` (each an audited
    action) until nothing more matches or `limit` jobs were acted on, with a progress
    bar on stderr. Acted-on jobs stop matching their phase, so batches make progress."""
    done = await count(act, phases, limit)
    total = done["matched"]
    if total == 0:
        return done
    if not yes:
        if not sys.stdin.isatty():
            raise click.UsageError(f"{total} jobs would be {what}: give --yes to go ahead")
        if not click.confirm(f"{total:,} jobs will be {what}. Go ahead?", err=True):
            raise click.exceptions.Exit(EXIT_FAILED)
    wanted = limit or sys.maxsize
    columns = (TextColumn(what), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=output.console(stderr=True)) as progress:
        task = progress.add_task(what, total=total)
        acted = 0
        for phase in phases:
            while phase.counted and acted < wanted:
                asked = min(MAX_LIMIT if phase.once else batch, wanted - acted)
                result = await act(asked, False, phase)
                moved = result.changed + result.cancel_requested
                done["changed"] += result.changed
                done["cancel_requested"] += result.cancel_requested
                if result.action_id:
                    done["action_ids"].append(result.action_id)
                acted += moved
                progress.update(task, completed=acted, total=max(total, acted))
                if phase.once or moved == 0 or result.matched < asked:
                    break  # fewer than asked matched: the phase is done
    return done


def _report(what: str, done: dict[str, Any], as_json: bool, dry_run: bool) -> int:
    if as_json:
        output.print_json({**done, "dry_run": dry_run})
    elif dry_run:
        print(f"{done['matched']} jobs match (dry run: nothing {what})")
    else:
        extra = f", {done['cancel_requested']} running asked to stop" if what == "cancelled" else ""
        print(f"{done['changed']} jobs {what}{extra} (of {done['matched']} matched)")
    return EXIT_OK


def _filter(p: dict[str, Any], statuses: list[Any]) -> operations_pb2.JobFilter:
    return ConveyorClient.job_filter(
        statuses, p["lane"], dict(p["label"]), p["model"], p["created_after"], p["created_before"]
    )


async def _bulk(what: str, p: dict[str, Any], phases: list[Phase], act: Action) -> int:
    if p["dry_run"]:
        done = await count(act, phases, p["limit"])
    else:
        done = await apply_in_batches(what, phases, act, p["limit"], p["batch"], p["yes"])
    return _report(what, done, p["as_json"], p["dry_run"])


@bulk.command("cancel")
@filter_options
@click.option("--reason", default="cancelled from the CLI (bulk)")
@connection_options
@run
async def bulk_cancel(**p: Any) -> int:
    """Cancel the live jobs a filter matches: queued ones at once, running ones through
    their worker."""
    asked = [s for group in p["statuses"] for s in group]
    queued = [s for s in QUEUED if not asked or s in asked]
    running = [s for s in (jobs_pb2.JOB_STATUS_RUNNING,) if not asked or s in asked]
    if set(asked) - {*queued, *running}:  # the server refuses it, naming the field
        phases = [Phase(asked, once=True)]
    else:
        phases = [ph for ph in (Phase(queued), Phase(running, once=True)) if ph.statuses]
    async with connection().client() as client:

        async def act(limit: int, dry_run: bool, phase: Phase) -> operations_pb2.BulkActionResponse:
            flt = _filter(p, phase.statuses)
            return await client.cancel_jobs(flt, dry_run=dry_run, limit=limit, reason=p["reason"])

        return await _bulk("cancelled", p, phases, act)


@bulk.command("retry")
@filter_options
@connection_options
@run
async def bulk_retry(**p: Any) -> int:
    """Replay the failed and dead jobs a filter matches."""
    statuses = [s for group in p["statuses"] for s in group]
    async with connection().client() as client:

        async def act(limit: int, dry_run: bool, phase: Phase) -> operations_pb2.BulkActionResponse:
            return await client.retry_jobs(_filter(p, phase.statuses), dry_run=dry_run, limit=limit)

        return await _bulk("retried", p, [Phase(statuses)], act)


@bulk.command("redrive")
@click.option("--tenant", default="", help="another tenant's dead jobs (operator keys)")
@click.option("--limit", type=click.IntRange(min=0), default=0, help="0: all")
@click.option("--batch", type=click.IntRange(1, MAX_LIMIT), default=500)
@click.option("--dry-run", is_flag=True, help="only count the dead jobs")
@click.option("--yes", is_flag=True, help="do not ask (required when not a terminal)")
@json_option
@connection_options
@run
async def bulk_redrive(**p: Any) -> int:
    """Replay every dead job of the tenant."""
    async with connection().client() as client:

        async def act(limit: int, dry_run: bool, phase: Phase) -> operations_pb2.BulkActionResponse:
            return await client.redrive_dead(p["tenant"], dry_run=dry_run, limit=limit)

        return await _bulk("redriven", p, [Phase()], act)


# --------------------------------------------------------------------------- lanes, workers


@click.group("lanes")
def lanes() -> None:
    """Pause and resume lanes (live view: conveyor top)."""


def _scope(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option("--all-tenants", is_flag=True, help="every tenant (operator keys)")(f)
    return click.option("--tenant", default="", help="another tenant (operator keys)")(f)


@lanes.command("pause")
@click.argument("lane")
@_scope
@click.option("--reason", default="")
@connection_options
@run
async def lanes_pause(lane: str, tenant: str, all_tenants: bool, reason: str) -> int:
    """Stop workers taking a lane's jobs; they wait, pending."""
    async with connection().client() as client:
        pause = await client.pause_lane(lane, tenant=tenant, all_tenants=all_tenants, reason=reason)
    print(f"lane {pause.lane} paused for {pause.tenant or 'all tenants'}")
    return EXIT_OK


@lanes.command("resume")
@click.argument("lane")
@_scope
@connection_options
@run
async def lanes_resume(lane: str, tenant: str, all_tenants: bool) -> int:
    """Let workers take a paused lane's jobs again."""
    async with connection().client() as client:
        resumed = await client.resume_lane(lane, tenant=tenant, all_tenants=all_tenants)
    print(f"lane {lane} " + ("resumed" if resumed else "was not paused"))
    return EXIT_OK


@lanes.command("list")
@json_option
@connection_options
@run
async def lanes_list(as_json: bool) -> int:
    """The lane pauses that apply to the tenant (an operator sees all)."""
    async with connection().client() as client:
        pauses = await client.lane_pauses()
    if as_json:
        output.print_json([output.message_dict(p) for p in pauses])
        return EXIT_OK
    t = output.table("LANE", "TENANT", "PAUSED BY", "SINCE (UTC)", "REASON")
    for p in pauses:
        t.add_row(
            p.lane, p.tenant or "(all)", p.paused_by, output.timestamp(p, "paused_at"), p.reason
        )
    output.show(t)
    return EXIT_OK


@click.group("workers")
def workers() -> None:
    """The live workers, and draining one (operator keys)."""


@workers.command("list")
@json_option
@connection_options
@run
async def workers_list(as_json: bool) -> int:
    """The live workers with their lanes, calls in flight and last heartbeat."""
    async with connection().client() as client:
        found = await client.workers()
    if as_json:
        output.print_json([output.message_dict(w) for w in found])
        return EXIT_OK
    t = output.table(
        "ID", "HOST", "PID", "LANES", "IN FLIGHT", "HEARTBEAT (UTC)", "STATE", numeric=("PID",)
    )
    for w in found:
        t.add_row(
            w.id,
            w.host,
            str(w.pid),
            ",".join(w.lanes),
            f"{w.in_flight}/{w.concurrency}",
            output.timestamp(w, "heartbeat_at"),
            "[yellow]draining[/]" if w.draining else "running",
        )
    output.show(t)
    return EXIT_OK


@workers.command("drain")
@click.argument("id")
@connection_options
@run
async def workers_drain(id: str) -> int:
    """Ask a worker to finish its calls, take no new ones, and exit."""
    async with connection().client() as client:
        worker = await client.drain_worker(id)
    print(f"worker {worker.id} draining ({worker.in_flight} calls in flight)")
    return EXIT_OK
