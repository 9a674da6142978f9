"""The server-sent events of a streamed answer, byte for byte as the API sends them.

A stream is `message_start`, then for each content block `content_block_start`, its
`content_block_delta` events (text_delta, input_json_delta, thinking_delta,
signature_delta, citations_delta) and `content_block_stop`, then `message_delta`
(stop reason, output tokens) and `message_stop`; a `ping` follows the first block's
start. Frames of plain word tokens in block 0 are built once and reused.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from devtools.simulator.content import VOCABULARY, Answer
from devtools.simulator.jsonio import dumps

__all__ = ["ERROR_EVENT_FRAME", "StreamFrames", "frame", "stream_frames"]

_DELTA_PREFIX: Final[bytes] = (
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
    b'"delta":{"type":"text_delta","text":'
)
_DELTA_SUFFIX: Final[bytes] = b"}}\n\n"


def _text_frame(text: str) -> bytes:
    return _DELTA_PREFIX + dumps(text) + _DELTA_SUFFIX


_WORD_FRAMES: Final[dict[str, bytes]] = {w + " ": _text_frame(w + " ") for w in VOCABULARY}
"""The block-0 `content_block_delta` frame of every whole token, built once."""

PING_FRAME: Final[bytes] = b'event: ping\ndata: {"type":"ping"}\n\n'
MESSAGE_STOP_FRAME: Final[bytes] = b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
ERROR_EVENT_FRAME: Final[bytes] = (
    b"event: error\n"
    b'data: {"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}\n\n'
)


def frame(event: str, data: Mapping[str, Any]) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + dumps(data) + b"\n\n"


@dataclass(frozen=True, slots=True)
class StreamFrames:
    """A stream cut where its pace applies: `head`, one unit per delta, `tail`."""

    head: bytes
    """message_start, the first block's start and a ping."""
    units: list[bytes]
    """Each delta's frame, preceded by the stop and start of blocks it crosses into."""
    tail: bytes
    """The last block's stop, message_delta and message_stop."""


def stream_frames(answer: Answer, message: Mapping[str, Any]) -> StreamFrames:
    """The frames of `answer`; `message` is the message_start's (empty) message."""
    head = frame("message_start", {"type": "message_start", "message": message})
    units: list[bytes] = []
    pending = b""
    for index, block in enumerate(answer.blocks):
        start = frame(
            "content_block_start",
            {"type": "content_block_start", "index": index, "content_block": block.start},
        )
        if index == 0:
            head += start + PING_FRAME
        else:
            pending += start
        for delta in block.deltas:
            if index == 0 and block.words and delta["type"] == "text_delta":
                text: str = delta["text"]
                data = _WORD_FRAMES.get(text) or _text_frame(text)
            else:
                data = frame(
                    "content_block_delta",
                    {"type": "content_block_delta", "index": index, "delta": delta},
                )
            units.append(pending + data)
            pending = b""
        pending += frame("content_block_stop", {"type": "content_block_stop", "index": index})
    message_delta = frame(
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": answer.stop_reason, "stop_sequence": answer.stop_sequence},
            "usage": {"output_tokens": answer.output_tokens},
        },
    )
    return StreamFrames(head, units, pending + message_delta + MESSAGE_STOP_FRAME)
