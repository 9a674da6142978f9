"""Checks of a Messages API request body, about as strict as the real API.

Each refusal is an `InvalidRequest` whose message starts with the path of the
offending field (`messages.1.content.0.source.media_type: ...`), answered as a 400
`invalid_request_error`. Checked: the required fields and their types; roles;
content block types by role (user: text, image, document, tool_result,
search_result; assistant: text, tool_use, thinking, redacted_thinking, server tool
blocks); image and document sources (base64 data that decodes and matches its
media type); tool_use/tool_result pairing between consecutive turns; tools (names,
uniqueness, `input_schema` of type object); `tool_choice` (its type, a named tool
that exists, no forced tool with thinking); `thinking` (budget_tokens >= 1024 and
below max_tokens); `output_config.format`; cache_control (type, TTL, at most 4
breakpoints, a 1h breakpoint never after a 5m one). Unknown top-level keys pass,
so a new API parameter does not break the simulator.
"""

from __future__ import annotations

import re
from typing import Any, Final

from devtools.simulator.tokens import decode_base64, image_size

__all__ = [
    "MAX_CACHE_BREAKPOINTS",
    "MIN_THINKING_BUDGET",
    "InvalidRequest",
    "validate_body",
    "validate_count_tokens",
    "validate_messages",
]


class InvalidRequest(ValueError):
    """The request body is not a valid Messages API request (400 invalid_request_error)."""


MIN_THINKING_BUDGET: Final = 1024
MAX_CACHE_BREAKPOINTS: Final = 4
_METADATA_KEYS: Final[frozenset[str]] = frozenset({"user_id"})
_ROLES: Final[frozenset[str]] = frozenset({"user", "assistant"})
_USER_BLOCKS: Final[frozenset[str]] = frozenset(
    {"text", "image", "document", "tool_result", "search_result", "container_upload"}
)
_ASSISTANT_BLOCKS: Final[frozenset[str]] = frozenset(
    {
        "text",
        "tool_use",
        "thinking",
        "redacted_thinking",
        "server_tool_use",
        "web_search_tool_result",
        "web_fetch_tool_result",
        "code_execution_tool_result",
        "bash_code_execution_tool_result",
        "text_editor_code_execution_tool_result",
        "tool_search_tool_result",
        "mcp_tool_use",
        "mcp_tool_result",
        "compaction",
    }
)
_IMAGE_TYPES: Final[tuple[str, ...]] = ("image/jpeg", "image/png", "image/gif", "image/webp")
_TOOL_NAME: Final = re.compile(r"^[a-zA-Z0-9_-]{1,128}$")
_THINKING_TYPES: Final[tuple[str, ...]] = ("enabled", "disabled", "adaptive", "between_tools")
_TOOL_CHOICE_TYPES: Final[tuple[str, ...]] = ("auto", "any", "tool", "none")
_TTLS: Final[tuple[str, ...]] = ("5m", "1h")


def validate_body(body: Any) -> None:
    """Check a `POST /v1/messages` body; raise InvalidRequest naming the field."""
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    for name in ("model", "max_tokens", "messages"):
        if name not in body:
            raise InvalidRequest(f"{name}: Field required")
    model = body["model"]
    if not isinstance(model, str) or not model:
        raise InvalidRequest("model: Input should be a valid string")
    max_tokens = body["max_tokens"]
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
        raise InvalidRequest("max_tokens: Input should be a valid integer")
    if max_tokens < 1:
        raise InvalidRequest("max_tokens: Input should be greater than or equal to 1")
    _validate_common(body)
    temperature = body.get("temperature")
    if temperature is not None and (
        isinstance(temperature, bool)
        or not isinstance(temperature, int | float)
        or not 0 <= temperature <= 1
    ):
        raise InvalidRequest("temperature: Input should be a number between 0 and 1")
    stops = body.get("stop_sequences")
    if stops is not None and (
        not isinstance(stops, list) or not all(isinstance(s, str) for s in stops)
    ):
        raise InvalidRequest("stop_sequences: Input should be a valid list of strings")
    metadata = body.get("metadata")
    if metadata is not None:
        if not isinstance(metadata, dict):
            raise InvalidRequest("metadata: Input should be a valid dictionary")
        for key in metadata:
            if key not in _METADATA_KEYS:
                raise InvalidRequest(f"metadata.{key}: Extra inputs are not permitted")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise InvalidRequest("stream: Input should be a valid boolean")
    _validate_thinking(body, max_tokens)


