"""The inbox page (clients/web), served by the Gate, driven in headless Chromium against a real
local cluster: sign in with a user JWT, see system messages arrive live with the unread badge,
mark read, delete, send."""

from __future__ import annotations

import contextlib
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Page, expect, sync_playwright

from pigeon.auth import mint_user_token
from pigeon.local import LocalCluster

pytestmark = pytest.mark.integration

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
LIVE_WITHIN_MS = 5000  # "within seconds": a pushed message, from publish to the page
WAIT_MS = 10000


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    local = LocalCluster(
        tmp_path_factory.mktemp("web"), gate_port=0, gate_http_port=0, env={"PATH": "/usr/bin"}
    )
    local.start()
    try:
        yield local
    finally:
        local.stop()


@contextlib.contextmanager
def browser_page() -> Iterator[Page]:
    """A page in headless Debian Chromium (Playwright's own browsers are never downloaded)."""
    if not CHROMIUM.exists():
        # A missing browser must fail, not skip: a skipped test would leave the page untested.
        pytest.fail(
            f"Chromium is not installed at {CHROMIUM}: install it with "
            "`apt-get install -y chromium` (never `playwright install`)",
            pytrace=False,
        )
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            context = browser.new_context(viewport={"width": 1200, "height": 760})
            yield context.new_page()
        finally:
            browser.close()


def publish(cluster: LocalCluster, to: str, title: str, body: str, source: str) -> None:
    reply = httpx.post(
        f"http://{cluster.gate.http_address}/v1/publish",
        json={"to": [to], "title": title, "body": body, "source": source},
        headers={"Authorization": f"Bearer {cluster.secrets.api_key}"},
        timeout=10,
    )
    assert reply.status_code == 200, reply.text


def inbox_of(cluster: LocalCluster, user: str) -> list[str]:
    gate = f"http://{cluster.gate.http_address}"
    token = mint_user_token(cluster.secrets.jwt_secret, user)
    connect = httpx.post(f"{gate}/v1/connect", json={"token": token}, timeout=10).json()
    reply = httpx.get(
        f"http://{connect['nodeHttpAddress']}/v1/messages",
        headers={"Authorization": f"Bearer {connect['sessionToken']}"},
        timeout=10,
    )
    return [m["body"] for m in reply.json()["messages"]]


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/", 200),
        ("/web/index.html", 200),
        ("/web/app.js", 200),
        ("/web/style.css", 200),
        ("/web/no-such-file.js", 404),
        ("/openapi.json", 200),
    ],
)
def test_every_page_and_asset_carries_the_security_headers(
    cluster: LocalCluster, path: str, status: int
) -> None:
    # A copy of the page under /web, framed by another site or sniffed into HTML, must be as
    # locked down as the page at /.
    reply = httpx.get(f"http://{cluster.gate.http_address}{path}", timeout=10)
    assert reply.status_code == status
    assert "frame-ancestors 'none'" in reply.headers.get("content-security-policy", "")
    assert "default-src 'self'" in reply.headers["content-security-policy"]
    assert reply.headers.get("x-content-type-options") == "nosniff"
    assert reply.headers.get("referrer-policy") == "no-referrer"


def test_messages_arrive_live_and_the_badge_follows_reads_and_deletes(
    cluster: LocalCluster,
) -> None:
    with browser_page() as page:
        check_inbox_page(cluster, page)


