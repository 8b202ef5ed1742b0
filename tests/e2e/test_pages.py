"""/ui/sse and /ui/dashboard in a real browser (Debian's Chromium, driven by Playwright) against
the whole system on real HTTP.

Chromium is required: without it these tests fail (``make test`` installs it). With
``TIERQ_SCREENSHOTS=1`` they also write docs/img/sse.png and docs/img/dashboard.png.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, expect, sync_playwright
from playwright.sync_api import Error as PlaywrightError
from qstash import QStash

from system import FREE, PAID, System
from tierq.config import DEV_ADMIN_TOKEN, Settings
from tierq.web.pages import page_config

CHROMIUM_ARGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
    "--disable-background-networking", "--disable-component-update", "--no-first-run",
    "--disable-sync",
]  # fmt: skip
WAIT_MS = 15_000
SCREENSHOTS = os.environ.get("TIERQ_SCREENSHOTS") == "1"
IMG_DIR = Path(__file__).resolve().parents[2] / "docs" / "img"
SLOW = {"tokens": 30, "token_latency_ms": 100}
CONTIGUOUS = re.compile(r"^ok 1\.\.(\d+) contiguous$")
QUEUES = ["q_paid_stream", "q_free_stream", "q_paid_batch", "q_free_batch", "q_paid_vision",
          "q_free_vision"]  # fmt: skip

expect.set_options(timeout=WAIT_MS)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        pytest.fail("chromium is not installed (apt-get install chromium; make test does this)")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, timeout=30_000)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser, system: System) -> Iterator[Page]:
    """A fresh browser context; uncaught script errors and console errors fail the test
    (except the network log lines of answers the test expects to be 4xx). It depends on
    ``system`` so that it closes first: the browser's keep-alive connections are gone before
    the servers stop."""
    context = browser.new_context(viewport={"width": 1440, "height": 900})
    context.set_default_timeout(WAIT_MS)
    page = context.new_page()
    errors: list[str] = []

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error" and "Failed to load resource" not in message.text:
            errors.append(message.text)

    page.on("pageerror", lambda exc: errors.append(f"pageerror: {exc}"))
    page.on("console", on_console)
    yield page
    context.close()
    assert not errors, errors


def screenshot(page: Page, name: str) -> None:
    if SCREENSHOTS:
        IMG_DIR.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(IMG_DIR / name), full_page=True)


def open_sse(page: Page, system: System) -> None:
    page.goto(f"{system.app.url}/ui/sse")
    expect(page.locator("body")).to_have_attribute("data-ready", "true")


def seq_count(page: Page) -> int:
    """N from the page's "ok 1..N contiguous" (after checking the page says so)."""
    check = page.get_by_test_id("seq-check")
    expect(check).to_have_attribute("data-state", "ok")
    expect(check).to_have_text(CONTIGUOUS)
    match = CONTIGUOUS.match(check.inner_text())
    assert match is not None
    return int(match.group(1))


def row_seqs(page: Page) -> list[int]:
    return [int(s) for s in page.locator("#event-rows tr[data-seq]").evaluate_all(
        "rows => rows.map(r => r.dataset.seq)")]  # fmt: skip


# -- serving ----------------------------------------------------------------------------------


def test_pages_and_config_are_served(system: System) -> None:
    for path in ("/ui/sse", "/ui/dashboard"):
        res = system.http.get(path)
        assert res.status_code == 200
        assert res.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in res.headers["content-security-policy"]
    for name in ("tierq.css", "common.js", "sse.js", "dashboard.js"):
        assert system.http.get(f"/ui/static/{name}").status_code == 200
    assert system.http.get("/ui/static/pages.py").status_code == 404
    assert system.http.get("/ui/static/..%2Fpages.py").status_code == 404
    config = system.http.get("/ui/config.json").json()
    assert config["devMode"] is True
    assert config["devKeys"] == {"paid": PAID, "free": FREE}
    assert config["adminToken"] == DEV_ADMIN_TOKEN
    assert config["services"]["chat"] == {"experiences": ["stream", "batch"], "models": ["sim"]}
    assert config["queues"] == QUEUES


def test_config_hides_credentials_outside_dev_mode() -> None:
    settings = Settings(admin_token="secret-admin", api_keys={})
    config = page_config(settings)
    assert config["devMode"] is False
    assert config["devKeys"] is None
    assert config["adminToken"] is None
    assert "secret-admin" not in json.dumps(config)