def validate_count_tokens(body: Any) -> None:
    """Check a `POST /v1/messages/count_tokens` body (no max_tokens)."""
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    for name in ("model", "messages"):
        if name not in body:
            raise InvalidRequest(f"{name}: Field required")
    _validate_common(body)


def _validate_common(body: dict[str, Any]) -> None:
    validate_messages(body["messages"])
    system = body.get("system")
    if system is not None and not isinstance(system, str | list):
        raise InvalidRequest("system: Input should be a valid string or a list of text blocks")
    if isinstance(system, list):
        for i, block in enumerate(system):
            if not isinstance(block, dict) or block.get("type") != "text":
                raise InvalidRequest(f"system.{i}.type: Input should be 'text'")
            if not isinstance(block.get("text"), str):
                raise InvalidRequest(f"system.{i}.text: Field required")
    names = _validate_tools(body.get("tools"))
    _validate_tool_choice(body.get("tool_choice"), names, body.get("tools") is not None)
    if _uses_tool_blocks(body["messages"]) and not body.get("tools"):
        raise InvalidRequest(
            "Requests which include `tool_use` or `tool_result` blocks must define tools."
        )
    _validate_output_config(body.get("output_config"))
    _validate_cache_controls(body)


def validate_messages(messages: Any) -> None:
    """Check `messages`: roles, block types by role, sources, tool_use/tool_result pairs."""
    if not isinstance(messages, list):
        raise InvalidRequest("messages: Input should be a valid list")
    if not messages:
        raise InvalidRequest("messages: at least one message is required")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise InvalidRequest(f"messages.{i}: Input should be a valid dictionary")
        if msg.get("role") not in _ROLES:
            raise InvalidRequest(f"messages.{i}.role: Input should be 'user' or 'assistant'")
        if "content" not in msg:
            raise InvalidRequest(f"messages.{i}.content: Field required")
        content = msg["content"]
        if not isinstance(content, str | list):
            raise InvalidRequest(f"messages.{i}.content: Input should be a valid string or list")
        if isinstance(content, list):
            allowed = _USER_BLOCKS if msg["role"] == "user" else _ASSISTANT_BLOCKS
            for j, block in enumerate(content):
                _validate_block(block, f"messages.{i}.content.{j}", allowed)
    _validate_tool_pairs(messages)


def _validate_block(block: Any, path: str, allowed: frozenset[str]) -> None:
    if not isinstance(block, dict):
        raise InvalidRequest(f"{path}: Input should be a valid dictionary")
    kind = block.get("type")
    if kind not in allowed:
        expected = ", ".join(f"'{t}'" for t in sorted(allowed))
        raise InvalidRequest(
            f"{path}: Input tag '{kind}' found using 'type' does not match any of the "
            f"expected tags: {expected}"
        )
    if kind == "text" and not isinstance(block.get("text"), str):
        raise InvalidRequest(f"{path}.text: Field required")
    elif kind == "image":
        _validate_image_source(block.get("source"), f"{path}.source")
    elif kind == "document":
        _validate_document_source(block.get("source"), f"{path}.source")
    elif kind == "tool_use":
        for name in ("id", "name"):
            if not isinstance(block.get(name), str) or not block[name]:
                raise InvalidRequest(f"{path}.{name}: Field required")
        if not isinstance(block.get("input"), dict):
            raise InvalidRequest(f"{path}.input: Input should be a valid dictionary")
    elif kind == "tool_result":
        if not isinstance(block.get("tool_use_id"), str) or not block["tool_use_id"]:
            raise InvalidRequest(f"{path}.tool_use_id: Field required")
        inner = block.get("content")
        if inner is not None and not isinstance(inner, str | list):
            raise InvalidRequest(f"{path}.content: Input should be a valid string or list")
        if isinstance(inner, list):
            for k, sub in enumerate(inner):
                _validate_block(
                    sub,
                    f"{path}.content.{k}",
                    frozenset({"text", "image", "document", "search_result"}),
                )
    elif kind == "thinking":
        for name in ("thinking", "signature"):
            if not isinstance(block.get(name), str):
                raise InvalidRequest(f"{path}.{name}: Field required")
    elif kind == "redacted_thinking" and not isinstance(block.get("data"), str):
        raise InvalidRequest(f"{path}.data: Field required")


