"""The console's tables in Chromium: the services list fits a 1440px screen with long endpoints and labels,
tables scroll inside their wrapper at 390px, drain and undrain from the list, and a force rebalance from
the group page ends on the new generation.

Needs /usr/bin/chromium (Debian's package) and the playwright package; skipped, saying why, without them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from django.contrib.auth.models import User

from groups.models import ServiceGroup
from registry import leases
from registry.models import ApiToken, Service
from registry_project.embedded_redis import RedisServer, free_port
from registry_project.localserver import start_server
from tests.conftest import database_url, wait_for

CHROMIUM = "/usr/bin/chromium"
PASSWORD = "pw-for-table-tests"

try:
    from playwright.sync_api import Browser, Page, expect, sync_playwright
except ImportError:  # pragma: no cover - requirements-dev.txt installs it
    sync_playwright = None  # type: ignore[assignment]

pytestmark = [
    pytest.mark.skipif(sync_playwright is None, reason="browser tests skipped: the playwright package is missing"),
    pytest.mark.skipif(
        not os.access(CHROMIUM, os.X_OK),
        reason=f"browser tests skipped: no Chromium at {CHROMIUM} (apt-get install -y chromium)",
    ),
]


@pytest.fixture(scope="module")
def chromium() -> Iterator[Browser]:
    # Playwright's sync API runs an event loop in this thread; the fixtures' ORM calls are not async code.
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    try:
        with sync_playwright() as playwright:
            # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
            browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
            yield browser
            browser.close()
    finally:
        os.environ.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)


@pytest.fixture
def console_url(chromium: Browser, transactional_db: Any, redis_server: RedisServer) -> Iterator[str]:
    """A real server process of the project on the suite's database and Redis."""
    env = dict(os.environ, REDIS_URL=redis_server.url, DATABASE_URL=database_url(), LOG_LEVEL="WARNING")
    env.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
    port = free_port()
    process = start_server(port, env)
    yield f"http://127.0.0.1:{port}"
    process.terminate()
    process.wait(timeout=20)


@pytest.fixture
def api(console_url: str) -> Iterator[httpx.Client]:
    key = ApiToken.generate_key()
    token = ApiToken(name="table-tests", is_staff=True)
    token.set_key(key)
    token.save()
    with httpx.Client(base_url=console_url + "/api/v1", headers={"Authorization": f"Bearer {key}"}) as client:
        yield client


def logged_in(chromium: Browser, base_url: str, width: int, height: int) -> Page:
    if not User.objects.filter(username="operator").exists():
        User.objects.create_superuser("operator", "op@example.com", PASSWORD)
    context = chromium.new_context(viewport={"width": width, "height": height}, base_url=base_url)
    context.set_default_timeout(15_000)
    page = context.new_page()
    page.goto("/admin/login/?next=/admin/")
    page.fill("#id_username", "operator")
    page.fill("#id_password", PASSWORD)
    page.click("input[type=submit]")
    page.wait_for_url(re.compile(r"/admin/$"))
    return page


def register_long_services(api: httpx.Client, count: int = 30) -> None:
    for n in range(1, count + 1):
        response = api.post(
            "/services/",
            json={
                "service_id": f"ingest-orders-eu-west-1-replica-{n}",
                "service_name": "ingest-orders-normaliser-with-a-long-name",
                "service_type": "transform",
                "endpoint": f"ingest-orders-normaliser-{n}.pipeline.eu-west-1.internal.example.com:50051",
                "labels": {
                    "env": "production",
                    "team": "ingestion-platform-and-streaming",
                    "zone": "eu-west-1a",
                    "version": f"2026.11.{n}-build.{n * 7919}",
                },
                "group_id": "orders-normalisers-eu-west-1",
                "lease_duration": 600,
            },
        )
        assert response.status_code == 201, response.text


REGISTER_FIELDS = [
    "service_id",
    "service_name",
    "service_type",
    "endpoint",
    "labels",
    "group_id",
    "lease_duration",
    "deregister_after",
]


def overflow(page: Page, selector: str = "html") -> dict[str, int]:
    return page.eval_on_selector(selector, "e => ({scroll: e.scrollWidth, client: e.clientWidth})")


def test_services_list_fits_1440px_without_horizontal_scroll(chromium, console_url, api):
    register_long_services(api)
    # the widest cells too: health with a drained badge beside it, a lapsed lease with its removal time
    leases.drain([f"ingest-orders-eu-west-1-replica-{n}" for n in (1, 2, 3)])
    leases.set_operator_weight(["ingest-orders-eu-west-1-replica-4"], 1000)
    body = api.get("/services/ingest-orders-eu-west-1-replica-1/").json()
    body.update(lease_duration=1, deregister_after=3600, weight=1000)
    assert api.post("/services/", json={k: body[k] for k in REGISTER_FIELDS}).status_code == 200
    page = logged_in(chromium, console_url, 1440, 900)

    def lapsed_shown() -> bool:
        page.goto("/admin/registry/service/?o=1")
        return "removal in" in page.locator("#result_list").inner_text()

    wait_for(lapsed_shown, 15)
    expect(page.locator("#result_list tbody tr")).to_have_count(30)
    expect(page.locator(".conveyor-badge.drained")).to_have_count(3)

    width = overflow(page)
    assert width["scroll"] <= width["client"], width  # document.documentElement: no page scroll sideways
    table = overflow(page, "#changelist .results")
    assert table["scroll"] <= table["client"], table  # nor inside the table's own wrapper
    if os.environ.get("CONSOLE_SCREENSHOTS"):
        page.screenshot(path=os.path.join(os.environ["CONSOLE_SCREENSHOTS"], "services-list.png"))
    # every column is on screen, the last one included, and the full endpoint is on hover
    # (read in one script: the live list may swap in a fresh table between two calls)
    first = page.evaluate(
        """() => {
            const row = document.querySelector("#result_list tbody tr");
            return {right: row.querySelector("td.field-registered").getBoundingClientRect().right,
                    title: row.querySelector("td.field-endpoint_cell span").getAttribute("title")};
        }"""
    )
    assert first["right"] <= 1440, first
    assert first["title"] == "ingest-orders-normaliser-1.pipeline.eu-west-1.internal.example.com:50051"