# -- /ui/sse ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "mode", "queue", "tier"),
    [
        ("paid", "auto", "q_paid_stream", "paid"),
        ("paid", "paid", "q_paid_stream", "paid"),
        ("paid", "free", "q_free_stream", "free"),
        ("free", "auto", "q_free_stream", "free"),
    ],
)
def test_submit_shows_queue_and_completed_sequence(
    page: Page, system: System, key: str, mode: str, queue: str, tier: str
) -> None:
    open_sse(page, system)
    expect(page.get_by_test_id("api-key")).to_have_value(PAID)  # prefilled in dev mode
    if key == "free":
        page.get_by_test_id("use-free-key").click()
        expect(page.get_by_test_id("api-key")).to_have_value(FREE)
    page.get_by_test_id(f"mode-{mode}").check()
    page.get_by_test_id("submit").click()

    expect(page.get_by_test_id("queue-id")).to_have_text(queue)
    expect(page.get_by_test_id("tier")).to_have_text(tier)
    expect(page.get_by_test_id("status")).to_have_text("completed")
    expect(page.get_by_test_id("connection")).to_have_text("done")
    expect(page.get_by_test_id("text-check")).to_have_text("ok: deltas = result")
    n = seq_count(page)
    assert row_seqs(page) == list(range(1, n + 1))
    types = page.locator("#event-rows tr[data-seq]").evaluate_all(
        "rows => rows.map(r => r.dataset.type)"
    )
    assert types[0] == "queued"
    assert "started" in types
    assert "delta" in types
    assert types[-1] == "completed"

    job_id = page.get_by_test_id("job-id").inner_text()
    job = system.job(job_id, PAID if key == "paid" else FREE)
    assert job["status"] == "completed"
    assert job["queueId"] == queue
    assert page.get_by_test_id("text").inner_text() == job["result"]


def test_paid_mode_with_a_free_key_is_refused(page: Page, system: System) -> None:
    open_sse(page, system)
    page.get_by_test_id("use-free-key").click()
    page.get_by_test_id("mode-paid").check()
    page.get_by_test_id("submit").click()
    expect(page.get_by_test_id("status")).to_have_text("rejected")
    expect(page.get_by_test_id("error")).to_contain_text("403 plan_required")
    expect(page.get_by_test_id("job-id")).to_have_text("—")


def test_batch_and_vision_jobs(page: Page, system: System) -> None:
    open_sse(page, system)
    for experience, queue in (("batch", "q_paid_batch"), ("vision", "q_paid_vision")):
        page.get_by_test_id(f"experience-{experience}").check()
        expect(page.get_by_test_id("image-url")).to_be_visible(visible=experience == "vision")
        page.get_by_test_id("submit").click()
        expect(page.get_by_test_id("queue-id")).to_have_text(queue)
        expect(page.get_by_test_id("status")).to_have_text("completed")
        expect(page.get_by_test_id("text-check")).to_have_text("n/a (no deltas outside stream)")
        seq_count(page)
    expect(page.get_by_test_id("service")).to_have_value("describe")
    expect(page.get_by_test_id("text")).to_contain_text("[1 image]")


def test_reconnect_mid_stream_loses_and_repeats_nothing(page: Page, system: System) -> None:
    open_sse(page, system)
    page.get_by_test_id("advanced").locator("summary").click()
    page.get_by_test_id("simulate").fill(json.dumps(SLOW))
    page.get_by_test_id("submit").click()
    expect(page.get_by_test_id("queue-id")).to_have_text("q_paid_stream")

    deltas = page.locator("#event-rows tr[data-type='delta']")
    expect(deltas.nth(2)).to_be_attached()  # mid-stream: 3 of 30 tokens seen
    page.get_by_test_id("reconnect").click()
    expect(page.get_by_test_id("reconnects")).to_have_text("1")
    expect(page.locator("#event-rows tr.reconnect")).to_have_count(1)
    expect(page.get_by_test_id("status")).to_have_text("completed")

    n = seq_count(page)
    assert row_seqs(page) == list(range(1, n + 1))
    after = page.locator("#event-rows tr.reconnect ~ tr[data-seq]")
    assert after.count() > 1, "the reconnect happened after the stream had ended"
    expect(after.last).to_have_attribute("data-type", "completed")
    expect(page.get_by_test_id("text-check")).to_have_text("ok: deltas = result")

    # the page saw exactly the job's log: the same entry ids, in order, each once
    job_id = page.get_by_test_id("job-id").inner_text()
    token = page.get_by_test_id("job-id").get_attribute("data-events-token")
    assert token
    log = system.events(job_id, token)
    ids = page.locator("#event-rows tr[data-seq]").evaluate_all(
        "rows => rows.map(r => r.dataset.id)"
    )
    assert ids == [e.id for e in log]
    assert n == len(log)
    # every token arrived, in the deltas the log holds (two tokens can share a delta when
    # the process was slow for a moment: deltas are coalesced)
    text = "".join(e.data["text"] for e in log if e.event == "delta")
    assert len(text.split()) == SLOW["tokens"]
    assert deltas.count() == sum(e.event == "delta" for e in log)
    screenshot(page, "sse.png")


