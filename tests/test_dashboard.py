"""The dashboard: sign-in, cookies and CSRF at the HTTP level, then the real service in Debian's
chromium driven by Playwright (no browser download).

Set NOTIFIER_DASHBOARD_SCREENSHOT=docs/dashboard.png to copy the browser test's screenshot
there (it is always saved in the test's tmp dir).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from playwright.async_api import Page, async_playwright
from pydantic import SecretStr

from notifier.admin import AdminLimit
from notifier.dashboard import Dashboard
from notifier.dashboard.sessions import Session, Sessions
from notifier.metrics import Metrics
from notifier.models import JobStatus, Message, NewJob, Outcome, Priority, utcnow
from notifier.ops import OpsApp
from notifier.settings import RecipientLimit
from notifier.store import Store, open_store
from tests.support.http_sink import HTTPSink, Reply
from tests.support.server import LineConnection, free_port, isolated_settings, running_server
from tests.support.waiting import wait_for

TOKEN = "dash-token-5e1f"
CHROMIUM = Path("/usr/bin/chromium")
needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists() and not os.environ.get("CI"),
    reason="Debian's chromium is not installed (apt-get install chromium); CI installs it",
)


@asynccontextmanager
async def dashboard(
    tmp_path: Path, tokens: str = "", admin_limit: AdminLimit | None = None
) -> AsyncIterator[tuple[httpx.AsyncClient, Store]]:
    """The operations app with its dashboard over a real SQLite store, called in process."""
    settings = isolated_settings(tmp_path, auth_tokens=tokens)
    store = open_store(settings)
    await store.open()
    metrics = Metrics()
    app = OpsApp(
        store,
        metrics,
        lambda: True,
        Dashboard(
            store, metrics, tokens=settings.auth_tokens, admin_limit=admin_limit, circuits=[]
        ),
    )
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:
            yield http, store
    finally:
        await store.close()


async def failed_job(store: Store) -> str:
    message = Message(id="f" * 32, channel="sms", to=("+14155550101",), text="hi")
    await store.enqueue([NewJob(message=message)])
    (job,) = await store.claim("sms", owner="me", limit=1, lease_seconds=60)
    await store.record("me", [Outcome(job.id, JobStatus.FAILED, "webhook: HTTP 400")])
    return job.id


def csrf_of(page: str) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', page)
    assert match, "no CSRF token in the page"
    return match[1]


async def sign_in(http: httpx.AsyncClient) -> None:
    form = await http.get("/login")
    signed = await http.post("/login", data={"token": TOKEN, "csrf": csrf_of(form.text)})
    assert (signed.status_code, signed.headers["location"]) == (303, "/")


async def status_of(store: Store, job_id: str) -> JobStatus:
    job = await store.get(job_id)
    assert job is not None
    return job.status


async def test_with_tokens_every_page_asks_to_sign_in(tmp_path: Path) -> None:
    async with dashboard(tmp_path, tokens=TOKEN) as (http, _):
        first = await http.get("/")
        cookie = first.headers["set-cookie"].lower()
        for path in ("/", "/jobs", "/jobs/failed", "/jobs/abc"):
            page = await http.get(path)
            assert (page.status_code, page.headers["location"]) == (303, "/login"), path
        assert "httponly" in cookie and "samesite=strict" in cookie and "path=/" in cookie
        for path in ("/healthz", "/readyz", "/metrics"):
            assert (await http.get(path)).status_code == 200, "probes stay open"
        assert (await http.post("/healthz")).status_code == 405

        form = await http.get("/login")
        csrf = csrf_of(form.text)
        wrong = await http.post("/login", data={"token": "guess", "csrf": csrf})
        assert wrong.status_code == 401 and "token: not valid" in wrong.text
        unprotected = await http.post("/login", data={"token": TOKEN})
        assert unprotected.status_code == 403 and "csrf" in unprotected.text
        assert (await http.get("/")).status_code == 303, "still signed out"

        anonymous = http.cookies["notifier_session"]
        await sign_in(http)
        signed_in = http.cookies["notifier_session"]
        assert signed_in.split(".")[0] != anonymous.split(".")[0], "a fresh session id"
        overview = await http.get("/")
        assert overview.status_code == 200 and "Overview" in overview.text
        assert TOKEN not in overview.text and TOKEN not in signed_in

        # The anonymous cookie with its flag turned to signed in: the signature no longer fits.
        session_id, _, issued, signature = anonymous.split(".")
        http.cookies.set("notifier_session", f"{session_id}.1.{issued}.{signature}")
        assert (await http.get("/")).status_code == 303


async def test_retry_and_cancel_need_the_sessions_csrf_token(tmp_path: Path) -> None:
    async with dashboard(tmp_path, tokens=TOKEN) as (http, store):
        job_id = await failed_job(store)
        await sign_in(http)
        page = await http.get(f"/jobs/{job_id}")
        assert page.status_code == 200 and "webhook: HTTP 400" in page.text
        csrf = csrf_of(page.text)

        refused = await http.post(f"/jobs/{job_id}/retry")
        assert refused.status_code == 403 and "csrf" in refused.text
        async with httpx.AsyncClient(transport=http._transport, base_url=http.base_url) as other:
            await sign_in(other)
            theirs = csrf_of((await other.get("/")).text)
        forged = await http.post(f"/jobs/{job_id}/retry", data={"csrf": theirs})
        assert forged.status_code == 403, "another session's token is no good here"
        assert await status_of(store, job_id) is JobStatus.FAILED

        retried = await http.post(f"/jobs/{job_id}/retry", data={"csrf": csrf})
        assert (retried.status_code, retried.headers["location"]) == (303, f"/jobs/{job_id}")
        assert await status_of(store, job_id) is JobStatus.QUEUED
        again = await http.post(f"/jobs/{job_id}/retry", data={"csrf": csrf})
        assert again.status_code == 400 and "only failed jobs are retried" in again.text
        cancelled = await http.post(f"/jobs/{job_id}/cancel", data={"csrf": csrf})
        assert cancelled.status_code == 303
        assert await status_of(store, job_id) is JobStatus.CANCELLED
        missing = await http.post("/jobs/nope/cancel", data={"csrf": csrf})
        assert missing.status_code == 404 and "no such job" in missing.text
        assert (await http.get("/jobs/nope")).status_code == 404

        out = await http.post("/logout", data={"csrf": csrf})
        assert (out.status_code, out.headers["location"]) == (303, "/login")
        assert (await http.get("/")).status_code == 303


async def test_without_tokens_pages_are_open_and_posts_still_need_csrf(tmp_path: Path) -> None:
    async with dashboard(tmp_path) as (http, store):
        job_id = await failed_job(store)
        failed = await http.get("/jobs/failed")
        assert failed.status_code == 200 and job_id in failed.text
        assert "Sign out" not in failed.text
        refused = await http.post(f"/jobs/{job_id}/retry")
        assert refused.status_code == 403
        retried = await http.post(f"/jobs/{job_id}/retry", data={"csrf": csrf_of(failed.text)})
        assert retried.status_code == 303
        assert await status_of(store, job_id) is JobStatus.QUEUED


async def test_a_search_field_it_cannot_read_is_named(tmp_path: Path) -> None:
    async with dashboard(tmp_path) as (http, store):
        job_id = await failed_job(store)
        bad_status = await http.get("/jobs", params={"status": "lost"})
        assert bad_status.status_code == 400 and "status: &#39;lost&#39; is not one of" in (
            bad_status.text
        )
        bad_time = await http.get("/jobs", params={"from": "yesterday"})
        assert bad_time.status_code == 400 and "from: &#39;yesterday&#39;" in bad_time.text
        found = await http.get(
            "/jobs",
            params={"recipient": "+14155550101", "status": "failed", "from": "2020-01-01T00:00"},
        )
        assert found.status_code == 200 and f'data-job="{job_id}"' in found.text
        none = await http.get("/jobs", params={"recipient": "+14155550199"})
        assert f'data-job="{job_id}"' not in none.text


async def test_the_overview_counts_the_queue_the_hour_and_the_callbacks(tmp_path: Path) -> None:
    async with dashboard(tmp_path) as (http, store):
        await failed_job(store)
        later = utcnow() + timedelta(hours=1)
        waiting = [
            NewJob(
                message=Message(id=f"{i:032x}", channel="sms", to=("+1415555010{i}",)),
                run_at=later,
                priority=priority,
                callback_url="http://127.0.0.1:9/hook",
            )
            for i, priority in enumerate([Priority.HIGH, Priority.HIGH, Priority.LOW])
        ]
        await store.enqueue(waiting)
        (cancelled,) = await store.enqueue(
            [replace(waiting[0], message=replace(waiting[0].message, id="c" * 32))]
        )
        await store.cancel(cancelled.id)
        page = (await http.get("/")).text

        def cell(attributes: str) -> str:
            match = re.search(rf"<td {attributes}>(\d+)</td>", page)
            assert match, attributes
            return match[1]

        assert cell('data-status="queued"') == "3"
        assert cell('data-status="failed"') == "1"
        assert cell('data-status="cancelled"') == "1"
        assert cell('data-channel="sms" data-priority="high"') == "2"
        assert cell('data-channel="sms" data-priority="low"') == "1"
        assert cell('data-channel="sms" data-priority="normal"') == "0"
        assert re.search(r'id="failed-hour">1<', page) and re.search(
            r'id="delivered-hour">0<', page
        )
        assert 'data-delivered="0" data-failed="1"' in page
        assert re.search(r'id="callback-backlog">1<', page), "the cancelled job's final event"


async def test_the_retry_button_passes_the_same_per_token_limit_as_the_protocol(
    tmp_path: Path,
) -> None:
    """One limit per token for retries, whichever surface they come through: a retry over TCP
    with token 1 uses up the dashboard's too, and a refusal does nothing."""
    limit = AdminLimit(RecipientLimit(1, 3600.0))
    async with dashboard(tmp_path, tokens=TOKEN, admin_limit=limit) as (http, store):
        job_id = await failed_job(store)
        await sign_in(http)
        limit.admit("retry", "token 1")
        page = await http.get(f"/jobs/{job_id}")
        refused = await http.post(f"/jobs/{job_id}/retry", data={"csrf": csrf_of(page.text)})
        assert refused.status_code == 429 and "token 1 went over" in refused.text
        assert TOKEN not in refused.text
        assert await status_of(store, job_id) == JobStatus.FAILED, "nothing done"


