"""What the simulator answers: deterministic content blocks for a request.

`plan_answer(body, wanted_tokens)` decides the blocks as the API would produce
them, all seeded from the request's messages, so a request answers the same every
time, streamed or not:

- a `thinking` block first when thinking is enabled (or adaptive): words within
  the budget, and a signature (empty thinking with display "omitted");
- `tool_use` blocks when a tool is called (see `choose_tools`): the input is a
  value of the tool's `input_schema` (`schema_values.value_for_schema`), the stop
  reason `tool_use`; two different tools are called at once when parallel use is
  allowed and there are two or more, one otherwise;
- otherwise a text block: JSON of the requested output schema
  (`output_config.format`), or `wanted_tokens` words (`plan_generation`, exactly
  what a plain text request always got), with a citation of the first document
  that has citations enabled.

Tool calls whose input does not fit in what max_tokens leaves are replaced by text
cut at max_tokens (stop reason `max_tokens`).
"""

from __future__ import annotations

import base64
import hashlib
import math
import random
from dataclasses import dataclass, field
from typing import Any, Final

from devtools.simulator.jsonio import dumps, dumps_sorted
from devtools.simulator.schema_values import value_for_schema

__all__ = [
    "VOCABULARY",
    "Answer",
    "Block",
    "Generation",
    "choose_tools",
    "plan_answer",
    "plan_generation",
]

_WORDS: Final[str] = (
    "the a an of to in for on with by from at as into over under about after "
    "before between through during without within along across behind beyond "
    "queue job worker token stream model prompt answer request message lane "
    "broker retry lease signal event batch cache shard packet vector kernel "
    "river stone cloud forest garden harbor lantern meadow mountain ocean "
    "orchard planet valley window winter summer autumn spring morning evening "
    "quick quiet bright gentle steady clever simple careful patient curious runs "
    "builds carries finds keeps moves opens reads sends turns writes waits"
)
VOCABULARY: Final[tuple[str, ...]] = tuple(_WORDS.split())
"""Words the generated text is made of; each token is one of them and a space."""


@dataclass(frozen=True, slots=True)
class Generation:
    """The planned answer to one request."""

    deltas: tuple[str, ...]
    """The text deltas, in order; their concatenation is the text."""
    output_tokens: int
    stop_reason: str
    stop_sequence: str | None

    @property
    def text(self) -> str:
        return "".join(self.deltas)


def plan_generation(
    messages: Any, max_tokens: int, wanted_tokens: int, stop_sequences: list[str] | None
) -> Generation:
    """Deterministic text for `messages`: `wanted_tokens` words, cut by max_tokens or a stop sequence."""
    digest = hashlib.blake2b(dumps_sorted(messages), digest_size=8).digest()
    rng = random.Random(int.from_bytes(digest, "big"))
    count = min(wanted_tokens, max_tokens)
    tokens = [w + " " for w in rng.choices(VOCABULARY, k=count)]
    stop_reason = "max_tokens" if wanted_tokens > max_tokens else "end_turn"
    if stop_sequences:
        text = "".join(tokens)
        best: tuple[int, str] | None = None
        for seq in stop_sequences:
            if not seq:
                continue
            at = text.find(seq)
            if at >= 0 and (best is None or at < best[0]):
                best = (at, seq)
        if best is not None:
            at, seq = best
            end = at + len(seq)
            deltas: list[str] = []
            offset = 0
            output_tokens = 0
            for tok in tokens:
                if offset >= end:
                    break
                output_tokens += 1
                if offset < at:
                    deltas.append(tok[: at - offset])
                offset += len(tok)
            return Generation(tuple(deltas), output_tokens, "stop_sequence", seq)
    return Generation(tuple(tokens), count, stop_reason, None)


JSON_CHUNK_CHARS: Final = 12
"""Characters of JSON per delta (about three tokens), for tool inputs and structured output."""


@dataclass(frozen=True, slots=True)
class Block:
    """One content block of the answer."""

    start: dict[str, Any]
    """The block as `content_block_start` announces it."""
    deltas: tuple[dict[str, Any], ...]
    """The `delta` objects of its `content_block_delta` events, in order."""
    final: dict[str, Any]
    """The whole block, as a non-streamed message carries it."""
    words: bool = False
    """The deltas are plain text tokens (the stream can use its prebuilt frames)."""


