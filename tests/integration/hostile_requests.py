"""What the property tests share: the live services as a module's own tenant with its
"anchor" jobs (`target`, a fixture through `conftest.py`), a check that a request
gets neither INTERNAL nor UNKNOWN and that a refusal writes nothing, and the
strategies of hostile field values and requests.

The tests: `test_properties_job_service.py` and
`test_properties_job_events_and_raw_bytes.py` (over 2,000 requests in all).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable, Iterator
from typing import Any, cast

import asyncpg
import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2, status_pb2
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from conveyor.db.admin import create_api_key
from conveyor.db.engine import create_engine
from conveyor.v1 import jobs_pb2, jobs_pb2_grpc
from tests.stack import Backing, Stack

FORBIDDEN = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
TOO_LARGE = "message larger than max"
"""grpc's RESOURCE_EXHAUSTED for a body over the receive limit: the one this test allows.
This tenant has no quota and stays far below every cap, so any other would be grpc's
own (e.g. an error message too large for the status's trailers)."""
STREAM_DEADLINE_S = 0.2
UNARY_DEADLINE_S = 30.0
RUN = settings(
    deadline=None,
    database=None,  # no example database in the working tree
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.function_scoped_fixture,
        HealthCheck.data_too_large,
    ],
)


# --------------------------------------------------------------------------- the stack side


class Target:
    """The live services, this module's tenant, and a way to count what it wrote."""

    def __init__(
        self,
        gateway: grpc.Channel,
        notifier: grpc.Channel,
        member: list[tuple[str, str]],
        admin: list[tuple[str, str]],
        tenant: str,
        anchors: list[str],
        loop: asyncio.AbstractEventLoop,
        conn: asyncpg.Connection,
    ) -> None:
        self.gateway, self.notifier = gateway, notifier
        self.member, self.admin = member, admin  # metadata with API keys: never printed
        self.tenant, self.anchors = tenant, anchors
        self.loop, self.conn = loop, conn
        self.sent = 0

    def __repr__(self) -> str:  # what hypothesis prints of a failing example
        return f"Target(tenant={self.tenant!r}, sent={self.sent})"

    def written(self) -> tuple[int, int]:
        """The tenant's jobs, and the history rows of the anchor jobs."""
        row = self.loop.run_until_complete(
            self.conn.fetchrow(
                "SELECT (SELECT count(*) FROM jobs WHERE tenant = $1) AS jobs,"
                " (SELECT count(*) FROM job_events WHERE job_id = ANY($2::uuid[])) AS events",
                self.tenant,
                [uuid.UUID(a) for a in self.anchors],
            )
        )
        assert row is not None
        return int(row["jobs"]), int(row["events"])


@pytest.fixture(scope="module")
def target(stack: Stack, backing: Backing) -> Iterator[Target]:
    loop = asyncio.new_event_loop()  # this module's tests are synchronous (hypothesis)
    tenant = f"prop-{uuid.uuid4().hex[:8]}"
    engine = create_engine(backing.database_url, pool_size=1)
    member, _ = loop.run_until_complete(create_api_key(engine, tenant, "prop-member", "member"))
    admin, _ = loop.run_until_complete(create_api_key(engine, tenant, "prop-admin", "admin"))
    loop.run_until_complete(engine.dispose())
    conn = loop.run_until_complete(asyncpg.connect(_plain_url(backing.database_url)))
    gateway = grpc.insecure_channel(stack.gateway)
    notifier = grpc.insecure_channel(stack.notifier)
    auth = [("authorization", f"Bearer {member}")]
    stub = jobs_pb2_grpc.JobServiceStub(gateway)
    anchors = []
    for i in range(3):
        anchor = _valid_submit()
        anchor.labels["anchor"] = str(i)
        anchors.append(stub.SubmitJob(anchor, metadata=auth, timeout=UNARY_DEADLINE_S).job.id)
    target = Target(
        gateway, notifier, auth, [("authorization", f"Bearer {admin}")], tenant, anchors, loop, conn
    )
    try:
        yield target
        print(f"\n{target.sent} generated requests sent")  # shown with -s
    finally:
        gateway.close()
        notifier.close()
        loop.run_until_complete(conn.close())
        loop.close()


