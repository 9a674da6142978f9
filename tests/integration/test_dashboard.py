"""The dashboard at `/`, driven in a real browser (Playwright with Debian's Chromium)
against the real stack: signing in with an API key (a wrong one is refused, the key
never lands in a URL or cookie), a job submitted over gRPC in the table and streaming
in its page (and resuming with Last-Event-ID after a drop), and retrying dead jobs,
one or a selection. A failing test saves a screenshot of its page under
run/screenshots/ (or $CONVEYOR_TEST_SCREENSHOTS)."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, Page, Request, async_playwright, expect

from conveyor.client import ConveyorClient
from conveyor.v1 import jobs_pb2
from devtools import devstack
from tests.conftest import eventually
from tests.stack import Stack, free_port

pytestmark = pytest.mark.integration

MODEL = "claude-sonnet-4-5"
JAEGER_URL = "http://jaeger.test:16686"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
REPO = Path(__file__).resolve().parents[2]
SCREENSHOTS = Path(os.environ.get("CONVEYOR_TEST_SCREENSHOTS") or REPO / "run" / "screenshots")
WAIT_MS = 30_000
"""How long an expectation on the page may take (the machine may be busy)."""
DASHBOARD_SERVICE = "http-dashboard"


def slow(tokens: int, per_second: int) -> dict[str, str]:
    """Labels that make the simulator stream `tokens` tokens at `per_second`."""
    return {"x-sim-tokens": str(tokens), "x-sim-tokens-per-second": str(per_second)}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def dashboard(stack: Stack) -> str:
    """Base URL of an HTTP service of the stack that knows a Jaeger URL (for trace links),
    started next to the stack's own (`stack.kill`/`restart_dashboard` act on it)."""
    port = free_port()
    address = f"{stack.settings.http_host}:{port}"
    stack.start_extra(
        devstack.Service(DASHBOARD_SERVICE, "services.http", "http", address, "dashboard"),
        **_dashboard_env(port),
    )
    return f"http://{address}"


def _dashboard_env(port: int) -> dict[str, str]:
    return {
        "CONVEYOR_HTTP_PORT": str(port),
        "CONVEYOR_HTTP_METRICS_PORT": "0",
        "CONVEYOR_JAEGER_URL": JAEGER_URL,
    }


def require_chromium() -> None:
    """Skip without Debian's Chromium (fail in CI, whose .ci/run installs it)."""
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing: .ci/run installs it with `make browser`")
        pytest.skip(f"{CHROMIUM} is missing: `make browser` installs Debian's chromium")


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    """Debian's Chromium, headless (never `playwright install`: no downloads here)."""
    require_chromium()
    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        yield chromium
        await chromium.close()


@pytest.fixture
async def page(browser: Browser, request: pytest.FixtureRequest) -> AsyncIterator[Page]:
    """A fresh browser context and page; if the test fails, a screenshot of the page is
    saved as <screenshots>/<test name>.png."""
    context = await browser.new_context(viewport={"width": 1280, "height": 860})
    tab = await context.new_page()
    failed_before = request.session.testsfailed
    yield tab
    # The call's report is logged (and counted) before fixtures are torn down.
    if request.session.testsfailed > failed_before:
        await save_screenshot(tab, request.node.name)
    await context.close()


def screenshot_path(name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}.png"


async def save_screenshot(tab: Page, name: str) -> Path:
    """The page as it is now, as <screenshots>/<name>.png."""
    path = screenshot_path(name)
    await tab.screenshot(path=str(path), full_page=True)
    print(f"screenshot of the failing page: {path}", file=sys.stderr)
    return path


async def sign_in(tab: Page, base: str, key: str) -> None:
    await tab.goto(f"{base}/")
    await tab.fill("#api-key", key)
    await tab.click("#login button[type=submit]")
    await expect(tab.locator("#view")).to_be_visible(timeout=WAIT_MS)


async def wait_status(client: ConveyorClient, job_id: str, status: int) -> jobs_pb2.Job:
    found: list[jobs_pb2.Job] = []

    async def reached() -> bool:
        job = await client.get(job_id)
        found[:] = [job]
        return job.status == status

    await eventually(reached, within_s=60, every_s=0.2)
    return found[0]


# --------------------------------------------------------------------------- signing in


