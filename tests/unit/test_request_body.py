"""Request bodies are checked against the installed anthropic SDK's own types.

Real request shapes pass and come back equal; each malformed body is refused with
the JSON path of what is wrong; the input-token estimate counts images, documents
and tools as documented in conveyor.contract.request_body.estimate.
"""

from __future__ import annotations

import copy
from typing import Any

import grpc
import orjson
import pytest
from google.rpc import error_details_pb2, status_pb2

from conveyor.contract.request_body import BodyLimits, estimate_input_tokens, validate_body
from conveyor.contract.request_body import estimate as est
from conveyor.core.config import Settings
from conveyor.core.errors import InvalidArgument
from tests import bodies
from tests.bodies import INVALID, VALID, Bad

LIMITS = BodyLimits.from_settings(Settings())


def test_the_corpus_is_large_enough() -> None:
    assert len(VALID) >= 30
    assert len(INVALID) >= 25


@pytest.mark.parametrize(("name", "body"), VALID, ids=[name for name, _ in VALID])
def test_a_real_request_shape_passes_and_comes_back_equal(name: str, body: dict[str, Any]) -> None:
    submitted = copy.deepcopy(body)
    assert validate_body(body, LIMITS) == submitted
    assert body == submitted  # the input is left as it was


@pytest.mark.parametrize("bad", INVALID, ids=[bad.name for bad in INVALID])
def test_a_malformed_body_is_refused_naming_its_path(bad: Bad) -> None:
    limits = BodyLimits.from_settings(Settings(**bad.settings)) if bad.settings else LIMITS
    with pytest.raises(InvalidArgument) as refused:
        validate_body(copy.deepcopy(bad.body), limits)
    assert refused.value.field == bad.path, refused.value.message
    assert refused.value.description


def test_the_refusal_becomes_a_bad_request_detail_with_the_path() -> None:
    with pytest.raises(InvalidArgument) as refused:
        validate_body(bodies.body(bodies.user({"type": "video"})), LIMITS)
    status = refused.value.to_status()
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT
    details = dict(status.trailing_metadata)["grpc-status-details-bin"]
    bad_request = error_details_pb2.BadRequest()
    assert status_pb2.Status.FromString(details).details[0].Unpack(bad_request)
    (violation,) = bad_request.field_violations
    assert violation.field == "request.messages[0].content[0].type"
    assert "'video'" in violation.description and "image" in violation.description


def test_every_list_comes_back_as_a_list_not_a_lazy_iterable() -> None:
    _, body = next(case for case in VALID if case[0] == "parallel tools")
    out = validate_body(copy.deepcopy(body), LIMITS)
    assert type(out["messages"]) is list and type(out["tools"]) is list
    assert [type(m["content"]) for m in out["messages"]] == [str, list, list]
    assert type(out["messages"][2]["content"][0]) is dict


def test_unknown_keys_are_refused_deep_inside_the_sdk_types() -> None:
    citation = {
        "type": "char_location",
        "cited_text": "blue",
        "document_index": 0,
        "document_title": None,
        "start_char_index": 0,
        "end_char_index": 4,
    }
    good = bodies.body(bodies.user(bodies.text("hi"), bodies.text("blue", citations=[citation])))
    validate_body(copy.deepcopy(good), LIMITS)
    citation["page"] = 3
    with pytest.raises(InvalidArgument) as refused:
        validate_body(good, LIMITS)
    assert refused.value.field == "request.messages[0].content[1].citations[0].page"


def test_a_missing_field_beside_an_unknown_one_points_at_the_typo() -> None:
    with pytest.raises(InvalidArgument) as refused:
        validate_body(bodies.body(bodies.user({"type": "text", "txt": "hi"})), LIMITS)
    assert refused.value.field == "request.messages[0].content[0].text"
    assert "'txt'" in refused.value.description


def test_a_bad_block_names_one_field_not_every_union_member() -> None:
    body = bodies.body(bodies.user(bodies.image("image/png", bodies.PNG_B64, extra=1)))
    with pytest.raises(InvalidArgument) as refused:
        validate_body(body, LIMITS)
    assert refused.value.field == "request.messages[0].content[0].extra"
    assert refused.value.description == "is not a field of this object"


def test_an_unknown_top_level_key_passes_unchecked_when_the_setting_lists_it() -> None:
    body = bodies.body("Hi", future_knob=0.2, top_k={"anything": ["goes"]})
    limits = BodyLimits.from_settings(Settings(request_extra_keys=("future_knob", "top_k")))
    assert validate_body(copy.deepcopy(body), limits) == body
    with pytest.raises(InvalidArgument) as refused:
        validate_body(bodies.body("Hi", future_knob=0.2), LIMITS)
    assert refused.value.field == "request.future_knob"
    assert "CONVEYOR_REQUEST_EXTRA_KEYS" in refused.value.description


