"""`VALID`: (name, body) pairs of real shapes that `messages.create(**body)` takes and
that Conveyor must accept and carry unchanged."""

from __future__ import annotations

from tests.bodies.parts import (
    _ASK,
    _CALL,
    EPHEMERAL_1H,
    EPHEMERAL_5M,
    GIF_B64,
    JPEG_B64,
    PDF_BLOCK,
    PNG_B64,
    THINKING,
    TIME_TOOL,
    WEATHER_TOOL,
    WEBP_B64,
    Body,
    assistant,
    body,
    image,
    text,
    tool_result,
    tool_use,
    user,
)

VALID: list[tuple[str, Body]] = [
    ("text string", body("Hello, Claude")),
    ("text blocks", body(user(text("Hello"), text("again")))),
    ("multi-turn text", body("Hi", {"role": "assistant", "content": "Hello!"}, "How are you?")),
    (
        "assistant prefill",
        body("Answer (A) or (B)?", {"role": "assistant", "content": "The answer is ("}),
    ),
    ("system string", body("Hi", system="You are terse.")),
    ("system blocks", body("Hi", system=[text("You are terse."), text("Answer in French.")])),
    ("image base64 png", body(user(image("image/png", PNG_B64), text("Describe it.")))),
    ("image base64 jpeg", body(user(image("image/jpeg", JPEG_B64), text("What is this?")))),
    ("image base64 gif", body(user(image("image/gif", GIF_B64)))),
    ("image base64 webp", body(user(image("image/webp", WEBP_B64)))),
    (
        "image url",
        body(
            user({"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}})
        ),
    ),
    ("pdf base64", body(user(PDF_BLOCK, text("Summarise this.")))),
    (
        "pdf url with citations",
        body(
            user(
                {
                    "type": "document",
                    "source": {"type": "url", "url": "https://example.com/paper.pdf"},
                    "citations": {"enabled": True},
                    "title": "Paper",
                },
                text("Quote the abstract."),
            )
        ),
    ),
    (
        "plain text document",
        body(
            user(
                {
                    "type": "document",
                    "source": {
                        "type": "text",
                        "media_type": "text/plain",
                        "data": "The sky is blue.",
                    },
                    "context": "A fact sheet",
                },
                text("What colour is the sky?"),
            )
        ),
    ),
    ("single tool", body(_ASK, tools=[WEATHER_TOOL])),
    (
        "multi-turn tool use with tool_result",
        body(
            _ASK,
            assistant(text("Checking."), _CALL),
            user(tool_result("toolu_01", "18C, sunny")),
            tools=[WEATHER_TOOL],
        ),
    ),
    (
        "tool_result with blocks and is_error",
        body(
            _ASK,
            assistant(_CALL),
            user(tool_result("toolu_01", [text("service down")], is_error=True)),
            tools=[WEATHER_TOOL],
        ),
    ),
    (
        "tool_result with an image",
        body(
            _ASK,
            assistant(_CALL),
            user(tool_result("toolu_01", [image("image/png", PNG_B64)])),
            tools=[WEATHER_TOOL],
        ),
    ),
    (
        "parallel tools",
        body(
            "Weather and time in Paris?",
            assistant(_CALL, tool_use("toolu_02", "get_time", {"city": "Paris"})),
            user(tool_result("toolu_01", "18C"), tool_result("toolu_02", "14:05")),
            tools=[WEATHER_TOOL, TIME_TOOL],
        ),
    ),
    ("tool_choice auto", body(_ASK, tools=[WEATHER_TOOL], tool_choice={"type": "auto"})),
    (
        "tool_choice any, no parallel",
        body(
            _ASK,
            tools=[WEATHER_TOOL, TIME_TOOL],
            tool_choice={"type": "any", "disable_parallel_tool_use": True},
        ),
    ),
    (
        "tool_choice tool",
        body(_ASK, tools=[WEATHER_TOOL], tool_choice={"type": "tool", "name": "get_weather"}),
    ),
    ("tool_choice none", body(_ASK, tools=[WEATHER_TOOL], tool_choice={"type": "none"})),
    ("strict tool", body(_ASK, tools=[{**WEATHER_TOOL, "strict": True}])),
    ("thinking enabled", body("Prove it.", thinking=THINKING, max_tokens=4096)),
    ("thinking adaptive", body("Prove it.", thinking={"type": "adaptive"})),
    ("thinking disabled", body("Hi", thinking={"type": "disabled"})),
    (
        "multi-turn thinking with signatures",
        body(
            _ASK,
            assistant(
                {
                    "type": "thinking",
                    "thinking": "I should call the tool.",
                    "signature": "EqQBCgIYAhIM1gbcDa9",
                },
                _CALL,
            ),
            user(tool_result("toolu_01", "18C")),
            tools=[WEATHER_TOOL],
            thinking=THINKING,
            max_tokens=4096,
        ),
    ),
    (
        "redacted thinking",
        body(
            _ASK,
            assistant({"type": "redacted_thinking", "data": "EmwKAhgBEgy3va3pzix/LafPsn4a"}, _CALL),
            user(tool_result("toolu_01", "18C")),
            tools=[WEATHER_TOOL],
            thinking=THINKING,
            max_tokens=4096,
        ),
    ),
    (
        "cache_control on system 5m",
        body("Hi", system=[text("Long instructions.", cache_control=EPHEMERAL_5M)]),
    ),
    (
        "cache_control on system 1h",
        body("Hi", system=[text("Long instructions.", cache_control=EPHEMERAL_1H)]),
    ),
    ("cache_control on tools", body(_ASK, tools=[{**WEATHER_TOOL, "cache_control": EPHEMERAL_1H}])),
    (
        "cache_control on a message",
        body(user(text("A long document.", cache_control={"type": "ephemeral"}))),
    ),
    (
        "cache_control on image and pdf, both ttls",
        body(
            user(
                image("image/png", PNG_B64, cache_control=EPHEMERAL_1H),
                {**PDF_BLOCK, "cache_control": EPHEMERAL_5M},
            )
        ),
    ),
    ("top-level cache_control", body("Hi", cache_control=EPHEMERAL_5M)),
    (
        "output schema",
        body(
            "Extract the name.",
            output_config={
                "format": {
                    "type": "json_schema",
                    "schema": {
                        "type": "object",
                        "properties": {"name": {"type": "string"}},
                        "required": ["name"],
                        "additionalProperties": False,
                    },
                }
            },
        ),
    ),
    ("output effort", body("Hi", output_config={"effort": "low"})),
    ("stop sequences", body("Count to ten.", stop_sequences=["5", "\n\nHuman:"])),
    ("metadata", body("Hi", metadata={"user_id": "user-1234"})),
    ("service tier", body("Hi", service_tier="standard_only")),
    # Not named by this SDK's create(): at the body's top level, as the API takes them.
    ("sampling parameters", body("Hi", temperature=0.7, top_p=0.9, top_k=40)),
    (
        "server tool web search",
        body(
            "News today?",
            tools=[{"type": "web_search_20250305", "name": "web_search", "max_uses": 3}],
        ),
    ),
    (
        "search result block",
        body(
            user(
                {
                    "type": "search_result",
                    "source": "https://example.com/doc",
                    "title": "Doc",
                    "content": [text("Paris is the capital of France.")],
                    "citations": {"enabled": True},
                },
                text("What is the capital?"),
            )
        ),
    ),
    ("container id", body("Run it.", container="container_011")),
    ("inference geo and speed", body("Hi", inference_geo="us", speed="standard")),
]