async def test_a_wrong_key_is_refused_and_the_page_stays_on_the_login(
    page: Page, dashboard: str
) -> None:
    answer = await page.goto(f"{dashboard}/")
    assert answer is not None and answer.ok
    csp = answer.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "connect-src 'self'" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp

    await page.fill("#api-key", "cvk_not-a-key-of-anyone")
    await page.click("#login button[type=submit]")

    refusal = page.locator("#login [role=alert]")
    await expect(refusal).to_contain_text("Refused", timeout=WAIT_MS)
    await expect(page.locator("#api-key")).to_be_visible()
    await expect(page.locator("#view")).to_have_count(0)
    assert await page.evaluate("sessionStorage.length") == 0, "a refused key is not kept"


async def test_the_key_travels_only_in_the_authorization_header(
    page: Page, dashboard: str, api_key: str, client: ConveyorClient
) -> None:
    job = await client.submit(MODEL, "where does the key go?", max_tokens=8)
    await client.wait(job.id, 60)
    requests: list[Request] = []
    page.on("request", lambda r: requests.append(r))

    await sign_in(page, dashboard, api_key)
    views = {
        "#/jobs": f"tr[data-job-id='{job.id}']",
        "#/failed": "#failed-jobs > *",
        "#/lanes": "#lane-counts",
        "#/tenants": "#tenant-counts",
        f"#/job/{job.id}": "#job-status .status-succeeded",
    }
    for view, shown in views.items():
        await page.goto(f"{dashboard}/{view}")
        await expect(page.locator(shown).first).to_be_visible(timeout=WAIT_MS)
    await expect(page.locator("#stream-state")).to_contain_text("finished", timeout=WAIT_MS)

    assert all(api_key not in r.url for r in requests), "the key is in a URL"
    assert page.url.find(api_key) == -1
    assert await page.context.cookies() == []
    assert await page.evaluate("document.cookie") == ""
    assert await page.evaluate("JSON.stringify(localStorage)") == "{}"
    api_calls = [r for r in requests if "/v1/" in r.url]
    assert {r.url.split("?")[0].removeprefix(dashboard) for r in api_calls} >= {
        "/v1/stats",
        "/v1/jobs",
        f"/v1/jobs/{job.id}",
        f"/v1/jobs/{job.id}/events",
    }
    for r in api_calls:
        assert (await r.all_headers()).get("authorization") == f"Bearer {api_key}", r.url


# --------------------------------------------------------------------------- jobs


async def test_a_job_submitted_over_grpc_appears_in_the_table_and_streams_in_its_page(
    page: Page, dashboard: str, api_key: str, client: ConveyorClient
) -> None:
    await sign_in(page, dashboard, api_key)
    tag = uuid.uuid4().hex[:8]
    job = await client.submit(
        MODEL, "stream to the browser", max_tokens=120, labels={"test": tag, **slow(120, 10)}
    )

    row = page.locator(f"tr[data-job-id='{job.id}']")
    await expect(row).to_be_visible(timeout=WAIT_MS)
    await expect(row).to_contain_text(MODEL)
    await row.locator("a").click()

    await expect(page.locator("#job-id")).to_have_text(job.id, timeout=WAIT_MS)
    live = page.locator("#answer pre.live")
    await expect(live).not_to_have_text("", timeout=WAIT_MS)
    partial = await live.text_content() or ""
    await expect(page.locator("#stream-state")).to_contain_text("streaming")

    done = await client.wait(job.id, 60)
    assert done.status == jobs_pb2.JOB_STATUS_SUCCEEDED
    assert partial and len(partial) < len(done.result_text), "seen while streaming"
    assert done.result_text.startswith(partial)
    await expect(page.locator("#job-status")).to_contain_text("succeeded", timeout=WAIT_MS)
    await expect(page.locator("#answer .block-text pre")).to_have_text(done.result_text)
    await expect(page.locator("#usage")).to_contain_text(str(done.usage.output_tokens))
    assert done.priced, "the simulator's models are priced"
    await expect(page.locator("#cost")).to_have_text(f"${done.cost_micros / 1e6:.6f}")
    await expect(page.locator("#history tbody tr")).to_have_count(3)  # pending, running, done
    assert done.trace_id, "the test stack traces its jobs"
    trace = page.locator("#trace-link")
    await expect(trace).to_have_attribute("href", f"{JAEGER_URL}/trace/{done.trace_id}")