def test_sampling_parameters_pass_at_the_top_level_as_the_api_takes_them() -> None:
    body = bodies.body("Hi", temperature=0.2, top_p=1, top_k=40)
    assert validate_body(copy.deepcopy(body), LIMITS) == body


@pytest.mark.parametrize(
    ("key", "value"),
    [("temperature", 1.5), ("temperature", "0.5"), ("top_p", -0.1), ("top_k", 0), ("top_k", 2.0)],
)
def test_a_sampling_parameter_out_of_range_is_refused(key: str, value: object) -> None:
    with pytest.raises(InvalidArgument) as refused:
        validate_body(bodies.body("Hi", **{key: value}), LIMITS)
    assert refused.value.field == f"request.{key}"


def test_the_extra_keys_setting_reads_a_json_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_REQUEST_EXTRA_KEYS", '["top_k", "temperature"]')
    assert BodyLimits.from_settings(Settings()).extra_top_level_keys == {"top_k", "temperature"}


def test_an_allowed_extra_key_cannot_smuggle_stream_or_nul() -> None:
    limits = BodyLimits(extra_top_level_keys=frozenset({"stream", "top_k"}))
    with pytest.raises(InvalidArgument) as refused:
        validate_body(bodies.body("Hi", stream=True), limits)
    assert refused.value.field == "request.stream"
    with pytest.raises(InvalidArgument) as refused:
        validate_body(bodies.body("Hi", top_k="a\x00"), limits)
    assert refused.value.field == "request.top_k"


def test_the_path_prefix_is_the_callers() -> None:
    with pytest.raises(InvalidArgument) as refused:
        validate_body(bodies.body({"role": "bot", "content": "x"}), LIMITS, path="jobs[3].request")
    assert refused.value.field == "jobs[3].request.messages[0].role"
    with pytest.raises(InvalidArgument) as refused:
        validate_body(bodies.body("Hi", temprature=1), LIMITS, path="jobs[3].request")
    assert refused.value.field == "jobs[3].request.temprature"
    assert "CONVEYOR_REQUEST_EXTRA_KEYS" in refused.value.description


def test_integers_are_not_taken_for_other_types() -> None:
    for key, value in [("max_tokens", True), ("model", 5), ("system", True)]:
        with pytest.raises(InvalidArgument) as refused:
            validate_body(bodies.body("Hi", **{key: value}), LIMITS)
        assert refused.value.field == f"request.{key}"


# ------------------------------------------------------------------ estimates


def _tokens(*content: Any, **extra: Any) -> int:
    return estimate_input_tokens(bodies.body(bodies.user(*content), **extra))


def test_text_counts_a_token_per_four_characters() -> None:
    assert estimate_input_tokens(bodies.body("x" * 400, system="y" * 400)) == 200


def test_an_image_counts_its_pixels_over_750() -> None:
    assert est.image_tokens(40, 30) == 2  # ceil(1200 / 750)
    assert _tokens(bodies.image("image/png", bodies.PNG_B64)) == 2
    assert _tokens(bodies.image("image/jpeg", bodies.JPEG_B64)) == 640  # 800 x 600 / 750
    assert _tokens(bodies.image("image/gif", bodies.GIF_B64)) == 1
    assert _tokens(bodies.image("image/webp", bodies.WEBP_B64)) == 1


def test_a_large_image_counts_as_the_api_downscales_it() -> None:
    # 3000 x 2000 becomes 1568 x 1045: 2,185 tokens by the formula, capped at 1,600.
    assert _tokens(bodies.image("image/png", bodies.BIG_PNG_B64)) == est.IMAGE_MAX_TOKENS


def test_an_image_of_unknown_size_counts_the_default() -> None:
    url = {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}}
    assert _tokens(url) == est.IMAGE_DEFAULT_TOKENS


def test_a_pdf_counts_per_page() -> None:
    assert _tokens(bodies.PDF_BLOCK) == 2 * est.PDF_PAGE_TOKENS
    url = {"type": "document", "source": {"type": "url", "url": "https://example.com/a.pdf"}}
    assert _tokens(url) == est.DOCUMENT_DEFAULT_TOKENS


def test_images_inside_tool_results_count() -> None:
    nested = bodies.tool_result("t1", [bodies.image("image/jpeg", bodies.JPEG_B64)])
    assert _tokens(nested) == 640


def test_tools_count_their_json_and_an_overhead() -> None:
    plain = estimate_input_tokens(bodies.body("x" * 40))
    with_tool = estimate_input_tokens(bodies.body("x" * 40, tools=[bodies.WEATHER_TOOL]))
    tool_json = len(orjson.dumps(bodies.WEATHER_TOOL))
    expected = est.TOOL_USE_SYSTEM_TOKENS + -(-tool_json // 4) + est.TOOL_TOKENS
    assert with_tool - plain == expected


def test_every_valid_body_has_a_positive_estimate() -> None:
    for _, body in VALID:
        assert estimate_input_tokens(validate_body(copy.deepcopy(body), LIMITS)) >= 1