def test_a_session_cookie_is_good_for_its_max_age_and_this_process_only() -> None:
    now = [1000.0]
    sessions = Sessions([SecretStr(TOKEN)], max_age=60, clock=lambda: now[0])
    session = sessions.start(caller="token 1")
    cookie = sessions.cookie(session)
    assert sessions.read(cookie) == Session(session.id, caller="token 1")
    now[0] += 61
    assert sessions.read(cookie) is None, "too old"
    now[0] -= 61
    assert Sessions([SecretStr(TOKEN)]).read(cookie) is None, "another process's key"
    assert sessions.read("not.a.cookie") is None and sessions.read(None) is None


# -- in a real browser -------------------------------------------------------------------------


async def text(page: Page, selector: str) -> str:
    return ((await page.text_content(selector)) or "").strip()


@needs_chromium
async def test_in_a_browser_the_overview_counts_and_a_failed_sms_is_retried_to_delivered(
    tmp_path: Path, http_sink: HTTPSink
) -> None:
    # The gateway refuses the first SMS for good (HTTP 400), then accepts.
    http_sink.answer(Reply(400, "number barred"))
    number = "+14155550123"
    async with running_server(
        tmp_path,
        http_port=free_port(),
        auth_tokens=TOKEN,
        sms_provider="webhook",
        sms_url=f"{http_sink.url}/sms",
    ) as server:
        conn = await LineConnection.open(server.port)
        assert (await conn.request({"op": "auth", "token": TOKEN}))["ok"]
        emails = [
            await conn.request(
                {"channel": "email", "to": f"u{i}@example.com", "subject": "s", "text": "t"}
            )
            for i in range(3)
        ]
        sms = await conn.request({"channel": "sms", "to": number, "text": "code 1234"})

        async def settled() -> bool:
            states = [(await conn.status(s["id"]))["status"] for s in [*emails, sms]]
            return states == ["delivered"] * 3 + ["failed"]

        await wait_for(settled, what="3 emails delivered and the sms failed")

        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(executable_path=str(CHROMIUM))
            try:
                page = await browser.new_page(viewport={"width": 1100, "height": 900})
                await page.goto(f"http://127.0.0.1:{server.settings.http_port}/")
                assert page.url.endswith("/login")
                await page.fill("input[name=token]", TOKEN)
                await page.click("button[type=submit]")
                await page.wait_for_selector("#delivered-hour")

                assert await text(page, "#delivered-hour") == "3"
                assert await text(page, "#failed-hour") == "1"
                assert await text(page, "td[data-status=delivered]") == "3"
                assert await text(page, "td[data-status=failed]") == "1"
                assert await text(page, "td[data-status=queued]") == "0"
                webhook = page.locator("tr[data-provider=webhook]")
                assert await webhook.locator(".circuit").inner_text() == "closed"
                assert await webhook.locator(".rate").inner_text() == "100.0%"
                assert await text(page, "#callback-backlog") == "0"
                bars = page.locator("svg.chart g[data-delivered]")
                assert await bars.count() >= 1
                shot = tmp_path / "dashboard.png"
                await page.screenshot(path=str(shot), full_page=True)
                if target := os.environ.get("NOTIFIER_DASHBOARD_SCREENSHOT"):
                    shutil.copyfile(shot, target)

                await page.click("nav >> text=Jobs")
                await page.fill("input[name=recipient]", number)
                await page.click("form.search button[type=submit]")
                await page.click(f"a[href='/jobs/{sms['id']}']")
                assert await text(page, "#status") == "failed"
                assert "HTTP 400" in await text(page, "#last-error")
                # The form posts and is sent back to the job's page: reload only once there.
                async with page.expect_navigation():
                    await page.click("button[name=retry]")

                async def delivered() -> bool:
                    await page.reload()
                    return await text(page, "#status") == "delivered"

                await wait_for(delivered, timeout=20, what="the retried sms delivered")
                assert await text(page, "#attempts") == "1"
            finally:
                await browser.close()
        sent = http_sink.wait_for_requests(2)
        assert [request.json()["to"] for request in sent] == [number, number]
        await conn.close()