async def test_a_dropped_stream_resumes_with_last_event_id_and_loses_or_repeats_no_token(
    page: Page, dashboard: str, api_key: str, client: ConveyorClient, stack: Stack
) -> None:
    await sign_in(page, dashboard, api_key)
    job = await client.submit(MODEL, "survive a drop", max_tokens=200, labels=slow(200, 12))
    resumed: list[str] = []
    page.on(
        "request",
        lambda r: (
            resumed.append(r.headers.get("last-event-id", ""))
            if r.url.endswith(f"/v1/jobs/{job.id}/events") and "last-event-id" in r.headers
            else None
        ),
    )
    await page.goto(f"{dashboard}/#/job/{job.id}")
    live = page.locator("#answer pre.live")
    await expect(live).not_to_have_text("", timeout=WAIT_MS)

    seen: list[str] = []

    async def watch_text() -> None:
        while True:
            text = await page.evaluate(
                "document.querySelector('#answer pre.live')?.textContent ?? null"
            )
            if text:
                seen.append(text)
            await asyncio.sleep(0.1)

    watcher = asyncio.create_task(watch_text())
    try:
        port = int(dashboard.rsplit(":", 1)[1])
        stack.kill(DASHBOARD_SERVICE)  # the stream drops mid-answer
        before = len(seen[-1]) if seen else 0
        stack.start(DASHBOARD_SERVICE, **_dashboard_env(port))
        await eventually(lambda: _true(bool(resumed)), within_s=30)
        done = await client.wait(job.id, 60)
        await expect(page.locator("#job-status")).to_contain_text("succeeded", timeout=WAIT_MS)
    finally:
        watcher.cancel()

    assert resumed[0].isdigit() and int(resumed[0]) > 0, "reconnected with Last-Event-ID"
    assert done.status == jobs_pb2.JOB_STATUS_SUCCEEDED
    for text in seen:  # a repeated or missing piece would break the prefix
        assert done.result_text.startswith(text), text
    assert max(len(t) for t in seen) > before, "tokens kept streaming after the reconnect"


async def _true(value: bool) -> bool:
    return value


# --------------------------------------------------------------------------- retries


async def _dead_job(client: ConveyorClient, tag: str) -> jobs_pb2.Job:
    """A job that dies on its first attempt (the simulator fails attempt 1 only)."""
    job = await client.submit(
        MODEL,
        "die once",
        max_tokens=8,
        max_attempts=1,
        labels={"test": tag, "x-sim-fail": "529", "x-sim-fail-attempts": "1"},
    )
    dead = await client.wait(job.id, 60)
    assert dead.status == jobs_pb2.JOB_STATUS_DEAD
    return dead


async def test_clicking_retry_on_a_dead_job_runs_it_again(
    page: Page, dashboard: str, api_key: str, client: ConveyorClient
) -> None:
    dead = await _dead_job(client, uuid.uuid4().hex[:8])
    await sign_in(page, dashboard, api_key)
    await page.goto(f"{dashboard}/#/failed")
    row = page.locator(f"tr[data-job-id='{dead.id}']")
    await expect(row).to_contain_text("dead", timeout=WAIT_MS)

    await row.locator("button.retry").click()

    await expect(page.locator("#retry-messages")).to_contain_text("Retried 1 job", timeout=WAIT_MS)
    again = await wait_status(client, dead.id, jobs_pb2.JOB_STATUS_SUCCEEDED)
    assert again.attempts == 2 and again.result_text
    await expect(row).to_have_count(0, timeout=WAIT_MS)  # no longer dead or failed


