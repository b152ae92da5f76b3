"""The live admin in a real Chromium against a real server: pages follow changes made through the API
without a reload, lease lapses show as they happen, the overview agrees with the API, a dropped socket
says so and recovers, and no admin page logs a JavaScript error."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import httpx
import pytest
from django.apps import apps
from django.contrib import admin
from django.urls import reverse
from django.utils import timezone

from registry import leases
from registry.models import Health, LeaderTerm, ServiceType
from tests.browser.conftest import Console, LiveServer
from tests.conftest import service_body, wait_for

pytest.importorskip("playwright", reason="browser tests skipped: the playwright package is missing")
from playwright.sync_api import Page, expect

pytestmark = pytest.mark.django_db(transaction=True)

SOON = 5_000  # ms: Playwright's wait for what follows a change (live pages update well within it)


def open_live(page: Page, path: str) -> None:
    """Open ``path`` and wait until its staff socket is subscribed, so no later change can be missed."""
    page.goto(path)
    expect(page.locator("html")).to_have_attribute("data-conveyor-live", "open", timeout=SOON)
    page.evaluate("window.__notReloaded = true")


def assert_not_reloaded(page: Page) -> None:
    assert page.evaluate("window.__notReloaded === true"), "the page was reloaded"


def register(api: httpx.Client, service_id: str, **overrides: Any) -> dict[str, Any]:
    response = api.post("/services/", json=service_body(service_id, **overrides))
    assert response.status_code in (200, 201), response.text
    return response.json()


def row(page: Page, text: str) -> Any:
    return page.locator("#result_list tbody tr", has_text=text)


def test_a_service_registered_through_the_api_appears_on_the_open_services_list(
    staff_page: Page, staff_api: httpx.Client
) -> None:
    # given the services list open with one service on it
    register(staff_api, "svc-first")
    open_live(staff_page, "/admin/registry/service/")
    expect(row(staff_page, "svc-first")).to_have_count(1)
    # when another registers through the API, then it appears without a reload
    register(staff_api, "svc-second", service_name="pg-sink", service_type="sink")
    expect(row(staff_page, "svc-second")).to_have_count(1, timeout=SOON)
    assert_not_reloaded(staff_page)


def test_the_first_service_appears_on_an_empty_services_list(staff_page: Page, staff_api: httpx.Client) -> None:
    open_live(staff_page, "/admin/registry/service/")
    expect(staff_page.locator("#result_list")).to_have_count(0)
    register(staff_api, "svc-only")
    expect(row(staff_page, "svc-only")).to_have_count(1, timeout=SOON)
    assert_not_reloaded(staff_page)


def test_a_lapse_turns_the_health_badge_within_a_second_of_the_lease_deadline(
    staff_page: Page, staff_api: httpx.Client
) -> None:
    # given a service with a 3 s lease on the open list, healthy
    open_live(staff_page, "/admin/registry/service/")
    body = register(staff_api, "svc-short", lease_duration=3)
    expect(row(staff_page, "svc-short")).to_contain_text("healthy", timeout=SOON)
    expect(row(staff_page, "svc-short")).not_to_contain_text("unhealthy")
    # when its deadline passes with no heartbeat, then its badge reads unhealthy within a second of it
    deadline = datetime.fromisoformat(body["lease"]["expires_at"].replace("Z", "+00:00"))
    browser_now = staff_page.evaluate("Date.now()") / 1000
    until_deadline_ms = max(0.0, deadline.timestamp() - browser_now) * 1000
    expect(row(staff_page, "svc-short")).to_contain_text("unhealthy", timeout=until_deadline_ms + 1_000)
    assert_not_reloaded(staff_page)


def overview_count(page: Page, name: str) -> int:
    return int(page.locator(f'#conveyor-live [data-count="{name}"]').inner_text())


def api_count(api: httpx.Client, **params: str) -> int:
    response = api.get("/services/", params=params)
    assert response.status_code == 200
    return response.json()["count"]


def test_the_overview_counts_match_the_api_and_follow_changes(staff_page: Page, staff_api: httpx.Client) -> None:
    # given a mixed fleet: healthy, degraded, unknown services of every type, one lapsed, one drained
    register(staff_api, "src-1")
    register(staff_api, "src-2", health="degraded")
    register(staff_api, "tr-1", service_type="transform", health="unknown")
    register(staff_api, "sink-1", service_type="sink")
    register(staff_api, "sink-2", service_type="sink", lease_duration=1)
    assert staff_api.post("/services/sink-1/drain/").status_code == 200
    for member in ("m1", "m2"):
        body = {"member_id": member, "service_name": "c", "topics": ["orders"]}
        assert staff_api.post("/groups/g1/members/", json=body).status_code in (200, 201)
    open_live(staff_page, "/admin/")
    # when the short lease has lapsed (the overview follows it)
    expect(staff_page.locator('#conveyor-live [data-count="lapsed"]')).to_have_text("1", timeout=SOON)
    # then every count is what the API says
    for i, health in enumerate(Health.values):
        assert overview_count(staff_page, f"health-{i}") == api_count(staff_api, health=health), health
    for service_type in ServiceType.values:
        assert overview_count(staff_page, f"services-{service_type}") == api_count(staff_api, type=service_type)
    assert overview_count(staff_page, "services") == api_count(staff_api)
    drained = [s for s in staff_api.get("/services/").json()["results"] if s["drained"]]
    assert overview_count(staff_page, "drained") == len(drained) == 1
    groups = staff_api.get("/groups/").json()
    groups = groups["results"] if isinstance(groups, dict) else groups
    states = [g["state"] for g in groups]
    for state in ("empty", "reconciling", "stable"):
        assert overview_count(staff_page, f"groups-{state}") == states.count(state), state
    # and a registration shows in the counts without a reload
    register(staff_api, "src-3")
    expect(staff_page.locator('#conveyor-live [data-count="services"]')).to_have_text(
        str(api_count(staff_api)), timeout=SOON
    )
    assert_not_reloaded(staff_page)


def test_a_group_page_shows_the_new_generation_after_a_rebalance_through_the_api(
    staff_page: Page, staff_api: httpx.Client
) -> None:
    # given g1 with one member, its page open
    body = {"member_id": "m1", "service_name": "c", "topics": ["orders"]}
    first = staff_api.post("/groups/g1/members/", json=body).json()
    open_live(staff_page, "/admin/groups/servicegroup/g1/change/")
    generation = staff_page.locator("#conveyor-live .field-generation .readonly")
    expect(generation).to_have_text(str(first["generation"]))
    # when a second member joins through the API (a rebalance), then the page shows its generation
    second = staff_api.post("/groups/g1/members/", json={**body, "member_id": "m2"}).json()
    assert second["generation"] > first["generation"]
    expect(generation).to_have_text(str(second["generation"]), timeout=SOON)
    expect(staff_page.locator("#conveyor-live")).to_contain_text("m2", timeout=SOON)
    # and the groups list, open in another tab, follows the member leaving
    listing = staff_page.context.new_page()
    open_live(listing, "/admin/groups/servicegroup/")
    assert staff_api.delete("/groups/g1/members/m2/").status_code == 204
    third = staff_api.get("/groups/g1/").json()["generation"]
    expect(row(listing, "g1")).to_contain_text(str(third), timeout=SOON)
    expect(generation).to_have_text(str(third), timeout=SOON)
    assert_not_reloaded(staff_page)


def test_a_service_page_follows_a_drain_and_says_when_the_service_is_gone(
    staff_page: Page, staff_api: httpx.Client
) -> None:
    register(staff_api, "svc-page")
    open_live(staff_page, "/admin/registry/service/svc-page/change/")
    drained = staff_page.locator("#conveyor-live .field-drained .readonly")
    expect(drained).not_to_contain_text("True")
    assert staff_api.post("/services/svc-page/drain/").status_code == 200
    expect(drained.locator("img[alt=True], :text('True'), :text('yes')").first).to_be_visible(timeout=SOON)
    # once the service is deregistered its page cannot be re-fetched: the banner says so
    assert staff_api.delete("/services/svc-page/").status_code == 204
    expect(staff_page.locator("#conveyor-live-status")).to_contain_text("no longer exists", timeout=SOON)


def test_an_expired_services_history_is_reachable_after_the_row_is_gone(
    staff_page: Page, staff_api: httpx.Client
) -> None:
    register(staff_api, "svc-expiring", lease_duration=1, deregister_after=0)
    # the cleanup job's own function, run here once the lease has lapsed (the test stack runs no beat)
    wait_for(lambda: leases.expire_lapsed(timezone.now() + timedelta(seconds=2)) == ["svc-expiring"], 10)
    staff_page.goto("/admin/registry/service/svc-expiring/change/")  # the old link: the row is gone
    history = staff_page.locator("#result_list")
    expect(history).to_contain_text("svc-expiring")
    expect(history).to_contain_text("expired")
    expect(history).to_contain_text("registered")


def test_the_banner_shows_while_the_socket_is_down_and_goes_after_reconnecting(
    staff_page: Page, staff_api: httpx.Client, registry_server: LiveServer, console: Console
) -> None:
    # the browser reports the refused reconnection attempts and re-fetches as console errors
    console.expect(r"WebSocket connection to .* failed")
    console.expect(r"ERR_CONNECTION_REFUSED|Failed to load resource|Failed to fetch")
    open_live(staff_page, "/admin/registry/service/")
    banner = staff_page.locator("#conveyor-live-status")
    expect(banner).to_be_hidden()
    # when the server's websockets are cut, then the page says so
    registry_server.cut()
    expect(banner).to_be_visible(timeout=SOON)
    expect(banner).to_have_text("live updates paused — reconnecting")
    # when the server is back, then the page reconnects, hides the banner and is live again
    registry_server.restart()
    expect(banner).to_be_hidden(timeout=15_000)
    register(staff_api, "svc-after")
    expect(row(staff_page, "svc-after")).to_have_count(1, timeout=SOON)
    assert_not_reloaded(staff_page)


def admin_pages() -> list[str]:
    """The index, every changelist of the admin and, for each model with a row, the change page of one."""
    pages = ["/admin/"]
    for model in apps.get_models():
        if not admin.site.is_registered(model):
            continue
        opts = model._meta
        pages.append(reverse(f"admin:{opts.app_label}_{opts.model_name}_changelist"))
        first = model._default_manager.order_by("pk").first()
        if first is not None:
            pages.append(reverse(f"admin:{opts.app_label}_{opts.model_name}_change", args=[first.pk]))
    return pages


def test_no_javascript_console_errors_on_any_admin_page(
    staff_page: Page, staff_api: httpx.Client, console: Console
) -> None:
    # given a row of every kind: services, a group with members and history, a topic, tokens
    register(staff_api, "src-1", labels={"team": "ingest", "zone": "a"})
    register(staff_api, "sink-1", service_type="sink", lease_duration=1)
    for member in ("m1", "m2"):
        body = {"member_id": member, "service_name": "c", "topics": ["orders"]}
        assert staff_api.post("/groups/g1/members/", json=body).status_code in (200, 201)
    LeaderTerm.objects.get_or_create(name="periodic-jobs", defaults={"term": 1, "holder": "host:1"})
    pages = admin_pages()
    assert len(pages) > 10
    for path in pages:
        response = staff_page.goto(path)
        assert response is not None and response.status == 200, path
        expect(staff_page.locator("#content")).to_be_visible()
        staff_page.wait_for_load_state("networkidle")
    assert console.unexpected() == [], "JavaScript console errors"


def test_a_burst_of_100_events_costs_a_few_page_fetches_not_100(staff_page: Page, staff_api: httpx.Client) -> None:
    # given 100 services on the open list
    for n in range(100):
        register(staff_api, f"svc-{n:03}")
    open_live(staff_page, "/admin/registry/service/")
    expect(staff_page.locator("#result_list tbody tr")).to_have_count(100, timeout=SOON)
    fetches: list[str] = []
    pending: set[Any] = set()  # re-fetches started since here and not finished
    most_pending = [0]

    def started(request: Any) -> None:
        if request.resource_type == "fetch":
            fetches.append(request.url)
            pending.add(request)
            most_pending[0] = max(most_pending[0], len(pending))

    def ended(request: Any) -> None:
        pending.discard(request)

    staff_page.on("request", started)
    staff_page.on("requestfinished", ended)
    staff_page.on("requestfailed", ended)
    # when another tab drains all 100 at once (one action: 100 service.updated events in a burst)
    other = staff_page.context.new_page()
    other.goto("/admin/registry/service/")
    other.check("#action-toggle")
    other.select_option("select[name=action]", "drain")
    other.click("button[name=index]")
    expect(other.locator(".messagelist")).to_contain_text("Drained 100 service(s)")
    # then the open list shows every one drained, having re-fetched itself a few times only
    expect(staff_page.locator("#result_list tbody tr", has_text="drained")).to_have_count(100, timeout=15_000)
    assert most_pending == [1], "more than one re-fetch in flight at once"
    # one per event would be 100; coalesced it is a handful (4 on an idle machine), more only if the
    # events trickle in over seconds on a loaded one
    assert 1 <= len(fetches) <= 25, fetches
    assert_not_reloaded(staff_page)


def test_select_all_still_selects_every_row_after_a_live_refresh(staff_page: Page, staff_api: httpx.Client) -> None:
    # given an open list that has refreshed itself once (its rows and select-all box are new elements)
    for n in range(3):
        register(staff_api, f"svc-{n}")
    open_live(staff_page, "/admin/registry/service/")
    register(staff_api, "svc-3")
    expect(staff_page.locator("#result_list tbody tr")).to_have_count(4, timeout=SOON)
    assert_not_reloaded(staff_page)
    # when the operator ticks select-all and runs an action
    staff_page.check("#action-toggle")
    expect(staff_page.locator("#result_list input.action-select:checked")).to_have_count(4)
    staff_page.select_option("select[name=action]", "drain")
    staff_page.click("button[name=index]")
    # then it ran on every row
    expect(staff_page.locator(".messagelist")).to_contain_text("Drained 4 service(s)")
