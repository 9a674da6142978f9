"""The model call: a streamed Messages API request through the anthropic SDK, and
the classification of its failures into transient (retry) and permanent (fail).

The SDK's own retries are off (`max_retries=0`): it would sleep a whole
`retry-after` while holding a worker slot; retries happen at the job level.

Which API answers is the explicit setting CONVEYOR_PROVIDER: `simulator` (the
bundled stand-in) or `anthropic`. A worker set to `anthropic` without an
ANTHROPIC_API_KEY refuses to start (`check_provider`), rather than quietly
calling the simulator; the simulator never receives the real key.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import anthropic
import httpx2
import orjson
from anthropic.resources.messages import AsyncMessages

from conveyor.core import lifecycle
from conveyor.core.config import ConfigError, Settings
from conveyor.core.telemetry import exporting
from conveyor.v1 import events_pb2

TRANSIENT_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504, 529})
TRANSIENT_ERROR_TYPES = frozenset(
    {"rate_limit_error", "overloaded_error", "api_error", "timeout_error"}
)


async def sse_events(chunks: AsyncIterator[bytes]) -> AsyncIterator[tuple[str, bytes]]:
    """The (event, data) of each Server-Sent Event in a byte stream.

    What the SDK's SSEDecoder yields (the `event` and `data` fields; comments and
    other fields skipped; several data lines joined by newlines; CRLF or CR line
    ends; an event cut off by the end of the stream dropped), found by splitting
    each chunk on blank lines in C instead of decoding it line by line in Python, which
    matters because an answer streams an event per token.
    """
    buffer = b""
    async for chunk in chunks:
        buffer += chunk
        if b"\r" in buffer:
            # A CR at the very end may be the first half of a CRLF: it waits for the rest.
            tail = b"\r" if buffer.endswith(b"\r") else b""
            buffer = _lf(buffer[: len(buffer) - len(tail)]) + tail
        events, buffer = _complete_events(buffer)
        for event in events:
            yield event
    if buffer.endswith(b"\r"):  # it was a line end after all
        for event in _complete_events(_lf(buffer))[0]:
            yield event


def _lf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")


def _complete_events(buffer: bytes) -> tuple[list[tuple[str, bytes]], bytes]:
    """The events of the blocks that a blank line ends, and what follows the last."""
    *blocks, rest = buffer.split(b"\n\n")
    return [e for e in map(_sse_event, blocks) if e is not None], rest


def _sse_event(block: bytes) -> tuple[str, bytes] | None:
    """The event of the lines of one block; None for a block of comments only."""
    name, data, seen = "message", [], False
    for line in block.split(b"\n"):
        if not line or line[0] == 0x3A:  # ":" starts a comment
            continue
        field_name, _, value = line.partition(b":")
        if value[:1] == b" ":
            value = value[1:]
        if field_name == b"event":
            name, seen = value.decode(), True
        elif field_name == b"data":
            data.append(value)
            seen = True
    return (name, b"\n".join(data)) if seen else None


@dataclass
class Completion:
    """What a finished model call produced."""

    text: str
    """The text of the text blocks, joined."""
    stop_reason: str
    usage: dict[str, int]
    """The token counts of the job's columns (input, output, cache write and read)."""
    result: dict[str, Any] | None = None
    """The rest of the final message: id, model, content blocks, stop_sequence and the
    whole usage object, as the provider gave them."""


DeltaSink = Callable[[int, int, str, bytes, bytes], None]
"""on_delta(kind, index, text, block_json, citation_json): one streamed piece of the
answer, kind a conveyor.v1 DeltaKind (see events.proto TokenDelta)."""

TEXT = events_pb2.DELTA_KIND_TEXT
INPUT_JSON = events_pb2.DELTA_KIND_INPUT_JSON
THINKING = events_pb2.DELTA_KIND_THINKING
SIGNATURE = events_pb2.DELTA_KIND_SIGNATURE
CITATION = events_pb2.DELTA_KIND_CITATION
BLOCK = events_pb2.DELTA_KIND_BLOCK
_DELTA_FIELDS: dict[str, tuple[int, str, str]] = {
    # delta type: (kind, the delta's field, the block's field it adds to)
    "text_delta": (TEXT, "text", "text"),
    "input_json_delta": (INPUT_JSON, "partial_json", "input"),
    "thinking_delta": (THINKING, "thinking", "thinking"),
    "signature_delta": (SIGNATURE, "signature", "signature"),
}
_USAGE_COLUMNS = (
    "input_tokens",
    "output_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
)