def _validate_image_source(source: Any, path: str) -> None:
    if not isinstance(source, dict):
        raise InvalidRequest(f"{path}: Field required")
    kind = source.get("type")
    if kind == "base64":
        media_type = source.get("media_type")
        if media_type not in _IMAGE_TYPES:
            expected = ", ".join(f"'{t}'" for t in _IMAGE_TYPES)
            raise InvalidRequest(f"{path}.media_type: Input should be {expected}")
        data = decode_base64(source.get("data"))
        if data is None:
            raise InvalidRequest(f"{path}.data: The image data is not valid base64")
        size = image_size(data)
        if size is None:
            raise InvalidRequest(f"{path}.data: Could not process image")
        if size[0] != media_type:
            raise InvalidRequest(
                f"{path}.data: Image does not match the provided media type {media_type}"
            )
    elif kind == "url":
        if not isinstance(source.get("url"), str) or not source["url"]:
            raise InvalidRequest(f"{path}.url: Field required")
    elif kind == "file":
        if not isinstance(source.get("file_id"), str) or not source["file_id"]:
            raise InvalidRequest(f"{path}.file_id: Field required")
    else:
        raise InvalidRequest(
            f"{path}: Input tag '{kind}' found using 'type' does not match any of the "
            "expected tags: 'base64', 'file', 'url'"
        )


def _validate_document_source(source: Any, path: str) -> None:
    if not isinstance(source, dict):
        raise InvalidRequest(f"{path}: Field required")
    kind = source.get("type")
    if kind == "base64":
        if source.get("media_type") != "application/pdf":
            raise InvalidRequest(f"{path}.media_type: Input should be 'application/pdf'")
        data = decode_base64(source.get("data"))
        if data is None:
            raise InvalidRequest(f"{path}.data: The PDF data is not valid base64")
        if not data.startswith(b"%PDF-"):
            raise InvalidRequest(f"{path}.data: The PDF specified was not valid.")
    elif kind == "text":
        if source.get("media_type") != "text/plain":
            raise InvalidRequest(f"{path}.media_type: Input should be 'text/plain'")
        if not isinstance(source.get("data"), str):
            raise InvalidRequest(f"{path}.data: Field required")
    elif kind == "content":
        inner = source.get("content")
        if not isinstance(inner, str | list):
            raise InvalidRequest(f"{path}.content: Input should be a valid string or list")
        if isinstance(inner, list):
            for k, sub in enumerate(inner):
                _validate_block(sub, f"{path}.content.{k}", frozenset({"text", "image"}))
    elif kind == "url":
        if not isinstance(source.get("url"), str) or not source["url"]:
            raise InvalidRequest(f"{path}.url: Field required")
    elif kind == "file":
        if not isinstance(source.get("file_id"), str) or not source["file_id"]:
            raise InvalidRequest(f"{path}.file_id: Field required")
    else:
        raise InvalidRequest(
            f"{path}: Input tag '{kind}' found using 'type' does not match any of the "
            "expected tags: 'base64', 'content', 'file', 'text', 'url'"
        )