# -- /ui/dashboard ----------------------------------------------------------------------------


def admin() -> dict[str, str]:
    return {"Authorization": f"Bearer {DEV_ADMIN_TOKEN}"}


def qstash_paused(system: System, queue: str) -> bool:
    client = QStash(system.settings.qstash_token or "", base_url=system.broker.url)
    try:
        return client.queue.get(queue).paused
    finally:
        client.http._client.close()  # the SDK never closes its httpx client


STREAMED_SUBMIT_JS = """
async ([key, body]) => {
  const res = await fetch("/api/jobs", {
    method: "POST",
    headers: {"Authorization": `Bearer ${key}`, "Accept": "text/event-stream",
              "Content-Type": "application/json"},
    body: JSON.stringify(body),
  });
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let text = "", reads = 0;
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    reads += 1;
    text += decoder.decode(value, {stream: true});
  }
  const events = text.split("\\n\\n").filter(b => b.includes("data:")).map(block => {
    const data = block.split("\\n").find(line => line.startsWith("data:"));
    return JSON.parse(data.slice(5));
  });
  return {status: res.status, type: res.headers.get("content-type"),
          jobId: res.headers.get("x-tierq-job-id"), reads, events};
}
"""


def test_a_browser_submits_and_reads_the_events_in_one_fetch(page: Page, system: System) -> None:
    """``POST /api/jobs`` with ``Accept: text/event-stream``, read by ``fetch`` as the events
    come (``EventSource`` cannot ``POST``): the whole log, in pieces as the model writes it."""
    open_sse(page, system)
    body = {
        "service": "chat",
        "experience": "stream",
        "mode": "auto",
        "model": "sim",
        "input": {"prompt": "one fetch", "simulate": {"tokens": 8, "token_latency_ms": 60}},
    }
    got = page.evaluate(STREAMED_SUBMIT_JS, [PAID, body])
    assert got["status"] == 200
    assert got["type"].startswith("text/event-stream")
    events = got["events"]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert events[0]["type"] == "queued"
    assert events[-1]["type"] == "completed"
    assert all(e["jobId"] == got["jobId"] for e in events)
    text = "".join(e["text"] for e in events if e["type"] == "delta")
    assert text == events[-1]["result"]
    assert len(text.split()) == 8
    assert got["reads"] > 2  # streamed as written (~0.5 s of tokens), not handed over at the end
    assert system.job(got["jobId"])["status"] == "completed"