class MessageBuilder:
    """Builds the final message from the raw stream events, as the SDK's accumulator
    does: blocks by index from content_block_start, grown by each delta (text,
    thinking and signature appended, citations added, tool input JSON joined and
    parsed when the block stops), the usage of message_start updated by message_delta.
    """

    def __init__(self, on_delta: DeltaSink) -> None:
        self.on_delta = on_delta
        self.message: dict[str, Any] = {}
        self.usage: dict[str, Any] = {}
        self.blocks: dict[int, dict[str, Any]] = {}
        self.pieces: dict[tuple[int, str], list[str]] = {}
        self.unsent: dict[int, bytes] = {}
        """content_block_start JSON of the blocks no delta has carried yet."""
        self.stop_reason = ""
        self.stop_sequence: str | None = None

    def start(self, data: bytes) -> None:
        self.message = orjson.loads(data)["message"]
        self.usage = dict(self.message.get("usage") or {})

    def block_start(self, data: bytes) -> None:
        event = orjson.loads(data)
        index, block = int(event["index"]), event["content_block"]
        self.blocks[index] = block
        self.unsent[index] = orjson.dumps(block)

    def delta(self, data: bytes) -> None:
        event = orjson.loads(data)
        index, delta = int(event["index"]), event["delta"]
        what = _DELTA_FIELDS.get(delta.get("type"))
        if what is not None:
            kind, field_name, block_field = what
            piece = delta[field_name]
            self.pieces.setdefault((index, block_field), []).append(piece)
            self.on_delta(kind, index, piece, self.unsent.pop(index, b""), b"")
        elif delta.get("type") == "citations_delta":
            block = self.blocks.setdefault(index, {"type": "text", "text": ""})
            if not isinstance(block.get("citations"), list):
                block["citations"] = []
            block["citations"].append(delta["citation"])
            cited = orjson.dumps(delta["citation"])
            self.on_delta(CITATION, index, "", self.unsent.pop(index, b""), cited)

    def block_stop(self, data: bytes) -> None:
        index = int(orjson.loads(data)["index"])
        block = self._finish(index)
        if index in self.unsent:  # a block that streamed no delta: sent whole
            del self.unsent[index]
            self.on_delta(BLOCK, index, "", orjson.dumps(block), b"")

    def _finish(self, index: int) -> dict[str, Any]:
        """The block with its pieces folded in (once: the pieces are consumed)."""
        block = self.blocks.setdefault(index, {})
        for block_field in ("text", "thinking", "signature", "input"):
            pieces = self.pieces.pop((index, block_field), None)
            if pieces is None:
                continue
            joined = "".join(pieces)
            if block_field == "input":
                block["input"] = orjson.loads(joined) if joined.strip() else {}
            else:
                block[block_field] = (block.get(block_field) or "") + joined
        return block

    def message_delta(self, data: bytes) -> None:
        event = orjson.loads(data)
        delta = event.get("delta") or {}
        self.stop_reason = delta.get("stop_reason") or self.stop_reason
        if "stop_sequence" in delta:
            self.stop_sequence = delta["stop_sequence"]
        for key, value in (event.get("usage") or {}).items():
            if value is not None:
                self.usage[key] = value

    def completion(self) -> Completion:
        content = [self._finish(i) for i in sorted(self.blocks)]
        text = "".join(b.get("text") or "" for b in content if b.get("type") == "text")
        return Completion(
            text=text,
            stop_reason=self.stop_reason,
            usage={k: int(self.usage.get(k) or 0) for k in _USAGE_COLUMNS},
            result={
                "id": self.message.get("id"),
                "model": self.message.get("model"),
                "content": content,
                "stop_sequence": self.stop_sequence,
                "usage": self.usage,
            },
        )


_NAMED_PARAMS = frozenset(inspect.signature(AsyncMessages.create).parameters) - {
    "self",
    "stream",
    "extra_headers",
    "extra_query",
    "extra_body",
    "timeout",
}
"""The body keys this SDK's messages.create names; the others (sampling parameters,
keys of CONVEYOR_REQUEST_EXTRA_KEYS) travel in `extra_body`, at the body's top level."""


