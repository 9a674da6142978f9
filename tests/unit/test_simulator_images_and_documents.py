"""The simulator reads images and documents like the Messages API: they count as input
tokens (as do tools), and a document with citations enabled gets a cited answer.
Driven by the real `anthropic` SDK, streamed and not."""

from __future__ import annotations

import base64
import json
import math
from typing import Any

import anthropic
import pytest

from devtools.simulator.tokens import PDF_PAGE_TOKENS, estimate_input_tokens
from tests.unit.simulator_calls import (
    ASK,
    MODEL,
    WEATHER,
    png,
    simulator_and_client,
    streamed,
)


def pdf(pages: int) -> str:
    """A PDF with `pages` page objects, base64."""
    objects = [b"1 0 obj << /Type /Catalog /Pages 2 0 R >> endobj"]
    kids = " ".join(f"{3 + i} 0 R" for i in range(pages)).encode()
    objects.append(b"2 0 obj << /Type /Pages /Kids [" + kids + b"] /Count %d >> endobj" % pages)
    for i in range(pages):
        objects.append(b"%d 0 obj << /Type /Page /Parent 2 0 R >> endobj" % (3 + i))
    return base64.b64encode(b"%PDF-1.4\n" + b"\n".join(objects) + b"\n%%EOF").decode()


@pytest.mark.asyncio
async def test_images_and_documents_are_counted_as_input_tokens() -> None:
    image = {
        "type": "image",
        "source": {"type": "base64", "media_type": "image/png", "data": png(1000, 750)},
    }
    big = {
        "type": "image",
        "source": {"type": "base64", "media_type": "image/png", "data": png(3136, 1568)},
    }
    by_url = {"type": "image", "source": {"type": "url", "url": "https://example.com/a.jpg"}}
    document = {
        "type": "document",
        "source": {"type": "base64", "media_type": "application/pdf", "data": pdf(3)},
    }
    text_doc = {
        "type": "document",
        "source": {"type": "text", "media_type": "text/plain", "data": "y" * 400},
    }
    cases: list[tuple[dict[str, Any], int]] = [
        (image, 1000),  # 1000 * 750 / 750
        (big, 1640),  # downscaled to 1568 x 784
        (by_url, 1600),
        (document, 3 * PDF_PAGE_TOKENS),
        (text_doc, 100),
    ]
    async with simulator_and_client() as (_, client):
        for block, tokens in cases:
            messages: list[Any] = [
                {"role": "user", "content": [block, {"type": "text", "text": "Describe it."}]}
            ]
            msg = await client.messages.create(model=MODEL, max_tokens=10, messages=messages)
            counted = await client.messages.count_tokens(model=MODEL, messages=messages)
            assert msg.usage.input_tokens == tokens + 3, block["source"]["type"]  # + ceil(12 / 4)
            assert counted.input_tokens == msg.usage.input_tokens
        # Tools count too (their definitions as JSON); a text-only request as always.
        with_tool = await client.messages.count_tokens(model=MODEL, messages=ASK, tools=[WEATHER])
        plain = await client.messages.count_tokens(model=MODEL, messages=ASK)
    assert plain.input_tokens == estimate_input_tokens(None, ASK) == 8
    tool_chars = len(json.dumps(WEATHER, separators=(",", ":")))
    assert with_tool.input_tokens == math.ceil((len(ASK[0]["content"]) + tool_chars) / 4)


@pytest.mark.asyncio
async def test_a_document_with_citations_gets_a_cited_answer() -> None:
    doc_text = "The grass is green. The sky is blue."
    messages: list[Any] = [
        {
            "role": "user",
            "content": [
                {
                    "type": "document",
                    "source": {"type": "text", "media_type": "text/plain", "data": doc_text},
                    "title": "Colours",
                    "citations": {"enabled": True},
                },
                {"type": "text", "text": "What colour is the grass?"},
            ],
        }
    ]
    params: dict[str, Any] = {"model": MODEL, "max_tokens": 100, "messages": messages}
    async with simulator_and_client() as (_, client):
        whole = await client.messages.create(**params)
        final, seen = await streamed(client, **params)
    for msg in (whole, final):
        block = msg.content[0]
        assert isinstance(block, anthropic.types.TextBlock)
        assert block.citations is not None and len(block.citations) == 1
        citation = block.citations[0]
        assert isinstance(citation, anthropic.types.CitationCharLocation)
        assert citation.cited_text == doc_text
        assert citation.document_index == 0 and citation.document_title == "Colours"
    assert seen.count("citations_delta") == 1
    assert final.content[0].to_dict() == whole.content[0].to_dict()