def check_inbox_page(cluster: LocalCluster, page: Page) -> None:
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    # Failed loads (a missing file's 404 too) show as console errors.
    page.on("console", lambda line: errors.append(line.text) if line.type == "error" else None)
    response = page.goto(f"http://{cluster.gate.http_address}/")
    # The page runs under a policy that allows its own script only (and works under it: a
    # violation would be a console error).
    assert response is not None
    assert "default-src 'self'" in response.headers["content-security-policy"]
    expect(page).to_have_title("Pigeon inbox")

    page.fill("#token", mint_user_token(cluster.secrets.jwt_secret, "alice"))
    page.click("#connect")
    status = page.get_by_test_id("status")
    badge = page.get_by_test_id("unread-badge")
    expect(status).to_have_text("live", timeout=WAIT_MS)
    expect(badge).to_have_text("0")

    publish(cluster, "alice", "Invoice ready", "Your invoice #42 is ready.", "billing")
    invoice = page.get_by_test_id("message").filter(has_text="Your invoice #42 is ready.")
    expect(invoice).to_be_visible(timeout=LIVE_WITHIN_MS)
    expect(invoice).to_contain_text("billing")
    expect(invoice.locator(".kind")).to_have_text("system")
    expect(invoice.locator(".kind")).to_be_visible()
    expect(badge).to_have_text("1", timeout=WAIT_MS)

    publish(cluster, "alice", "Standup moved", "Today's standup is at 10:30.", "calendar")
    standup = page.get_by_test_id("message").filter(has_text="Today's standup is at 10:30.")
    expect(standup).to_be_visible(timeout=LIVE_WITHIN_MS)
    expect(badge).to_have_text("2", timeout=WAIT_MS)

    invoice.get_by_test_id("mark-read").click()
    expect(badge).to_have_text("1", timeout=WAIT_MS)
    expect(invoice).not_to_have_class(re.compile(r"\bunread\b"))
    expect(standup).to_have_class(re.compile(r"\bunread\b"))

    page.fill("#to", "bob")
    page.fill("#title", "Lunch?")
    page.fill("#body", "Noodles at noon?")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "web-inbox.png"), full_page=True)

    page.click("#send")
    expect(page.locator("#toast")).to_have_text("Sent to bob", timeout=WAIT_MS)
    assert inbox_of(cluster, "bob") == ["Noodles at noon?"]

    standup.get_by_test_id("delete").click()
    expect(standup).to_have_count(0, timeout=WAIT_MS)
    expect(badge).to_have_text("0", timeout=WAIT_MS)
    assert inbox_of(cluster, "alice") == ["Your invoice #42 is ready."]

    # From the default source, "system": the name once, without a "system" badge beside it.
    publish(cluster, "alice", "", "Maintenance tonight.", "")
    notice = page.get_by_test_id("message").filter(has_text="Maintenance tonight.")
    expect(notice).to_be_visible(timeout=LIVE_WITHIN_MS)
    expect(notice.locator(".sender")).to_have_text("system")
    expect(notice.locator(".kind")).to_be_hidden()
    assert errors == []


def test_a_stream_gone_silent_is_left_for_another_node(tmp_path: Path) -> None:
    # Heartbeats every second: a stream without an event for 2.5 s is silent.
    env = {"PATH": "/usr/bin", "PIGEON_HEARTBEAT_INTERVAL": "1"}
    with (
        LocalCluster(tmp_path / "c", nodes=2, gate_port=0, gate_http_port=0, env=env) as cluster,
        browser_page() as page,
    ):
        page.goto(f"http://{cluster.gate.http_address}/")
        page.fill("#token", mint_user_token(cluster.secrets.jwt_secret, "wendy"))
        page.click("#connect")
        status, where = page.get_by_test_id("status"), page.locator("#node")
        expect(status).to_have_text("live", timeout=WAIT_MS)
        first = next(n for n in cluster.nodes if where.inner_text().startswith(f"{n.name} "))
        other = next(n for n in cluster.nodes if n is not first)
        # Frozen, not closed: its connections stay open and silent.
        first.signal(signal.SIGSTOP)
        try:
            expect(where).to_contain_text(other.name, timeout=30_000)
            expect(status).to_have_text("live", timeout=WAIT_MS)
            sent = httpx.post(
                f"http://{other.http_address}/v1/publish",
                json={"to": ["wendy"], "body": "after the freeze"},
                headers={"Authorization": f"Bearer {cluster.secrets.api_key}"},
                timeout=10,
            )
            assert sent.status_code == 200, sent.text
            arrived = page.get_by_test_id("message").filter(has_text="after the freeze")
            expect(arrived).to_be_visible(timeout=LIVE_WITHIN_MS)
        finally:
            first.signal(signal.SIGCONT)
