"""`conveyor submit`: one job from a prompt (short form) or a whole Messages API body,
or many from a JSON Lines file (`--from-file`, with a progress bar)."""

from __future__ import annotations

import asyncio
import json
import sys
from base64 import b64encode
from collections.abc import Callable, Sequence
from datetime import timedelta
from io import StringIO
from pathlib import Path
from typing import Any, Literal, Protocol, TextIO, TypeVar

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from conveyor.cli import output
from conveyor.cli.base import (
    EXIT_OK,
    EXIT_USAGE,
    KEY_VALUE,
    SECONDS,
    connection,
    connection_options,
    fail,
    run,
)
from conveyor.client import ConveyorClient
from conveyor.v1 import jobs_pb2

DEFAULT_MODEL = "claude-sonnet-4-5"
DEFAULT_MAX_TOKENS = 256
BATCH = 100
"""Jobs per SubmitJobs call of `--from-file` (each batch is all or none)."""

WEBHOOK_EVENTS: dict[str, jobs_pb2.WebhookEvents.ValueType] = {
    "terminal": jobs_pb2.WEBHOOK_EVENTS_TERMINAL,
    "all": jobs_pb2.WEBHOOK_EVENTS_ALL,
}
SHORT_FORM: tuple[
    Literal["model", "system", "messages", "max_tokens", "temperature", "stop_sequences"]
    | Literal["metadata"],
    ...,
] = ("model", "system", "messages", "max_tokens", "temperature", "stop_sequences", "metadata")
"""The SubmitJobRequest fields of the short typed form."""
BODY_FLAGS = ("request_file", "image", "pdf", "tools", "json_schema", "thinking")
"""`conveyor submit` flags that make it send the whole Messages API body."""


class SubmitArgs(Protocol):
    """The parsed flags of `conveyor submit` (and `schedules create`)."""

    prompt: str
    model: str
    system: str
    max_tokens: int
    temperature: float | None
    stop: Sequence[str]
    meta: Sequence[tuple[str, str]]
    priority: int
    lane: str
    idempotency_key: str
    max_attempts: int
    webhook: str
    webhook_events: str | None
    label: Sequence[tuple[str, str]]
    delay: float | None
    timeout: float | None
    request_file: str | None
    image: Sequence[str]
    pdf: Sequence[str]
    tools: str | None
    json_schema: str | None
    thinking: int | None


F = TypeVar("F", bound=Callable[..., Any])