def create_arguments(body: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(keyword arguments, extra_body) that make the SDK send `body` as it is."""
    named = {k: v for k, v in body.items() if k in _NAMED_PARAMS}
    extra = {k: v for k, v in body.items() if k not in _NAMED_PARAMS}
    return named, extra or None


@dataclass
class ProviderError(Exception):
    """A failed model call, classified."""

    code: str
    message: str
    retryable: bool
    http_status: int = 0
    retry_after_s: float | None = None
    headers: Mapping[str, str] | None = field(default=None, compare=False, repr=False)
    """The `anthropic-ratelimit-*` headers of the answer, if it had any."""

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "message": self.message,
            "retryable": self.retryable,
            "http_status": self.http_status,
        }


RATE_LIMIT_HEADER_PREFIX = "anthropic-ratelimit-"


def rate_limit_headers(headers: Mapping[str, str] | None) -> dict[str, str]:
    """The provider's rate-limit headers (and retry-after) of an answer."""
    if not headers:
        return {}
    return {
        k.lower(): v
        for k, v in headers.items()
        if k.lower().startswith(RATE_LIMIT_HEADER_PREFIX) or k.lower() == "retry-after"
    }


def classify(exc: BaseException) -> ProviderError:
    """Sort a failure into transient or permanent, keeping the provider's message."""
    if isinstance(exc, ProviderError):
        return exc
    if isinstance(exc, anthropic.APIStatusError):
        body = exc.body if isinstance(exc.body, dict) else {}
        err = body.get("error") if isinstance(body.get("error"), dict) else body
        err_type = str(err.get("type", "")) if isinstance(err, dict) else ""
        message = (
            str(err.get("message", ""))
            if isinstance(err, dict) and err.get("message")
            else str(exc)
        )
        status = exc.status_code
        if status == 200:  # an `error` event in the middle of a stream
            retryable = err_type in TRANSIENT_ERROR_TYPES
        else:
            retryable = status in TRANSIENT_STATUS or status >= 500
        headers = exc.response.headers if exc.response is not None else None
        return ProviderError(
            code=err_type or f"http_{status}",
            message=message,
            retryable=retryable,
            http_status=status,
            retry_after_s=lifecycle.retry_after_s(headers),
            headers=rate_limit_headers(headers) or None,
        )
    if isinstance(exc, anthropic.APITimeoutError):
        return ProviderError("timeout", "the provider did not answer in time", retryable=True)
    if isinstance(exc, TimeoutError):  # before OSError, of which it is a subclass
        return ProviderError("timeout", "the job's timeout ended the model call", retryable=True)
    if isinstance(
        exc, anthropic.APIConnectionError | httpx2.HTTPError | aiohttp.ClientError | OSError
    ):
        # A dropped stream surfaces as an httpx-level error, not an anthropic one.
        return ProviderError("connection_error", f"{type(exc).__name__}: {exc}", retryable=True)
    return ProviderError("internal_error", f"{type(exc).__name__}: {exc}", retryable=True)


def _stream_error(data: bytes, response: httpx2.Response) -> anthropic.APIStatusError:
    """The error an `error` event in the middle of a stream stands for: what the SDK's
    own stream raises, an APIStatusError with the answer's status (200)."""
    try:
        body: Any = orjson.loads(data)
        message = f"{body}"
    except orjson.JSONDecodeError:
        text = data.decode(errors="replace")
        body, message = text, text or f"Error code: {response.status_code}"
    return anthropic.APIStatusError(message, response=response, body=body)


def check_provider(settings: Settings) -> str:
    """The API key to send; ConfigError if the provider is the real API and no key is set."""
    if settings.provider == "simulator":
        return "simulator"
    key = settings.anthropic_api_key
    if key is None or not key.get_secret_value().strip():
        raise ConfigError(
            "CONVEYOR_PROVIDER is anthropic but ANTHROPIC_API_KEY is not set: set the key,"
            " or CONVEYOR_PROVIDER=simulator to run against the bundled simulator"
        )
    return key.get_secret_value()


SIMULATOR_HEADER_PREFIX = "x-sim-"
"""Labels with this prefix become HTTP headers when the provider is the simulator
(CONVEYOR_PROVIDER=simulator), so a test can make one particular job fail; with
the real API a tenant's labels never become request headers."""


def simulator_headers(labels: Mapping[str, str] | None, attempt: int) -> dict[str, str]:
    """The request headers for the simulator: the job's `x-sim-*` labels and its attempt."""
    headers = {k: v for k, v in (labels or {}).items() if k.startswith(SIMULATOR_HEADER_PREFIX)}
    headers["x-sim-attempt"] = str(attempt)
    return headers


class _Client(anthropic.AsyncAnthropic):
    """The SDK's client, keeping what it rebuilt on every call though it never changes.

    Two of the SDK's per-call steps are remembered (overrides of its private hooks,
    pinned by tests/unit/test_provider_client.py):

    - `_prepare_url`: the request URL, parsed and joined to `base_url` per call, is
      kept per path (httpx2 URLs are immutable);
    - `default_headers`: the client's header layer (user agent, platform, auth,
      version), folded from several properties per call, is kept once the platform
      is known (the SDK resolves it at the first request).

    Both hold because the Provider makes its client once and never changes its key,
    base URL or headers afterwards (a copy made by `with_options` starts afresh), and
    it calls one path.
    """

    _urls: dict[str, httpx2.URL]
    _headers: dict[str, str | anthropic.Omit] | None

    def __init__(self, **kwargs: Any) -> None:
        self._urls, self._headers = {}, None
        super().__init__(**kwargs)

    @property
    def user_agent(self) -> str:
        return f"{anthropic.AsyncAnthropic.__name__}/Python {self._version}"  # not "_Client"

    def _prepare_url(self, url: str) -> httpx2.URL:
        prepared = self._urls.get(url)
        if prepared is None:
            prepared = self._urls[url] = super()._prepare_url(url)
        return prepared

    @property
    def default_headers(self) -> dict[str, str | anthropic.Omit]:
        headers = self._headers
        if headers is None:
            headers = super().default_headers
            if self._platform is None:
                return headers
            self._headers = headers
        return dict(headers)


@dataclass
class Provider:
    """A shared anthropic client sized for the worker's concurrency.

    It uses the SDK's aiohttp transport and reads the raw stream events itself: with
    many concurrent streams, the httpx transport's connection pool and the SDK's
    message snapshots cost much CPU per call.
    """

    settings: Settings
    client: anthropic.AsyncAnthropic = field(init=False)

    def __post_init__(self) -> None:
        key = check_provider(self.settings)
        limit = self.settings.worker_concurrency + 16
        self.client = _Client(
            api_key=key,
            base_url=self.settings.provider_base_url,
            max_retries=self.settings.anthropic_max_retries,
            # The SDK's own span of each call, under the worker's "chat" span, only when
            # spans are exported: unexported, it costs CPU on every call and shows nothing.
            open_telemetry={"traces": exporting()},
            http_client=anthropic.DefaultAioHttpClient(
                limits=httpx2.Limits(max_connections=limit, max_keepalive_connections=limit),
                timeout=httpx2.Timeout(
                    connect=10.0, read=self.settings.default_timeout_s, write=30.0, pool=None
                ),
            ),
        )

    async def stream(
        self,
        model: str,
        body: Mapping[str, Any],
        on_delta: DeltaSink,
        extra_headers: Mapping[str, str] | None = None,
        on_response: Callable[[Mapping[str, str]], Awaitable[None]] | None = None,
    ) -> Completion:
        """Run one streamed call with the request body as it was submitted, handing each
        streamed piece (text, tool input, thinking, signature, citation, whole block) to
        `on_delta` as it arrives; the final message is built from the same events.

        `on_response` gets the answer's rate-limit headers as soon as they arrive,
        before the first token.

        The SDK makes the request and raises for an error status; the events are read
        from the answer's bytes (`sse_events`) and decoded with orjson here: the SDK's
        typed events (a pydantic model each) cost more CPU than the rest of the call,
        and a real answer streams hundreds of events.
        """
        params, extra_body = create_arguments(body)
        built = MessageBuilder(on_delta)
        async with self.client.messages.with_streaming_response.create(
            model=model,
            stream=True,
            extra_headers=dict(extra_headers or {}),
            extra_body=extra_body,
            **params,
        ) as response:
            if on_response is not None:
                await on_response(rate_limit_headers(response.headers))
            async for kind, data in sse_events(response.http_response.aiter_bytes()):
                if kind == "content_block_delta":
                    built.delta(data)
                elif kind == "content_block_start":
                    built.block_start(data)
                elif kind == "content_block_stop":
                    built.block_stop(data)
                elif kind == "message_start":
                    built.start(data)
                elif kind == "message_delta":
                    built.message_delta(data)
                elif kind == "error":
                    raise _stream_error(data, response.http_response)
        if not built.stop_reason:  # the stream ended without message_delta: it was cut short
            raise ProviderError("connection_error", "the stream ended early", retryable=True)
        return built.completion()

    async def close(self) -> None:
        await self.client.close()