def _blocks(msg: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    content = msg.get("content")
    if not isinstance(content, list):
        return []
    return [b for b in content if isinstance(b, dict) and b.get("type") == kind]


def _validate_tool_pairs(messages: list[Any]) -> None:
    """Every tool_result answers a tool_use of the assistant turn just before it, and
    every tool_use of an assistant turn is answered in the user turn that follows."""
    for i, msg in enumerate(messages):
        results = _blocks(msg, "tool_result")
        if msg["role"] == "user" and results:
            previous = messages[i - 1] if i > 0 else None
            asked = (
                {b.get("id") for b in _blocks(previous, "tool_use")}
                if previous is not None and previous["role"] == "assistant"
                else set()
            )
            unknown = [b["tool_use_id"] for b in results if b["tool_use_id"] not in asked]
            if unknown:
                raise InvalidRequest(
                    f"messages.{i}.content.0: unexpected `tool_use_id` found in `tool_result` "
                    f"blocks: {', '.join(unknown)}. Each `tool_result` block must have a "
                    "corresponding `tool_use` block in the previous message."
                )
    for i, msg in enumerate(messages):
        uses = _blocks(msg, "tool_use")
        if msg["role"] == "assistant" and uses and i + 1 < len(messages):
            answered = {b.get("tool_use_id") for b in _blocks(messages[i + 1], "tool_result")}
            missing = [b["id"] for b in uses if b["id"] not in answered]
            if missing:
                raise InvalidRequest(
                    f"messages.{i}: `tool_use` ids were found without `tool_result` blocks "
                    f"immediately after: {', '.join(missing)}. Each `tool_use` block must "
                    "have a corresponding `tool_result` block in the next message."
                )


def _uses_tool_blocks(messages: list[Any]) -> bool:
    return any(_blocks(m, "tool_use") or _blocks(m, "tool_result") for m in messages)


def _validate_tools(tools: Any) -> set[str]:
    """Check `tools`; the names of the tools."""
    if tools is None:
        return set()
    if not isinstance(tools, list):
        raise InvalidRequest("tools: Input should be a valid list")
    names: set[str] = set()
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise InvalidRequest(f"tools.{i}: Input should be a valid dictionary")
        name = tool.get("name")
        if not isinstance(name, str) or not _TOOL_NAME.match(name):
            raise InvalidRequest(
                f"tools.{i}.name: String should match pattern '^[a-zA-Z0-9_-]{{1,128}}$'"
            )
        if name in names:
            raise InvalidRequest("tools: Tool names must be unique.")
        names.add(name)
        kind = tool.get("type")
        if kind is None or kind == "custom":
            schema = tool.get("input_schema")
            if not isinstance(schema, dict):
                raise InvalidRequest(f"tools.{i}.custom.input_schema: Field required")
            if schema.get("type") != "object":
                raise InvalidRequest(
                    f"tools.{i}.custom.input_schema.type: Input should be 'object'"
                )
    return names


def _validate_tool_choice(choice: Any, names: set[str], has_tools: bool) -> None:
    if choice is None:
        return
    if not isinstance(choice, dict) or choice.get("type") not in _TOOL_CHOICE_TYPES:
        raise InvalidRequest(
            "tool_choice: Input tag found using 'type' does not match any of the expected "
            "tags: 'auto', 'any', 'tool', 'none'"
        )
    kind = choice["type"]
    parallel = choice.get("disable_parallel_tool_use")
    if parallel is not None and not isinstance(parallel, bool):
        raise InvalidRequest(
            f"tool_choice.{kind}.disable_parallel_tool_use: Input should be a valid boolean"
        )
    if kind in ("any", "tool") and not has_tools:
        raise InvalidRequest(
            "tool_choice: `tool_choice` may only be specified while providing `tools`."
        )
    if kind == "tool":
        name = choice.get("name")
        if not isinstance(name, str):
            raise InvalidRequest("tool_choice.tool.name: Field required")
        if name not in names:
            raise InvalidRequest(f"tool_choice.tool.name: Tool '{name}' not found in `tools`.")


def _validate_thinking(body: dict[str, Any], max_tokens: int) -> None:
    thinking = body.get("thinking")
    if thinking is None:
        return
    if not isinstance(thinking, dict) or thinking.get("type") not in _THINKING_TYPES:
        raise InvalidRequest(
            "thinking: Input tag found using 'type' does not match any of the expected "
            "tags: 'adaptive', 'between_tools', 'disabled', 'enabled'"
        )
    if thinking["type"] == "enabled":
        budget = thinking.get("budget_tokens")
        if isinstance(budget, bool) or not isinstance(budget, int):
            raise InvalidRequest("thinking.enabled.budget_tokens: Field required")
        if budget < MIN_THINKING_BUDGET:
            raise InvalidRequest(
                "thinking.enabled.budget_tokens: Input should be greater than or equal to "
                f"{MIN_THINKING_BUDGET}"
            )
        if budget >= max_tokens:
            raise InvalidRequest(
                "`max_tokens` must be greater than `thinking.budget_tokens`. Please consult "
                "our documentation at https://docs.claude.com/en/docs/build-with-claude/"
                "extended-thinking#max-tokens-and-context-window-size"
            )
    if thinking["type"] in ("enabled", "adaptive"):
        choice = body.get("tool_choice")
        if isinstance(choice, dict) and choice.get("type") in ("any", "tool"):
            raise InvalidRequest("Thinking may not be enabled when tool_choice forces tool use.")
        temperature = body.get("temperature")
        if temperature is not None and temperature != 1:
            raise InvalidRequest(
                "`temperature` may only be set to 1 when thinking is enabled or in "
                "adaptive mode. Please consult our documentation at "
                "https://docs.claude.com/en/docs/build-with-claude/extended-thinking"
            )


def _validate_output_config(config: Any) -> None:
    if config is None:
        return
    if not isinstance(config, dict):
        raise InvalidRequest("output_config: Input should be a valid dictionary")
    fmt = config.get("format")
    if fmt is None:
        return
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
        raise InvalidRequest("output_config.format.type: Input should be 'json_schema'")
    if not isinstance(fmt.get("schema"), dict):
        raise InvalidRequest("output_config.format.schema: Field required")


def _validate_cache_controls(body: dict[str, Any]) -> None:
    """cache_control markers: type and TTL, at most 4, no 1h after a 5m (prefix order)."""
    found: list[tuple[str, str]] = []

    def check(node: Any, path: str) -> None:
        marker = node.get("cache_control") if isinstance(node, dict) else None
        if marker is None:
            return
        where = f"{path}.cache_control" if path else "cache_control"
        if not isinstance(marker, dict) or marker.get("type") != "ephemeral":
            raise InvalidRequest(f"{where}.type: Input should be 'ephemeral'")
        ttl = marker.get("ttl", "5m")
        if ttl not in _TTLS:
            raise InvalidRequest(f"{where}.ttl: Input should be '5m' or '1h'")
        found.append((where, ttl))

    for name in ("tools", "system"):
        units = body.get(name)
        for i, unit in enumerate(units if isinstance(units, list) else []):
            check(unit, f"{name}.{i}")
    for i, msg in enumerate(body["messages"]):
        content = msg.get("content")
        for j, block in enumerate(content if isinstance(content, list) else []):
            check(block, f"messages.{i}.content.{j}")
            inner = block.get("content") if isinstance(block, dict) else None
            for k, sub in enumerate(inner if isinstance(inner, list) else []):
                check(sub, f"messages.{i}.content.{j}.content.{k}")
    check(body, "")
    if len(found) > MAX_CACHE_BREAKPOINTS:
        raise InvalidRequest(
            f"A maximum of {MAX_CACHE_BREAKPOINTS} blocks with cache_control may be provided. "
            f"Found {len(found)}."
        )
    seen_5m = False
    for where, ttl in found:
        if ttl == "5m":
            seen_5m = True
        elif seen_5m:
            raise InvalidRequest(
                f"{where}: a ttl='1h' cache_control block must not come after a ttl='5m' "
                "cache_control block. Note that blocks are processed in the following "
                "order: `tools`, `system`, `messages`."
            )