def test_at_390px_tables_scroll_inside_their_wrapper(chromium, console_url, api):
    register_long_services(api, 5)
    api.put("/topics/orders/", json={"partitions": 12})
    for member in ("ingest-orders-eu-west-1-replica-1", "ingest-orders-eu-west-1-replica-2"):
        api.post("/groups/g1/members/", json={"member_id": member, "service_name": "c", "topics": ["orders"]})
    page = logged_in(chromium, console_url, 390, 844)

    page.goto("/admin/registry/service/")
    expect(page.locator("#result_list tbody tr")).to_have_count(5)
    results = overflow(page, "#changelist .results")
    assert results["scroll"] > results["client"]  # the table is wider than the screen ...
    page.eval_on_selector("#changelist .results", "e => { e.scrollLeft = e.scrollWidth }")
    assert page.eval_on_selector("#changelist .results", "e => e.scrollLeft") > 0  # ... and scrolls in its wrapper
    assert page.eval_on_selector("#changelist .results", "e => getComputedStyle(e).overflowX") == "auto"

    page.goto("/admin/groups/servicegroup/g1/change/")
    expect(page.locator("table.conveyor-members tbody tr")).to_have_count(2)
    # Read in one script: the live page may swap its read-only values (a new node) between two calls.
    box = page.evaluate(
        """() => {
            const e = [...document.querySelectorAll(".conveyor-scroll")].find(
                (x) => x.querySelector("table.conveyor-members"));
            const seen = {scroll: e.scrollWidth, client: e.clientWidth, right: e.getBoundingClientRect().right};
            e.scrollLeft = e.scrollWidth;
            return {...seen, scrolled: e.scrollLeft};
        }"""
    )
    assert box["scroll"] > box["client"] and box["right"] <= 390, box
    assert box["scrolled"] > 0, box
    if os.environ.get("CONSOLE_SCREENSHOTS"):
        page.screenshot(path=os.path.join(os.environ["CONSOLE_SCREENSHOTS"], "group-page-390.png"))


def test_drain_and_undrain_from_the_list(chromium, console_url, api):
    register_long_services(api, 3)
    page = logged_in(chromium, console_url, 1440, 900)
    target = "ingest-orders-eu-west-1-replica-2"
    page.goto("/admin/registry/service/")
    row = page.locator("#result_list tbody tr", has=page.locator(f'input[value="{target}"]'))

    row.locator("input.action-select").check()
    page.select_option("select[name=action]", "drain")
    page.click("button[name=index]")

    expect(page.locator(".messagelist")).to_contain_text("Drained 1 service(s)")
    expect(row.locator(".conveyor-badge.drained")).to_have_text("drained")
    expect(page.locator(".conveyor-badge.drained")).to_have_count(1)
    assert Service.objects.get(pk=target).weight == 0

    row.locator("input.action-select").check()
    page.select_option("select[name=action]", "undrain")
    page.click("button[name=index]")

    expect(page.locator(".messagelist")).to_contain_text("Undrained 1 service(s)")
    expect(page.locator(".conveyor-badge.drained")).to_have_count(0)
    assert Service.objects.get(pk=target).weight == 100


def test_force_rebalance_from_the_group_page_shows_the_new_generation(chromium, console_url, api):
    api.put("/topics/orders/", json={"partitions": 12})
    for member in ("m1", "m2"):
        api.post("/groups/g1/members/", json={"member_id": member, "service_name": "c", "topics": ["orders"]})
    before = ServiceGroup.objects.get(pk="g1").generation
    page = logged_in(chromium, console_url, 1440, 900)
    page.goto("/admin/groups/servicegroup/g1/change/")

    shots = os.environ.get("CONSOLE_SCREENSHOTS")
    if shots:
        page.screenshot(path=os.path.join(shots, "group-page.png"), full_page=True)
    page.click("a.conveyor-rebalance")
    expect(page.locator("#content h1")).to_have_text("Force a rebalance of g1?")
    if shots:
        page.screenshot(path=os.path.join(shots, "rebalance-confirmation.png"))
    page.click(f"input[type=submit][value='Yes, rebalance (generation {before + 1})']")

    page.wait_for_url(re.compile(r"/admin/groups/servicegroup/g1/change/$"))
    expect(page.locator(".messagelist")).to_contain_text(f"now at generation {before + 1}")
    expect(page.locator(".field-generation .readonly")).to_have_text(str(before + 1))
    assert ServiceGroup.objects.get(pk="g1").generation == before + 1