@dataclass(frozen=True, slots=True)
class Answer:
    """The planned answer to one request."""

    blocks: tuple[Block, ...]
    output_tokens: int
    stop_reason: str
    stop_sequence: str | None
    delta_count: int = field(default=0)

    @property
    def text(self) -> str:
        return "".join(b.final.get("text", "") for b in self.blocks if b.final["type"] == "text")


def _seed(messages: Any, salt: bytes) -> int:
    digest = hashlib.blake2b(dumps_sorted(messages) + salt, digest_size=8).digest()
    return int.from_bytes(digest, "big")


def _last_user_has_tool_result(messages: list[Any]) -> bool:
    for msg in reversed(messages):
        if isinstance(msg, dict) and msg.get("role") == "user":
            content = msg.get("content")
            return isinstance(content, list) and any(
                isinstance(b, dict) and b.get("type") == "tool_result" for b in content
            )
    return False


def choose_tools(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The tools the answer calls, following `tool_choice`.

    none: no tool. tool: the named one. any: some tool. auto (the default): a tool
    when the last user turn is not a tool_result (the model has not been answered
    yet), text after one. Only client tools (with an `input_schema`) are picked by
    auto/any; two at once unless `disable_parallel_tool_use`.
    """
    tools = [t for t in body.get("tools") or [] if isinstance(t, dict)]
    choice = body.get("tool_choice") or {"type": "auto"}
    kind = choice.get("type", "auto")
    if not tools or kind == "none":
        return []
    if kind == "tool":
        return [t for t in tools if t.get("name") == choice.get("name")][:1]
    if kind == "auto" and _last_user_has_tool_result(body["messages"]):
        return []
    client = [t for t in tools if isinstance(t.get("input_schema"), dict)]
    if not client:
        return []
    count = 1 if choice.get("disable_parallel_tool_use") or len(client) < 2 else 2
    first = _seed(body["messages"], b"tools") % len(client)
    return [client[(first + i) % len(client)] for i in range(count)]


def _chunks(text: str) -> tuple[str, ...]:
    return tuple(text[i : i + JSON_CHUNK_CHARS] for i in range(0, len(text), JSON_CHUNK_CHARS))


def _json_tokens(text: str) -> int:
    return max(1, math.ceil(len(text) / 4))


def _thinking_block(body: dict[str, Any], wanted: int) -> tuple[Block, int] | None:
    thinking = body.get("thinking")
    if not isinstance(thinking, dict) or thinking.get("type") not in ("enabled", "adaptive"):
        return None
    max_tokens: int = body["max_tokens"]
    budget = thinking.get("budget_tokens") if thinking["type"] == "enabled" else max_tokens // 2
    count = max(0, min(wanted, int(budget or 0), max_tokens - 1))
    rng = random.Random(_seed(body["messages"], b"thinking"))
    words = [w + " " for w in rng.choices(VOCABULARY, k=count)]
    if thinking.get("display") == "omitted":
        words = []
    text = "".join(words)
    mac = hashlib.blake2b(text.encode(), key=b"conveyor-simulator", digest_size=48).digest()
    signature = "Sim" + base64.b64encode(mac).decode()
    deltas = [{"type": "thinking_delta", "thinking": w} for w in words]
    deltas.append({"type": "signature_delta", "signature": signature})
    block = Block(
        start={"type": "thinking", "thinking": "", "signature": ""},
        deltas=tuple(deltas),
        final={"type": "thinking", "thinking": text, "signature": signature},
    )
    return block, count


def _tool_blocks(body: dict[str, Any], tools: list[dict[str, Any]]) -> tuple[list[Block], int]:
    blocks: list[Block] = []
    tokens = 0
    for i, tool in enumerate(tools):
        name = str(tool.get("name"))
        salt = f"tool:{i}:{name}".encode()
        seed = _seed(body["messages"], salt)
        value = value_for_schema(tool.get("input_schema") or {"type": "object"}, seed)
        text = dumps(value).decode()
        tokens += _json_tokens(text)
        tool_id = (
            "toolu_sim"
            + hashlib.blake2b(dumps_sorted(body["messages"]) + salt, digest_size=12).hexdigest()
        )
        start = {"type": "tool_use", "id": tool_id, "name": name, "input": {}}
        blocks.append(
            Block(
                start=start,
                deltas=tuple(
                    {"type": "input_json_delta", "partial_json": c} for c in _chunks(text)
                ),
                final={**start, "input": value},
            )
        )
    return blocks, tokens


def _citation(body: dict[str, Any]) -> dict[str, Any] | None:
    """A citation of the first document with citations enabled, as the API shapes it."""
    index = 0
    for msg in body["messages"]:
        content = msg.get("content") if isinstance(msg, dict) else None
        for block in content if isinstance(content, list) else []:
            if not isinstance(block, dict) or block.get("type") != "document":
                continue
            citations = block.get("citations")
            if isinstance(citations, dict) and citations.get("enabled"):
                source = block.get("source") or {}
                title = block.get("title") if isinstance(block.get("title"), str) else None
                out: dict[str, Any] = {"document_index": index, "document_title": title}
                kind = source.get("type")
                if kind == "text":
                    cited = str(source.get("data", ""))[:100]
                    return {
                        "type": "char_location",
                        "cited_text": cited,
                        **out,
                        "start_char_index": 0,
                        "end_char_index": len(cited),
                    }
                if kind == "content":
                    inner = source.get("content")
                    first = inner if isinstance(inner, str) else ""
                    if isinstance(inner, list) and inner and isinstance(inner[0], dict):
                        first = str(inner[0].get("text", ""))
                    return {
                        "type": "content_block_location",
                        "cited_text": first,
                        **out,
                        "start_block_index": 0,
                        "end_block_index": 1,
                    }
                return {
                    "type": "page_location",
                    "cited_text": title or "",
                    **out,
                    "start_page_number": 1,
                    "end_page_number": 2,
                }
            index += 1
    return None


def _text_block(text_deltas: tuple[str, ...], citation: dict[str, Any] | None) -> Block:
    deltas: list[dict[str, Any]] = [{"type": "text_delta", "text": d} for d in text_deltas]
    final: dict[str, Any] = {"type": "text", "text": "".join(text_deltas)}
    if citation is not None:
        deltas.append({"type": "citations_delta", "citation": citation})
        final["citations"] = [citation]
    return Block(
        start={"type": "text", "text": ""},
        deltas=tuple(deltas),
        final=final,
        words=citation is None,
    )


def plan_answer(body: dict[str, Any], wanted_tokens: int) -> Answer:
    """The answer to a (valid) request; `wanted_tokens` words of text or thinking."""
    messages = body["messages"]
    max_tokens: int = body["max_tokens"]
    wanted = max(0, wanted_tokens)
    blocks: list[Block] = []
    used = 0
    thought = _thinking_block(body, wanted)
    if thought is not None:
        blocks.append(thought[0])
        used = thought[1]
    left = max_tokens - used

    tools = choose_tools(body)
    if tools:
        tool_blocks, cost = _tool_blocks(body, tools)
        if cost <= left:
            blocks.extend(tool_blocks)
            return _answer(blocks, used + cost, "tool_use", None)

    fmt = (body.get("output_config") or {}).get("format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        text = dumps(value_for_schema(fmt.get("schema"), _seed(messages, b"output"))).decode()
        cost = _json_tokens(text)
        stop = "end_turn"
        if cost > left:  # cut, as the API cuts a long answer: not valid JSON then
            text, cost, stop = text[: left * 4], left, "max_tokens"
        blocks.append(_text_block(_chunks(text), None))
        return _answer(blocks, used + cost, stop, None)

    gen = plan_generation(messages, left, wanted, body.get("stop_sequences"))
    blocks.append(_text_block(gen.deltas, _citation(body)))
    return _answer(blocks, used + gen.output_tokens, gen.stop_reason, gen.stop_sequence)


def _answer(blocks: list[Block], tokens: int, stop: str, sequence: str | None) -> Answer:
    return Answer(tuple(blocks), tokens, stop, sequence, sum(len(b.deltas) for b in blocks))