def _plain_url(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


def _valid_submit() -> jobs_pb2.SubmitJobRequest:
    """A request the gateway accepts, scheduled a day ahead (no worker runs it)."""
    req = jobs_pb2.SubmitJobRequest(
        model="claude-sonnet-4-5",
        max_tokens=8,
        messages=[jobs_pb2.Message(role="user", content="Hello")],
    )
    req.delay.FromSeconds(86_400)
    return req


def _check(target: Target, send: Callable[[], Answer], what: object) -> grpc.StatusCode:
    """Send a request; its status must not be INTERNAL/UNKNOWN, INVALID_ARGUMENT must name
    the field, and a refusal writes nothing."""
    before = target.written()
    code, fields, details = send()
    target.sent += 1
    if code in FORBIDDEN:
        pytest.fail(f"{code} ({details}) for {_short(what)}")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and TOO_LARGE not in details.lower():
        pytest.fail(f"{code} ({details}) for {_short(what)}")
    if code == grpc.StatusCode.INVALID_ARGUMENT and not fields:
        pytest.fail(f"INVALID_ARGUMENT names no field for {_short(what)}")
    if code != grpc.StatusCode.OK and target.written() != before:
        pytest.fail(f"refused with {code} yet wrote: {_short(what)}")
    return code


def _short(what: object) -> str:
    text = repr(what)
    return text if len(text) <= 2000 else text[:2000] + f"... ({len(text)} characters)"


Answer = tuple[grpc.StatusCode, list[str], str]
"""A call's status code, the fields its google.rpc.BadRequest names, and its details."""


def _answer(exc: grpc.RpcError) -> Answer:
    code: grpc.StatusCode = exc.code()
    fields: list[str] = []
    for key, value in exc.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            for detail in status_pb2.Status.FromString(value).details:
                if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                    bad = error_details_pb2.BadRequest()
                    detail.Unpack(bad)
                    fields += [v.field for v in bad.field_violations]
    return code, fields, exc.details() or ""


def _unary(call: Any, request: Any, metadata: list[tuple[str, str]]) -> Answer:
    try:
        call(request, metadata=metadata, timeout=UNARY_DEADLINE_S)
    except grpc.RpcError as exc:
        return _answer(exc)
    return grpc.StatusCode.OK, [], ""


def _stream(call: Any, request: Any, metadata: list[tuple[str, str]]) -> Answer:
    responses = call(request, metadata=metadata, timeout=STREAM_DEADLINE_S)
    try:
        for i, _ in enumerate(responses):
            if i >= 20:
                responses.cancel()
                return grpc.StatusCode.OK, [], ""
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.CANCELLED:
            return grpc.StatusCode.OK, [], ""
        return _answer(exc)
    return grpc.StatusCode.OK, [], ""


# --------------------------------------------------------------------------- strategies


CHARS = st.characters(codec="utf-8")  # protobuf strings are UTF-8: no lone surrogates
HUGE = st.sampled_from([257, 2_049, 70_000, 1_000_001]).map(lambda n: "x" * n)
TEXT = st.one_of(
    st.text(CHARS, max_size=40),
    st.sampled_from(["", "\x00", "a\x00b", " ", "\n", "claude-sonnet-4-5\n", "ü€😀", "\ufeff"]),
    st.text(st.sampled_from("\x00\n\t a%|:/"), max_size=8),
    HUGE,
)
INT32 = st.one_of(
    st.integers(-(2**31), 2**31 - 1), st.sampled_from([-1, 0, 1, 9, 10, 20, 21, 128_001])
)
INT64 = st.one_of(st.integers(-(2**63), 2**63 - 1), st.sampled_from([-1, 0, 1, 2**62]))
EDGE_SECONDS = [
    -(2**63),
    -(2**62),
    -315_576_000_001,
    -62_135_596_801,
    -62_135_596_800,
    -1,
    0,
    1,
    3_600,
    86_400 * 31,
    253_402_300_799,
    253_402_300_800,
    315_576_000_001,
    2**62,
    2**63 - 1,
]
EDGE_NANOS = [-(2**31), -1_000_000_000, -999_999_999, -5, 0, 5, 999_999_999, 1_000_000_000]
SECONDS = st.one_of(st.sampled_from(EDGE_SECONDS), st.integers(-(2**63), 2**63 - 1))
NANOS = st.one_of(st.sampled_from(EDGE_NANOS), st.integers(-(2**31), 2**31 - 1))
TIMESTAMPS = st.builds(Timestamp, seconds=SECONDS, nanos=NANOS)
DURATIONS = st.builds(Duration, seconds=SECONDS, nanos=NANOS)
MAPS = st.one_of(
    st.dictionaries(TEXT, TEXT, max_size=4),
    st.dictionaries(st.text(CHARS, min_size=1, max_size=3), st.just("v"), min_size=33, max_size=40),
)
MESSAGES = st.lists(
    st.builds(
        jobs_pb2.Message, role=st.sampled_from(["user", "assistant", "", "robot"]), content=TEXT
    ),
    max_size=4,
)
FLOATS = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True))
JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), TEXT),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(CHARS, max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)


