"""Validation of submitted jobs: every bad field is an InvalidArgument naming it.

The bounds on sizes (prompt, messages, metadata, labels, webhook URL), on
max_tokens and on model names come from the settings (`Limits.from_settings`);
temperature and the metadata keys follow the Messages API.
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any

from conveyor.contract.convert import check_text, key_field, to_datetime, to_timedelta
from conveyor.contract.request_body import BodyLimits
from conveyor.contract.request_body.submit import BODY_PATH, body_form
from conveyor.core.config import Settings
from conveyor.core.errors import InvalidArgument
from conveyor.db.jobs import NewJob, utcnow
from conveyor.v1 import jobs_pb2


@dataclass(frozen=True)
class Limits:
    """Bounds on request fields."""

    max_messages: int = 1000
    max_text_chars: int = 1_000_000
    max_output_tokens: int = 128_000
    max_stop_sequences: int = 8
    max_stop_sequence_chars: int = 256
    max_labels: int = 32
    max_label_chars: int = 256
    max_metadata_chars: int = 256
    max_key_chars: int = 255
    max_url_chars: int = 2048
    max_attempts: int = 20
    max_timeout: timedelta = timedelta(hours=1)
    max_delay: timedelta = timedelta(days=30)
    allowed_models: tuple[str, ...] = ()
    """Shell-style patterns of accepted model names; empty accepts any well-formed name."""

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return _limits(
            settings.max_messages,
            settings.max_prompt_chars,
            settings.max_output_tokens,
            settings.max_labels,
            settings.max_label_chars,
            settings.max_metadata_chars,
            settings.max_webhook_url_chars,
            tuple(settings.allowed_models),
        )

    def model_allowed(self, model: str) -> bool:
        return not self.allowed_models or any(
            fnmatch.fnmatchcase(model, pattern) for pattern in self.allowed_models
        )


@lru_cache(maxsize=8)
def _limits(
    max_messages: int,
    max_text_chars: int,
    max_output_tokens: int,
    max_labels: int,
    max_label_chars: int,
    max_metadata_chars: int,
    max_url_chars: int,
    allowed_models: tuple[str, ...],
) -> Limits:
    return Limits(
        max_messages=max_messages,
        max_text_chars=max_text_chars,
        max_output_tokens=max_output_tokens,
        max_labels=max_labels,
        max_label_chars=max_label_chars,
        max_metadata_chars=max_metadata_chars,
        max_url_chars=max_url_chars,
        allowed_models=allowed_models,
    )


LIMITS = Limits()
"""The default bounds (those of the default settings)."""
_MODEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@/-]{0,127}")
"""A model name, matched whole (fullmatch: `$` would let a trailing newline through)."""
METADATA_KEYS = frozenset({"user_id"})
"""The keys the Messages API accepts in `metadata`."""


def _check(ok: bool, field: str, description: str) -> None:
    if not ok:
        raise InvalidArgument(field, description)


def _check_map(values: dict[str, str], field: str, max_items: int, max_chars: int) -> None:
    _check(len(values) <= max_items, field, f"at most {max_items} entries")
    check_strings(values, field)
    for k, v in values.items():
        if not 0 < len(k) <= max_chars:
            raise InvalidArgument(key_field(field, k), f"keys are 1..{max_chars} characters")
        if len(v) > max_chars:
            raise InvalidArgument(key_field(field, k), f"values are at most {max_chars} characters")


def check_strings(values: Mapping[str, str], field: str) -> None:
    """Refuse a NUL in a map's keys or values (labels, metadata, label filters)."""
    for k, v in values.items():
        if "\x00" in k or "\x00" in v:
            check_text(k, key_field(field, k))
            check_text(v, key_field(field, k))


def request_hash(req: jobs_pb2.SubmitJobRequest) -> str:
    """A fingerprint of the request, to tell an idempotent replay from a key reused."""
    return hashlib.sha256(req.SerializeToString(deterministic=True)).hexdigest()


