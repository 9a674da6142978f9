"""How the CLI prints: Rich tables (boxed on a terminal, plain columns when piped, so
`awk`/`split()` still work), JSON with numbers as numbers, and the job renderings."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from io import StringIO
from typing import Any

from google.protobuf import descriptor
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from rich import box
from rich.console import Console, RenderableType
from rich.table import Table

from conveyor.client import job_status_name
from conveyor.core.lifecycle import JobState
from conveyor.v1 import jobs_pb2

PIPE_WIDTH = 10_000
"""Console width when not on a terminal: a table is never wrapped or cut for a pipe."""

STATUS_ORDER = tuple(state.value for state in JobState)
STATUS_STYLE = {
    "pending": "cyan",
    "scheduled": "blue",
    "running": "yellow",
    "succeeded": "green",
    "failed": "red",
    "cancelled": "magenta",
    "dead": "bold red",
}


def console(stderr: bool = False) -> Console:
    """A console on stdout (or stderr); wide and plain when that is not a terminal."""
    stream = sys.stderr if stderr else sys.stdout
    if stream.isatty():
        return Console(file=stream, stderr=stderr)
    return Console(file=stream, width=PIPE_WIDTH, no_color=True, highlight=False)


def table(*headers: str, title: str | None = None, numeric: Iterable[str] = ()) -> Table:
    """A table with these column headers; `numeric` columns are right-aligned. Its box
    is chosen when it is printed (see `show`)."""
    right = set(numeric)
    t = Table(title=title, title_justify="left", header_style="bold", pad_edge=False)
    for header in headers:
        t.add_column(header, justify="right" if header in right else "left", no_wrap=True)
    return t


def fit(item: RenderableType, out: Console) -> RenderableType:
    """A table boxed for a terminal, or plain space-separated columns for a pipe."""
    if isinstance(item, Table):
        item.box = box.ROUNDED if out.is_terminal else None
        item.show_edge = item.pad_edge = out.is_terminal
    return item


def show(*renderables: RenderableType, stderr: bool = False) -> None:
    """Print tables boxed on a terminal, as plain space-separated columns otherwise."""
    out = console(stderr)
    for item in renderables:
        out.print(fit(item, out))


def plain(*renderables: RenderableType) -> str:
    """What `show` prints into a pipe, as a string (lines without trailing blanks)."""
    buffer = StringIO()
    out = Console(file=buffer, width=PIPE_WIDTH, no_color=True, highlight=False)
    for item in renderables:
        if isinstance(item, Table):
            item.box, item.show_edge = None, False
        out.print(item)
    return "\n".join(line.rstrip() for line in buffer.getvalue().splitlines())


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False, default=str))


def status_text(status: int) -> str:
    """A status name, coloured by the console when it is a terminal."""
    name = job_status_name(status)
    style = STATUS_STYLE.get(name)
    return f"[{style}]{name}[/]" if style else name


# --------------------------------------------------------------------------- plain values

_INT64 = {
    descriptor.FieldDescriptor.TYPE_INT64,
    descriptor.FieldDescriptor.TYPE_UINT64,
    descriptor.FieldDescriptor.TYPE_SINT64,
    descriptor.FieldDescriptor.TYPE_FIXED64,
    descriptor.FieldDescriptor.TYPE_SFIXED64,
}


def message_dict(message: Message, *, defaults: bool = False) -> dict[str, Any]:
    """A message as plain JSON values: field names as in the .proto, 64-bit integers as
    numbers (protobuf's JSON writes them as strings), Durations as seconds (a number),
    Timestamps as RFC 3339 text, enums by name."""
    out = MessageToDict(
        message,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=defaults,
    )
    _numbers(message.DESCRIPTOR, out)
    return out


def _numbers(desc: Any, value: dict[str, Any]) -> None:
    for field in desc.fields:
        if field.name not in value:
            continue
        kind = field.message_type
        if kind is not None and kind.GetOptions().map_entry:
            item_field = kind.fields_by_name["value"]
            entries = value[field.name]
            for key, item in entries.items():
                entries[key] = _plain_field(item_field, item)
        elif field.is_repeated:
            value[field.name] = [_plain_field(field, item) for item in value[field.name]]
        else:
            value[field.name] = _plain_field(field, value[field.name])


def _plain_field(field: descriptor.FieldDescriptor, item: Any) -> Any:
    if field.type in _INT64 and isinstance(item, str):
        return int(item)
    kind = field.message_type
    if kind is not None and kind.full_name == "google.protobuf.Duration":
        return float(str(item).removesuffix("s"))
    if kind is not None and isinstance(item, dict) and not kind.full_name.startswith("google."):
        _numbers(kind, item)
    return item


def seconds(value: Any) -> str:
    """A Duration or seconds, readably: 850ms, 12.4s, 3m05s, 2h10m."""
    s = value.ToTimedelta().total_seconds() if hasattr(value, "ToTimedelta") else float(value)
    if s < 1:
        return f"{s * 1000:.0f}ms"
    if s < 60:
        return f"{s:.1f}s"
    if s < 3600:
        return f"{int(s // 60)}m{int(s % 60):02d}s"
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"


def when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value is not None else "-"


def timestamp(message: Message, name: str) -> str:
    """A Timestamp field in UTC, or "-" when unset."""
    if not message.HasField(name):
        return "-"
    return when(getattr(message, name).ToDatetime(tzinfo=UTC))


def number(value: int | float) -> str:
    return f"{value:,}"


def dollars(micros: int) -> str:
    """Micro-dollars as dollars: $12.345678."""
    return f"${micros / 1_000_000:,.6f}"


# --------------------------------------------------------------------------- jobs


def job_table(jobs: Sequence[jobs_pb2.Job]) -> Table:
    """The `conveyor list` table (times in UTC)."""
    t = table("ID", "STATUS", "LANE", "PRI", "MODEL", "CREATED (UTC)", "ATTEMPTS", numeric=("PRI",))
    for job in jobs:
        t.add_row(
            job.id,
            status_text(job.status),
            job.lane,
            str(job.priority),
            job.model,
            timestamp(job, "created_at"),
            f"{job.attempts}/{job.max_attempts}",
        )
    return t


def format_table(jobs: Sequence[jobs_pb2.Job]) -> str:
    """The `conveyor list` table as printed into a pipe."""
    return plain(job_table(jobs))


def describe_job(job: jobs_pb2.Job) -> str:
    """One line: id, status, attempts, and usage or the error, whichever applies."""
    parts = [job.id, job_status_name(job.status), f"attempts={job.attempts}/{job.max_attempts}"]
    if job.status == jobs_pb2.JOB_STATUS_SUCCEEDED:
        parts.append(f"stop_reason={job.stop_reason or '-'}")
    if job.HasField("usage"):
        parts.append(f"tokens in={job.usage.input_tokens} out={job.usage.output_tokens}")
    if job.HasField("error") and job.status != jobs_pb2.JOB_STATUS_SUCCEEDED:
        parts.append(f"error={job.error.code}: {job.error.message}")
    if job.dead_reason:
        parts.append(f"dead_reason={job.dead_reason}")
    return "  ".join(parts)


def job_dict(job: jobs_pb2.Job) -> dict[str, Any]:
    """A job as JSON, its JSON bytes fields (content, request, usage) as JSON themselves,
    numbers as numbers."""
    out = message_dict(job)
    for name, key in (("content_json", "content"), ("request_json", "request")):
        out.pop(name, None)
        value = getattr(job, name)
        if value:
            out[key] = json.loads(value)
    if job.usage.usage_json:
        out["usage"].pop("usage_json", None)
        out["usage"]["reported"] = json.loads(job.usage.usage_json)
    return out


def format_blocks(job: jobs_pb2.Job) -> str:
    """The final message's blocks, one after the other: text as text, tool calls and
    server blocks as JSON, thinking marked as such."""
    parts: list[str] = []
    for i, block in enumerate(json.loads(job.content_json) if job.content_json else []):
        kind = block.get("type")
        if kind == "text":
            parts.append(f"[{i}] text\n{block.get('text', '')}")
        elif kind == "thinking":
            parts.append(f"[{i}] thinking\n{block.get('thinking', '')}")
        elif kind == "redacted_thinking":
            parts.append(f"[{i}] redacted_thinking")
        elif kind in ("tool_use", "server_tool_use"):
            call = json.dumps(block.get("input", {}), indent=2, ensure_ascii=False)
            parts.append(f"[{i}] {kind} {block.get('name')} ({block.get('id')})\n{call}")
        else:
            parts.append(f"[{i}] {kind}\n{json.dumps(block, indent=2, ensure_ascii=False)}")
    if job.stop_reason:
        parts.append(f"stop_reason: {job.stop_reason}")
    return "\n\n".join(parts)


# --------------------------------------------------------------------------- stats


def _statuses(counts: Iterable[str]) -> list[str]:
    """Known statuses in lifecycle order, then any others the server reports."""
    seen = set(counts)
    return [s for s in STATUS_ORDER] + sorted(seen - set(STATUS_ORDER))


def stats_tables(stats: jobs_pb2.GetStatsResponse) -> list[RenderableType]:
    """`conveyor stats`: jobs per lane and status with queue depths, then run times,
    tokens and the dead-letter depth; with all tenants, a table per tenant too; then
    cost and the prompt cache's savings per tenant, model and lane."""
    statuses = _statuses([*stats.counts, *(k for lane in stats.lanes for k in lane.counts)])
    who = "all tenants" if stats.tenant == "*" else f"tenant {stats.tenant or '-'}"
    lanes = table("LANE", "QUEUED", *(s.upper() for s in statuses), title=f"Jobs ({who})")
    for column in lanes.columns[1:]:
        column.justify = "right"
    for lane in stats.lanes:
        lanes.add_row(
            lane.lane, number(lane.queue_depth), *(number(lane.counts.get(s, 0)) for s in statuses)
        )
    lanes.add_section()
    lanes.add_row(
        "[bold]all[/]",
        number(sum(lane.queue_depth for lane in stats.lanes)),
        *(number(stats.counts.get(s, 0)) for s in statuses),
    )
    summary = table("DEAD LETTERS", "RUN P50", "RUN P95", "TOKENS IN", "TOKENS OUT")
    summary.add_column("CACHE READ", justify="right")
    summary.add_column("CACHE WRITE", justify="right")
    for column in summary.columns:
        column.justify = "right"
    tokens = stats.tokens
    summary.add_row(
        number(stats.dead_letter_depth),
        seconds(stats.run_time_p50) if stats.HasField("run_time_p50") else "-",
        seconds(stats.run_time_p95) if stats.HasField("run_time_p95") else "-",
        number(tokens.input_tokens),
        number(tokens.output_tokens),
        number(tokens.cache_read_input_tokens),
        number(tokens.cache_creation_input_tokens),
    )
    out: list[RenderableType] = [lanes, summary]
    if stats.tenants:
        per = table("TENANT", *(s.upper() for s in statuses), "TOKENS IN", "TOKENS OUT")
        for column in per.columns[1:]:
            column.justify = "right"
        for t in stats.tenants:
            per.add_row(
                t.tenant,
                *(number(t.counts.get(s, 0)) for s in statuses),
                number(t.tokens.input_tokens),
                number(t.tokens.output_tokens),
            )
        out.append(per)
    if stats.costs:
        costs = table(
            "TENANT", "MODEL", "LANE", "JOBS", "UNPRICED", "COST", "CACHE READ", "CACHE SAVED"
        )
        for column in costs.columns[3:]:
            column.justify = "right"
        for c in stats.costs:
            costs.add_row(
                c.tenant,
                c.model,
                c.lane,
                number(c.jobs),
                number(c.unpriced_jobs),
                dollars(c.cost_micros),
                f"{c.cache_read_ratio:.1%}",
                dollars(c.cache_saved_micros),
            )
        out.append(costs)
    return out