@st.composite
def request_bodies(draw: st.DrawFn) -> bytes:
    """A `request_json`: a Messages API body with hostile values, or any bytes."""
    body: dict[str, object] = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 8,
        "messages": [{"role": "user", "content": "Hello"}],
    }
    for key in draw(st.lists(st.sampled_from([*body, "system", "tools", "x\x00"]), max_size=3)):
        body[key] = draw(JSON_VALUES)
    return draw(
        st.one_of(
            st.just(json.dumps(body).encode()),
            st.binary(max_size=64),
            st.sampled_from([b"[" * 10_000, b'{"a":' * 5_000, b"\xff\xfe", b"null"]),
        )
    )


@st.composite
def submit_requests(draw: st.DrawFn) -> jobs_pb2.SubmitJobRequest:
    """A valid request with some of its fields replaced by hostile values."""
    req = _valid_submit()
    if draw(st.booleans()):
        req.model = draw(st.one_of(TEXT, st.sampled_from(["claude-haiku-4-5", "a" * 129])))
    if draw(st.booleans()):
        req.system = draw(TEXT)
    if draw(st.booleans()):
        del req.messages[:]
        req.messages.extend(draw(MESSAGES))
    if draw(st.booleans()):
        req.max_tokens = draw(INT32)
    temperature = draw(FLOATS)
    if temperature is not None:
        req.temperature = temperature
    if draw(st.booleans()):
        req.stop_sequences.extend(draw(st.lists(TEXT, max_size=10)))
    if draw(st.booleans()):
        req.metadata.update(draw(MAPS))
    if draw(st.booleans()):
        req.priority = draw(INT32)
    if draw(st.booleans()):
        req.lane = draw(st.one_of(TEXT, st.sampled_from(["interactive", "bulk", "default"])))
    if draw(st.booleans()):
        req.idempotency_key = draw(TEXT)
    timing = draw(st.sampled_from(["keep", "run_at", "delay", "both", "none"]))
    if timing in ("run_at", "both"):
        req.run_at.CopyFrom(draw(TIMESTAMPS))
        if timing == "run_at":
            req.ClearField("delay")
    if timing == "delay":
        req.delay.CopyFrom(draw(DURATIONS))
    if timing == "none":
        req.ClearField("delay")
        req.max_tokens = 1  # runs: keep it short
    if draw(st.booleans()):
        req.max_attempts = draw(INT32)
    if draw(st.booleans()):
        req.timeout.CopyFrom(draw(DURATIONS))
    if draw(st.booleans()):
        req.webhook_url = draw(st.one_of(TEXT, st.just("https://example.invalid/\x00")))
    if draw(st.booleans()):
        req.labels.update(draw(MAPS))
    if draw(st.integers(0, 4)) == 0:  # the whole Messages API body instead
        req.request_json = draw(request_bodies())
        if draw(st.booleans()):
            req.ClearField("model")
            del req.messages[:]
            req.max_tokens = 0
    if draw(st.booleans()):
        req.webhook_events = cast(Any, draw(st.one_of(st.sampled_from([0, 1, 2]), INT32)))
    return req


@st.composite
def job_ids(draw: st.DrawFn, target: Target) -> str:
    return draw(
        st.one_of(
            st.sampled_from(target.anchors),
            st.uuids().map(str),
            TEXT,
            st.sampled_from([a.upper() for a in target.anchors] + ["{" + target.anchors[0] + "}"]),
        )
    )