def validate_submit(
    req: jobs_pb2.SubmitJobRequest,
    settings: Settings,
    tenant: str,
    prefix: str = "",
    now: datetime | None = None,
) -> NewJob:
    """Check a SubmitJobRequest and turn it into a row to insert.

    `prefix` is put before field names, e.g. `jobs[3].` for a batch. The call is the
    whole Messages API body (`request_json`, checked by conveyor.contract.request_body) or the
    short typed form for a text prompt, whose checks cost far less.
    """
    lim = Limits.from_settings(settings)
    if req.request_json:
        model, body = body_form(req, BodyLimits.from_settings(settings), prefix)
        _check_model(model, lim, f"{prefix}{BODY_PATH}.model")
    else:
        model, body = _short_form(req, lim, prefix)
    return _new_job(req, settings, lim, tenant, prefix, now, model, body)


def _check_model(model: str, lim: Limits, field: str) -> None:
    if not _MODEL.fullmatch(model):
        raise InvalidArgument(field, "is not a valid model name")
    if not lim.model_allowed(model):
        raise InvalidArgument(
            field, f"is not an allowed model (allowed: {', '.join(lim.allowed_models)})"
        )


def _short_form(
    req: jobs_pb2.SubmitJobRequest, lim: Limits, p: str
) -> tuple[str, dict[str, object]]:
    """Check the short typed form; (model, the Messages API body it stands for)."""
    # Every check is an `if` whose field name and message are made only when it fails:
    # made for every check of every submit, they cost more than the checks.
    model = req.model
    if not model:
        raise InvalidArgument(f"{p}model", "is required")
    _check_model(model, lim, f"{p}model")
    max_tokens = req.max_tokens
    if max_tokens <= 0:
        raise InvalidArgument(f"{p}max_tokens", "is required and must be positive")
    if max_tokens > lim.max_output_tokens:
        raise InvalidArgument(f"{p}max_tokens", f"at most {lim.max_output_tokens}")
    messages = req.messages
    if not messages:
        raise InvalidArgument(f"{p}messages", "at least one message is required")
    if len(messages) > lim.max_messages:
        raise InvalidArgument(f"{p}messages", f"at most {lim.max_messages}")
    system = req.system
    if len(system) > lim.max_text_chars:
        raise InvalidArgument(f"{p}system", f"at most {lim.max_text_chars} characters")
    if "\x00" in system:
        check_text(system, f"{p}system")
    total = len(system)
    turns: list[dict[str, str]] = []
    for i, m in enumerate(messages):
        role, content = m.role, m.content
        if role != "user" and role != "assistant":
            raise InvalidArgument(f"{p}messages[{i}].role", 'must be "user" or "assistant"')
        if not content:
            raise InvalidArgument(f"{p}messages[{i}].content", "must not be empty")
        if "\x00" in content:
            check_text(content, f"{p}messages[{i}].content")
        total += len(content)
        turns.append({"role": role, "content": content})
    if messages[0].role != "user":
        raise InvalidArgument(f"{p}messages[0].role", 'the first message must be from "user"')
    if total > lim.max_text_chars:
        raise InvalidArgument(
            f"{p}messages", f"system and messages exceed {lim.max_text_chars} characters"
        )
    has_temperature = req.HasField("temperature")
    if has_temperature and not 0.0 <= req.temperature <= 1.0:
        raise InvalidArgument(f"{p}temperature", "must be between 0.0 and 1.0")
    stops = req.stop_sequences
    if stops:
        _check(
            len(stops) <= lim.max_stop_sequences,
            f"{p}stop_sequences",
            f"at most {lim.max_stop_sequences}",
        )
        for i, stop in enumerate(stops):
            _check(bool(stop.strip()), f"{p}stop_sequences[{i}]", "must contain non-whitespace")
            check_text(stop, f"{p}stop_sequences[{i}]")
            _check(
                len(stop) <= lim.max_stop_sequence_chars,
                f"{p}stop_sequences[{i}]",
                f"at most {lim.max_stop_sequence_chars} characters",
            )
    metadata = req.metadata
    if metadata:
        for key in metadata:
            _check(
                key in METADATA_KEYS,
                key_field(f"{p}metadata", key),
                f"the Messages API takes only {', '.join(sorted(METADATA_KEYS))}",
            )
        _check_map(dict(metadata), f"{p}metadata", len(METADATA_KEYS), lim.max_metadata_chars)
    body: dict[str, object] = {"max_tokens": max_tokens, "messages": turns}
    if system:
        body["system"] = system
    if has_temperature:
        body["temperature"] = req.temperature
    if stops:
        body["stop_sequences"] = list(stops)
    if metadata:
        body["metadata"] = dict(metadata)
    return model, body