def job_options(f: F) -> F:
    """The flags that describe a job: shared by `submit` and `schedules create`."""
    options = [
        click.argument("prompt", required=False, default=""),
        click.option(
            "--request-file",
            metavar="BODY.json",
            help="the whole Messages API request body (the flags below add to it)",
        ),
        click.option("--image", multiple=True, metavar="PATH", help="attach an image"),
        click.option("--pdf", multiple=True, metavar="PATH", help="attach a PDF"),
        click.option("--tools", metavar="TOOLS.json", help="a JSON list of tool definitions"),
        click.option(
            "--json-schema", metavar="SCHEMA.json", help="answer as JSON matching this schema"
        ),
        click.option(
            "--thinking", type=int, metavar="BUDGET", help="extended thinking with this budget"
        ),
        click.option("--model", default=DEFAULT_MODEL, show_default=True),
        click.option("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, show_default=True),
        click.option("--system", default="", help="system prompt"),
        click.option("--temperature", type=float, default=None),
        click.option("--stop", multiple=True, metavar="SEQ", help="stop sequence"),
        click.option("--priority", type=click.IntRange(0, 9), default=0, help="0 (lowest) to 9"),
        click.option("--lane", default="", help="interactive, default or bulk"),
        click.option("--idempotency-key", default=""),
        click.option("--delay", type=SECONDS, default=None, help="run later (seconds)"),
        click.option("--timeout", type=SECONDS, default=None, help="per call (seconds)"),
        click.option("--max-attempts", type=int, default=0, help="0: the server's default"),
        click.option("--label", type=KEY_VALUE, multiple=True),
        click.option("--meta", type=KEY_VALUE, multiple=True, help="Messages API metadata"),
        click.option("--webhook", default="", metavar="URL", help="POSTed when the job finishes"),
        click.option(
            "--webhook-events",
            type=click.Choice(["terminal", "all"]),
            default=None,
            help="POST the webhook on terminal statuses (default) or on every change",
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def read_prompt(prompt: str, stdin: TextIO | None = None) -> str:
    """The prompt itself, or everything on stdin when it is "-"."""
    if prompt == "-":
        return (stdin or sys.stdin).read()
    return prompt


def build_submit_request(args: Any, stdin: TextIO | None = None) -> jobs_pb2.SubmitJobRequest:
    """The SubmitJobRequest that `conveyor submit` sends for parsed `args` (SubmitArgs)."""
    request = jobs_pb2.SubmitJobRequest(
        model=args.model,
        system=args.system,
        messages=[jobs_pb2.Message(role="user", content=read_prompt(args.prompt or "", stdin))],
        max_tokens=args.max_tokens,
        stop_sequences=list(args.stop),
        metadata=dict(args.meta),
        priority=args.priority,
        lane=args.lane,
        idempotency_key=args.idempotency_key,
        max_attempts=args.max_attempts,
        webhook_url=args.webhook,
        labels=dict(args.label),
        webhook_events=WEBHOOK_EVENTS.get(
            getattr(args, "webhook_events", "") or "", jobs_pb2.WEBHOOK_EVENTS_UNSPECIFIED
        ),
    )
    if args.temperature is not None:
        request.temperature = args.temperature
    if args.delay is not None:
        request.delay.FromTimedelta(timedelta(seconds=args.delay))
    if args.timeout is not None:
        request.timeout.FromTimedelta(timedelta(seconds=args.timeout))
    body = request_body_of(args, request)
    if body is not None:  # the body form: the typed call moves into request_json
        for name in SHORT_FORM:
            request.ClearField(name)
        request.request_json = json.dumps(body).encode()
    return request


def _read_json(path: str) -> Any:
    with open(path, "rb") as f:
        return json.load(f)


def image_type(data: bytes) -> str | None:
    """The media type an image's first bytes announce (as conveyor.contract.request_body.media
    does; repeated here because the CLI installs without the server's modules)."""
    for magic, media_type in (
        (b"\x89PNG\r\n\x1a\n", "image/png"),
        (b"\xff\xd8\xff", "image/jpeg"),
        (b"GIF87a", "image/gif"),
        (b"GIF89a", "image/gif"),
    ):
        if data.startswith(magic):
            return media_type
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def _media_block(path: str, pdf: bool) -> dict[str, Any]:
    data = Path(path).read_bytes()
    if pdf:
        media_type = "application/pdf"
    else:
        media_type = image_type(data) or ""
        if not media_type:
            raise click.BadParameter(f"{path} is not a JPEG, PNG, GIF or WebP image")
    source = {"type": "base64", "media_type": media_type, "data": b64encode(data).decode()}
    return {"type": "document" if pdf else "image", "source": source}


def request_body_of(args: Any, typed: jobs_pb2.SubmitJobRequest) -> dict[str, Any] | None:
    """The whole Messages API body `conveyor submit` sends, or None for the short form.

    `--request-file` gives the body (the other flags add to it); otherwise the prompt
    and typed flags make it. Images and PDFs go before the text of the last user turn;
    `--tools` is a JSON list of tools, `--json-schema` a JSON schema for the answer
    (output_config.format), `--thinking` the thinking budget in tokens.
    """
    if not any(getattr(args, name, None) for name in BODY_FLAGS):
        return None
    body: dict[str, Any]
    if args.request_file:
        body = _read_json(args.request_file)
        if not isinstance(body, dict):
            raise click.BadParameter(f"{args.request_file} holds no JSON object")
    else:
        body = {"model": typed.model, "max_tokens": typed.max_tokens}
        body["messages"] = [{"role": m.role, "content": m.content} for m in typed.messages]
        if typed.system:
            body["system"] = typed.system
        if typed.HasField("temperature"):
            body["temperature"] = typed.temperature
        if typed.stop_sequences:
            body["stop_sequences"] = list(typed.stop_sequences)
        if typed.metadata:
            body["metadata"] = dict(typed.metadata)
    media = [_media_block(p, False) for p in args.image or ()]
    media += [_media_block(p, True) for p in args.pdf or ()]
    if media:
        messages = body.setdefault("messages", [])
        if not messages or messages[-1].get("role") != "user":
            messages.append({"role": "user", "content": []})
        content = messages[-1].get("content") or []
        if isinstance(content, str):
            content = [{"type": "text", "text": content}] if content else []
        messages[-1]["content"] = media + content
    if args.tools:
        tools = _read_json(args.tools)
        body["tools"] = tools["tools"] if isinstance(tools, dict) and "tools" in tools else tools
    if args.json_schema:
        output_config = body.setdefault("output_config", {})
        output_config["format"] = {"type": "json_schema", "schema": _read_json(args.json_schema)}
    if args.thinking:
        body["thinking"] = {"type": "enabled", "budget_tokens": args.thinking}
    return body


def requests_from_lines(
    lines: Sequence[str], template: jobs_pb2.SubmitJobRequest
) -> list[jobs_pb2.SubmitJobRequest]:
    """One request per non-blank JSON line: a string is a prompt (the short form, with
    the flags' model, system, ...), an object a whole Messages API body. Each takes the
    flags' lane, priority, labels, webhook...; an idempotency key gets `-<line>` added.
    Raises click.BadParameter naming the line of a bad one."""
    requests = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise click.BadParameter(f"line {number}: not JSON ({exc.msg})") from None
        request = jobs_pb2.SubmitJobRequest()
        request.CopyFrom(template)
        if isinstance(item, str) and item.strip():
            request.messages[0].content = item
        elif isinstance(item, dict) and "messages" in item:
            for name in SHORT_FORM:
                request.ClearField(name)
            request.request_json = json.dumps(item).encode()
        else:
            raise click.BadParameter(
                f"line {number}: expected a prompt (a JSON string) or a Messages API body"
                " (an object with messages)"
            )
        if template.idempotency_key:
            request.idempotency_key = f"{template.idempotency_key}-{number}"
        requests.append(request)
    return requests


async def submit_file(
    client: ConveyorClient, requests: Sequence[jobs_pb2.SubmitJobRequest], batch: int = BATCH
) -> list[jobs_pb2.Job]:
    """Submit in batches, a progress bar on stderr; the jobs in request order. A refused
    batch stops the run: the jobs of earlier batches stay submitted (their ids printed)."""
    jobs: list[jobs_pb2.Job] = []
    columns = (
        TextColumn("submitting"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=output.console(stderr=True), transient=True) as progress:
        task = progress.add_task("submit", total=len(requests))
        try:
            for start in range(0, len(requests), batch):
                chunk = requests[start : start + batch]
                jobs.extend(await client.submit_many(chunk))
                progress.update(task, advance=len(chunk))
        finally:
            for job in jobs:
                print(job.id)
    return jobs


@click.command("submit")
@job_options
@click.option(
    "--from-file",
    metavar="JOBS.jsonl",
    help="submit one job per line (a JSON prompt string or a Messages API body; - for stdin)",
)
@click.option(
    "--watch",
    is_flag=True,
    help="stream the tokens; exit 0 succeeded, 1 failed/dead, 2 cancelled",
)
@connection_options
@run
async def submit_command(**params: Any) -> int:
    """Submit a job (one user message, or a whole body); print its id."""
    from conveyor.cli.watching import exit_code_for, stream_job, trace_link

    ns = _Namespace(params)
    if ns.from_file:
        if ns.watch or ns.prompt or any(getattr(ns, name) for name in BODY_FLAGS):
            return fail("--from-file takes no prompt, --watch or body flags (--image, ...)")
        ns.prompt = "-"  # each line's prompt replaces it
        template = build_submit_request(ns, StringIO())
        with click.open_file(ns.from_file, encoding="utf-8") as f:
            lines = f.read().splitlines()
        requests = requests_from_lines(lines, template)
        async with connection().client() as client:
            await submit_file(client, requests)
        return EXIT_OK
    request = build_submit_request(ns)
    if not request.request_json and not any(m.content.strip() for m in request.messages):
        return fail("the prompt is empty", EXIT_USAGE)
    async with connection().client() as client:
        response = await client.submit_request(request)
        job = response.job
        if response.idempotent_replay:
            print(f"note: idempotency key matched existing job {job.id}", file=sys.stderr)
        if not ns.watch:
            print(job.id)
            return EXIT_OK
        print(f"job {job.id}", file=sys.stderr)
        link = trace_link(job.trace_id)
        if link:
            print(f"trace: {link}", file=sys.stderr)
        try:
            final = await stream_job(client, job.id, sys.stdout, sys.stderr)
        except asyncio.CancelledError:
            print(f"\nstopped watching; the job goes on: conveyor watch {job.id}", file=sys.stderr)
            raise
        return exit_code_for(final.status)


class _Namespace:
    """Parsed parameters as attributes (what build_submit_request reads)."""

    prompt: str

    def __init__(self, params: dict[str, Any]) -> None:
        self.__dict__.update(params)

    def __getattr__(self, name: str) -> Any:  # flags a command does not have
        return None