async def test_retrying_a_selection_runs_the_selected_dead_jobs_again_and_no_other(
    page: Page, dashboard: str, api_key: str, client: ConveyorClient
) -> None:
    tag = uuid.uuid4().hex[:8]
    chosen = [await _dead_job(client, tag) for _ in range(2)]
    left = await _dead_job(client, tag)
    await sign_in(page, dashboard, api_key)
    await page.goto(f"{dashboard}/#/failed")
    for job in chosen:
        box = page.locator(f"tr[data-job-id='{job.id}'] input.select")
        await expect(box).to_be_visible(timeout=WAIT_MS)
        await box.check()
    await expect(page.locator("#retry-selected")).to_have_text("Retry selected (2)")

    await page.click("#retry-selected")

    await expect(page.locator("#retry-messages")).to_contain_text("Retried 2 jobs", timeout=WAIT_MS)
    for job in chosen:
        again = await wait_status(client, job.id, jobs_pb2.JOB_STATUS_SUCCEEDED)
        assert again.attempts == 2
    still = await client.get(left.id)
    assert still.status == jobs_pb2.JOB_STATUS_DEAD and still.attempts == 1
    await expect(page.locator(f"tr[data-job-id='{left.id}']")).to_be_visible()


async def test_a_dead_job_is_retried_from_its_own_page(
    page: Page, dashboard: str, api_key: str, client: ConveyorClient
) -> None:
    dead = await _dead_job(client, uuid.uuid4().hex[:8])
    await sign_in(page, dashboard, api_key)
    await page.goto(f"{dashboard}/#/job/{dead.id}")
    await expect(page.locator("#job-error")).to_contain_text("overloaded_error", timeout=WAIT_MS)

    await page.click("#retry-job")

    await expect(page.locator("#job-status")).to_contain_text("succeeded", timeout=WAIT_MS)
    again = await client.get(dead.id)
    assert again.status == jobs_pb2.JOB_STATUS_SUCCEEDED and again.attempts == 2
    await expect(page.locator("#answer .block-text pre")).to_have_text(again.result_text)


# --------------------------------------------------------------------------- views


async def test_lane_and_tenant_views_chart_the_live_statistics(
    page: Page, dashboard: str, api_key: str, client: ConveyorClient
) -> None:
    await sign_in(page, dashboard, api_key)
    lanes = (await client.stats()).lanes
    await page.goto(f"{dashboard}/#/lanes")
    await expect(page.locator("#lane-counts tbody tr")).to_have_count(len(lanes), timeout=WAIT_MS)
    jobs = [await client.submit(MODEL, f"chart {i}", max_tokens=8) for i in range(5)]
    # Submitted per second is a difference of polled counts: non-zero for a few seconds.
    submitted = page.locator("#chart-throughput [data-series=submitted]")
    await expect(submitted).not_to_have_text(re.compile(r"submitted: (0/s|—)$"), timeout=WAIT_MS)
    for job in jobs:
        await client.wait(job.id, 60)
    await expect(page.locator("#chart-throughput path.line")).not_to_have_count(0)
    await expect(page.locator("#chart-depth [data-series]")).to_have_count(len(lanes))
    await expect(page.locator("#chart-latency [data-series='run time p50']")).to_contain_text(
        re.compile(r"\d"), timeout=WAIT_MS
    )
    await expect(page.locator("#chart-failures")).to_be_visible()

    await page.goto(f"{dashboard}/#/tenants")
    await expect(page.locator("#tenant-scope")).to_contain_text("Your tenant only", timeout=WAIT_MS)
    await expect(page.locator("#tenant-counts tbody tr")).to_have_count(1)
    await expect(
        page.locator("#chart-tenant-latency [data-series='run time p95']")
    ).to_contain_text(re.compile(r"\d"), timeout=WAIT_MS)


# --------------------------------------------------------------------------- screenshots


FAILING_TEST = """
from tests.integration.test_dashboard import browser, page  # noqa: F401


async def test_that_fails(page):
    await page.set_content("<h1>failing on purpose</h1>")
    assert False, "on purpose"
"""


def test_a_failing_browser_test_saves_a_screenshot(tmp_path: Path) -> None:
    require_chromium()
    (tmp_path / "test_fails.py").write_text(FAILING_TEST)
    shots = tmp_path / "shots"
    env = {**os.environ, "CONVEYOR_TEST_SCREENSHOTS": str(shots), "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", os.devnull,
         "--rootdir", str(tmp_path), "-o", "asyncio_mode=auto",
         "-o", "asyncio_default_fixture_loop_scope=session",
         "-o", "asyncio_default_test_loop_scope=session", str(tmp_path / "test_fails.py")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    picture = shots / "test_that_fails.png"
    assert picture.read_bytes().startswith(b"\x89PNG\r\n\x1a\n"), done.stdout