def _new_job(
    req: jobs_pb2.SubmitJobRequest,
    settings: Settings,
    lim: Limits,
    tenant: str,
    p: str,
    now: datetime | None,
    model: str,
    body: dict[str, Any],
) -> NewJob:
    """Check Conveyor's own fields (either form); the row to insert."""
    # As in _short_form: field names and messages are made only for a failed check.
    priority = req.priority
    if not 0 <= priority <= settings.max_priority:
        raise InvalidArgument(f"{p}priority", f"must be 0..{settings.max_priority}")
    lane = req.lane or settings.default_lane
    if lane not in settings.lanes:
        raise InvalidArgument(f"{p}lane", f"must be one of {', '.join(settings.lanes)}")
    key = req.idempotency_key
    if key:
        if len(key) > lim.max_key_chars:
            raise InvalidArgument(f"{p}idempotency_key", f"at most {lim.max_key_chars} characters")
        check_text(key, f"{p}idempotency_key")
    if not 0 <= req.max_attempts <= lim.max_attempts:
        raise InvalidArgument(f"{p}max_attempts", f"must be 0..{lim.max_attempts}")
    labels = dict(req.labels)
    if labels:
        _check_map(labels, f"{p}labels", lim.max_labels, lim.max_label_chars)
    webhook_events = req.webhook_events
    if webhook_events not in _WEBHOOK_EVENTS:
        raise InvalidArgument(f"{p}webhook_events", "is not a WebhookEvents value")
    url = req.webhook_url
    if not url and webhook_events != jobs_pb2.WEBHOOK_EVENTS_UNSPECIFIED:
        raise InvalidArgument(f"{p}webhook_events", "needs webhook_url")
    if url:
        _check(
            len(url) <= lim.max_url_chars,
            f"{p}webhook_url",
            f"at most {lim.max_url_chars} characters",
        )
        _check(url.startswith(("http://", "https://")), f"{p}webhook_url", "must be an http(s) URL")
        check_text(url, f"{p}webhook_url")

    run_at: datetime | None = None
    has_run_at, has_delay = req.HasField("run_at"), req.HasField("delay")
    if has_run_at and has_delay:
        raise InvalidArgument(f"{p}run_at", "give run_at or delay, not both")
    if has_delay:
        now = now or utcnow()
        delay = to_timedelta(req.delay, f"{p}delay")
        _check(
            timedelta(0) <= delay <= lim.max_delay,
            f"{p}delay",
            f"must be between 0 and {lim.max_delay}",
        )
        run_at = now + delay if delay > timedelta(0) else None
    elif has_run_at:
        now = now or utcnow()
        run_at = to_datetime(req.run_at, f"{p}run_at")
        _check(run_at <= now + lim.max_delay, f"{p}run_at", f"at most {lim.max_delay} ahead")
    timeout = timedelta(seconds=settings.default_timeout_s)
    if req.HasField("timeout"):
        timeout = to_timedelta(req.timeout, f"{p}timeout")
        _check(
            timedelta(0) < timeout <= lim.max_timeout,
            f"{p}timeout",
            f"must be between 0 and {lim.max_timeout}",
        )

    return NewJob(
        tenant=tenant,
        model=model,
        request=body,
        lane=lane,
        priority=priority,
        max_attempts=req.max_attempts or settings.default_max_attempts,
        timeout_ms=int(timeout.total_seconds() * 1000),
        request_hash=request_hash(req),
        idempotency_key=key or None,
        webhook_url=url or None,
        webhook_all_events=webhook_events == jobs_pb2.WEBHOOK_EVENTS_ALL,
        labels=labels,
        run_at=run_at,
    )


_WEBHOOK_EVENTS = frozenset(jobs_pb2.WebhookEvents.values())