@pytest.mark.timeout(120)
def test_dashboard_shows_queues_guards_and_pauses(page: Page, system: System) -> None:
    done = system.submit(PAID).json()
    assert system.events(done["jobId"], done["eventsToken"])[-1].event == "completed"

    page.goto(f"{system.app.url}/ui/dashboard")
    expect(page.get_by_test_id("admin-token")).to_have_value(DEV_ADMIN_TOKEN)
    expect(page.get_by_test_id("poll-status")).to_have_attribute("data-state", "ok")
    cards = page.locator("#queues > section.queue")
    expect(cards).to_have_count(6)
    assert cards.evaluate_all("cs => cs.map(c => c.dataset.queue)") == QUEUES
    paid = page.get_by_test_id("queue-q_paid_stream")
    expect(paid.locator("[data-field=parallelism]")).to_have_text("16")
    expect(paid.locator("[data-field=completed]")).to_have_text("1")
    expect(page.get_by_test_id("dlq-size")).to_have_text("0")

    # a job holding its guards shows in the guard tables and as in flight
    hang = system.submit(PAID, input={"prompt": "hold", "simulate": {"fail": "hang"}}).json()
    try:
        model_row = page.locator("#model-guards tr[data-model='sim'][data-tier='paid']")
        expect(model_row).to_contain_text("1 / 8")
        expect(model_row).to_contain_text(hang["jobId"])
        expect(page.locator("#user-guards tr[data-user='dev-paid']")).to_contain_text("1 / 8")
        expect(paid.locator("[data-field=inFlight]")).to_have_text("1 / 16")

        # pause through the page: QStash has the queue paused; resume the same way
        queue = "q_free_batch"
        card = page.get_by_test_id(f"queue-{queue}")
        expect(page.get_by_test_id(f"state-{queue}")).to_have_text("active")
        page.get_by_test_id(f"pause-{queue}").click()
        expect(page.get_by_test_id(f"state-{queue}")).to_have_text("paused")
        expect(card).to_have_attribute("data-paused", "true")
        expect(page.get_by_test_id(f"resume-{queue}")).to_be_enabled()
        assert qstash_paused(system, queue) is True
        assert system.http.get(f"/api/admin/queues/{queue}", headers=admin()).json()["paused"]
        expect(page.get_by_test_id("state-q_paid_stream")).to_have_text("active")
        # a job submitted to the paused queue is parked: counted, and its user shown
        assert system.submit(FREE, experience="batch").status_code == 202
        expect(card.locator("[data-field=parked]")).to_have_text("1")
        expect(card.locator("[data-field=topParked]")).to_have_text("dev-free (1)")
        screenshot(page, "dashboard.png")

        page.get_by_test_id(f"resume-{queue}").click()
        expect(page.get_by_test_id(f"state-{queue}")).to_have_text("active")
        expect(page.get_by_test_id(f"pause-{queue}")).to_be_enabled()
        assert qstash_paused(system, queue) is False
        expect(card.locator("[data-field=parked]")).to_have_text("0")  # resumed: dispatched
    finally:
        res = system.http.delete(
            f"/api/jobs/{hang['jobId']}", headers={"Authorization": f"Bearer {PAID}"}
        )
        assert res.status_code == 200


def test_dashboard_reports_a_wrong_admin_token(page: Page, system: System) -> None:
    page.goto(f"{system.app.url}/ui/dashboard")
    expect(page.get_by_test_id("poll-status")).to_have_attribute("data-state", "ok")
    page.get_by_test_id("admin-token").fill("wrong")
    expect(page.get_by_test_id("poll-status")).to_contain_text("403")
    page.get_by_test_id("admin-token").fill(DEV_ADMIN_TOKEN)
    expect(page.get_by_test_id("poll-status")).to_have_attribute("data-state", "ok")
    assert httpx.get(f"{system.app.url}/api/admin/overview").status_code == 401


# -- under tierq serve ------------------------------------------------------------------------


def test_pages_under_serve_take_the_admin_token_from_the_browser(
    browser: Browser, make_system: Callable[..., System]
) -> None:
    """``tierq serve`` with ``pages_access = "token"``: the browser is asked for credentials
    (HTTP Basic, the admin token as the password), then loads the page, its scripts and its
    config with them; the dashboard then polls the admin API with the token typed in the page
    (nothing is prefilled outside dev mode)."""
    system = make_system(dev_mode=False, pages_access="token")
    url = f"{system.app.url}/ui/dashboard"
    anonymous = browser.new_context()  # asked, it has nothing to give: no page
    try:
        with pytest.raises(PlaywrightError, match="ERR_INVALID_AUTH_CREDENTIALS"):
            anonymous.new_page().goto(url)
    finally:
        anonymous.close()
    assert httpx.get(url).status_code == 401
    context = browser.new_context(
        http_credentials={"username": "operator", "password": DEV_ADMIN_TOKEN}
    )
    try:
        page = context.new_page()
        res = page.goto(url)
        assert res is not None
        assert res.status == 200
        expect(page.get_by_test_id("admin-token")).to_have_value("")
        page.get_by_test_id("admin-token").fill(DEV_ADMIN_TOKEN)
        expect(page.get_by_test_id("poll-status")).to_have_attribute("data-state", "ok")
        expect(page.locator("#queues > section.queue")).to_have_count(6)
    finally:
        context.close()
