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
        _check(0 < len(k) <= max_chars, key_field(field, k), f"keys are 1..{max_chars} characters")
        _check(
            len(v) <= max_chars, key_field(field, k), f"values are at most {max_chars} characters"
        )


def check_strings(values: Mapping[str, str], field: str) -> None:
    """Refuse a NUL in a map's keys or values (labels, metadata, label filters)."""
    for k, v in values.items():
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
    _check(bool(_MODEL.fullmatch(model)), field, "is not a valid model name")
    _check(
        lim.model_allowed(model),
        field,
        f"is not an allowed model (allowed: {', '.join(lim.allowed_models)})",
    )


def _short_form(
    req: jobs_pb2.SubmitJobRequest, lim: Limits, p: str
) -> tuple[str, dict[str, object]]:
    """Check the short typed form; (model, the Messages API body it stands for)."""
    _check(bool(req.model), f"{p}model", "is required")
    _check(bool(_MODEL.fullmatch(req.model)), f"{p}model", "is not a valid model name")
    _check(
        lim.model_allowed(req.model),
        f"{p}model",
        f"is not an allowed model (allowed: {', '.join(lim.allowed_models)})",
    )
    _check(req.max_tokens > 0, f"{p}max_tokens", "is required and must be positive")
    _check(
        req.max_tokens <= lim.max_output_tokens,
        f"{p}max_tokens",
        f"at most {lim.max_output_tokens}",
    )
    _check(len(req.messages) > 0, f"{p}messages", "at least one message is required")
    _check(len(req.messages) <= lim.max_messages, f"{p}messages", f"at most {lim.max_messages}")
    _check(
        len(req.system) <= lim.max_text_chars,
        f"{p}system",
        f"at most {lim.max_text_chars} characters",
    )
    check_text(req.system, f"{p}system")
    total = len(req.system)
    for i, m in enumerate(req.messages):
        _check(
            m.role in ("user", "assistant"),
            f"{p}messages[{i}].role",
            'must be "user" or "assistant"',
        )
        _check(bool(m.content), f"{p}messages[{i}].content", "must not be empty")
        check_text(m.content, f"{p}messages[{i}].content")
        total += len(m.content)
    _check(
        req.messages[0].role == "user",
        f"{p}messages[0].role",
        'the first message must be from "user"',
    )
    _check(
        total <= lim.max_text_chars,
        f"{p}messages",
        f"system and messages exceed {lim.max_text_chars} characters",
    )
    if req.HasField("temperature"):
        _check(0.0 <= req.temperature <= 1.0, f"{p}temperature", "must be between 0.0 and 1.0")
    _check(
        len(req.stop_sequences) <= lim.max_stop_sequences,
        f"{p}stop_sequences",
        f"at most {lim.max_stop_sequences}",
    )
    for i, s in enumerate(req.stop_sequences):
        _check(bool(s.strip()), f"{p}stop_sequences[{i}]", "must contain non-whitespace")
        check_text(s, f"{p}stop_sequences[{i}]")
        _check(
            len(s) <= lim.max_stop_sequence_chars,
            f"{p}stop_sequences[{i}]",
            f"at most {lim.max_stop_sequence_chars} characters",
        )
    for key in req.metadata:
        _check(
            key in METADATA_KEYS,
            key_field(f"{p}metadata", key),
            f"the Messages API takes only {', '.join(sorted(METADATA_KEYS))}",
        )
    _check_map(dict(req.metadata), f"{p}metadata", len(METADATA_KEYS), lim.max_metadata_chars)
    body: dict[str, object] = {
        "max_tokens": req.max_tokens,
        "messages": [{"role": m.role, "content": m.content} for m in req.messages],
    }
    if req.system:
        body["system"] = req.system
    if req.HasField("temperature"):
        body["temperature"] = req.temperature
    if req.stop_sequences:
        body["stop_sequences"] = list(req.stop_sequences)
    if req.metadata:
        body["metadata"] = dict(req.metadata)
    return req.model, body


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
    _check(
        0 <= req.priority <= settings.max_priority,
        f"{p}priority",
        f"must be 0..{settings.max_priority}",
    )
    lane = req.lane or settings.default_lane
    _check(lane in settings.lanes, f"{p}lane", f"must be one of {', '.join(settings.lanes)}")
    _check(
        len(req.idempotency_key) <= lim.max_key_chars,
        f"{p}idempotency_key",
        f"at most {lim.max_key_chars} characters",
    )
    check_text(req.idempotency_key, f"{p}idempotency_key")
    _check(
        0 <= req.max_attempts <= lim.max_attempts,
        f"{p}max_attempts",
        f"must be 0..{lim.max_attempts}",
    )
    _check_map(dict(req.labels), f"{p}labels", lim.max_labels, lim.max_label_chars)
    _check(
        req.webhook_events in jobs_pb2.WebhookEvents.values(),
        f"{p}webhook_events",
        "is not a WebhookEvents value",
    )
    _check(
        bool(req.webhook_url) or req.webhook_events == jobs_pb2.WEBHOOK_EVENTS_UNSPECIFIED,
        f"{p}webhook_events",
        "needs webhook_url",
    )
    if req.webhook_url:
        _check(
            len(req.webhook_url) <= lim.max_url_chars,
            f"{p}webhook_url",
            f"at most {lim.max_url_chars} characters",
        )
        _check(
            req.webhook_url.startswith(("http://", "https://")),
            f"{p}webhook_url",
            "must be an http(s) URL",
        )
        check_text(req.webhook_url, f"{p}webhook_url")

    now = now or utcnow()
    run_at: datetime | None = None
    _check(
        not (req.HasField("run_at") and req.HasField("delay")),
        f"{p}run_at",
        "give run_at or delay, not both",
    )
    if req.HasField("delay"):
        delay = to_timedelta(req.delay, f"{p}delay")
        _check(
            timedelta(0) <= delay <= lim.max_delay,
            f"{p}delay",
            f"must be between 0 and {lim.max_delay}",
        )
        run_at = now + delay if delay > timedelta(0) else None
    elif req.HasField("run_at"):
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
        priority=req.priority,
        max_attempts=req.max_attempts or settings.default_max_attempts,
        timeout_ms=int(timeout.total_seconds() * 1000),
        request_hash=request_hash(req),
        idempotency_key=req.idempotency_key or None,
        webhook_url=req.webhook_url or None,
        webhook_all_events=req.webhook_events == jobs_pb2.WEBHOOK_EVENTS_ALL,
        labels=dict(req.labels),
        run_at=run_at,
    )
