"""Figures of the live admin, printed:

1. time from a change made through the API to the open admin page showing it (median, p99 over 50
   changes), in Chromium driven by Playwright;
2. the overview page's server time with 10,000 services and 100 groups;
3. the number of queries each admin page makes with 10,000 services (the index, every changelist, a
   change page of each model), with Django's test client and CaptureQueriesContext;

and screenshots of the overview, the services list and a group page (1440x900) to docs/screenshots/.

    .venv/bin/python bench/admin_live.py [--changes 50] [--services 10000] [--groups 100] [--no-screenshots]

Starts its own stack (embedded Redis, SQLite or DATABASE_URL, one uvicorn worker). Needs /usr/bin/chromium.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import BASE, Stack, percentile

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
PASSWORD = "bench-operator-pw"
SHOTS = BASE / "docs" / "screenshots"
TYPES = ("source", "transform", "sink")


def service(n: int, **overrides: Any) -> dict[str, Any]:
    body = {
        "service_id": f"{TYPES[n % 3]}-{n}",
        "service_name": ["kafka-source", "enricher", "pg-sink", "s3-sink", "dedup"][n % 5],
        "service_type": TYPES[n % 3],
        "endpoint": f"10.0.{n // 250 % 250}.{n % 250 + 1}:{50051 + n % 7}",
        "labels": {"env": "prod" if n % 4 else "staging", "zone": "abc"[n % 3], "team": ["ingest", "core"][n % 2]},
        "lease_duration": 3600,
        "deregister_after": 86400,
    }
    body.update(overrides)
    return body


def seed_small_fleet(api: httpx.Client) -> None:
    """30 services (some degraded, one unknown, two drained, three on short leases that lapse) and two
    consumer groups, one of them mid-rebalance: what an on-call operator sees."""
    for n in range(30):
        extra: dict[str, Any] = {}
        if n in (4, 11):
            extra["health"] = "degraded"
        if n == 17:
            extra["health"] = "unknown"
        if n in (7, 20, 25):
            extra["lease_duration"] = 2
        if n % 6 == 0:
            extra["group_id"] = "billing"
        assert api.post("/services/", json=service(n, **extra)).status_code in (200, 201)
    for service_id in ("transform-13", "sink-14"):
        assert api.post(f"/services/{service_id}/drain/").status_code == 200
    api.put("/topics/orders/", json={"partitions": 24})
    api.put("/topics/payments/", json={"partitions": 12})
    for member, topics in (("billing-1", ["orders", "payments"]), ("billing-2", ["orders", "payments"])):
        api.post("/groups/billing/members/", json={"member_id": member, "service_name": "biller", "topics": topics})
    joined = {}
    for member in ("audit-1", "audit-2", "audit-3"):
        body = {"member_id": member, "service_name": "auditor", "topics": ["orders"]}
        joined[member] = api.post("/groups/audit/members/", json=body).json()
    # billing-1 confirms its generation: billing settles; audit stays reconciling (nobody confirmed)
    first = api.get("/groups/billing/members/billing-1/").json()
    api.post(
        "/groups/billing/members/billing-1/heartbeat/",
        json={"generation": first["generation"], "member_epoch": first["member_epoch"]},
    )


def seed_bulk(services: int, groups: int, api: httpx.Client) -> None:
    """Up to ``services`` services (in-process, through registry.leases.register: database and lease
    store alike; 2% lapsed) and ``groups`` groups of three members (through the API)."""
    from django.db import transaction
    from django.utils import timezone

    from registry import leases
    from registry.models import ApiToken, Service

    token = ApiToken.objects.filter(is_staff=True).first()
    have = Service.objects.count()
    start = time.perf_counter()
    with transaction.atomic():
        for n in range(1000, 1000 + services - have):
            extra = {"lease_duration": 1} if n % 50 == 0 else {}
            leases.register(service(n, **extra), token, timezone.now())
    print(f"  seeded {services - have} services in {time.perf_counter() - start:.1f} s")
    start = time.perf_counter()
    for g in range(groups):
        for m in range(3):
            body = {"member_id": f"c{g}-{m}", "service_name": "consumer", "topics": ["orders"]}
            api.post(f"/groups/bulk-{g:03}/members/", json=body)
    print(f"  seeded {groups} groups in {time.perf_counter() - start:.1f} s")


def login(page: Any, base: str) -> None:
    page.goto(base + "/admin/login/?next=/admin/")
    page.fill("#id_username", "operator")
    page.fill("#id_password", PASSWORD)
    page.click("input[type=submit]")
    page.wait_for_url("**/admin/")


def wait_live(page: Any) -> None:
    page.wait_for_selector("html[data-conveyor-live=open]", timeout=10_000)


def screenshots(page: Any, base: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    for name, path in (
        ("overview", "/admin/"),
        ("services", "/admin/registry/service/"),
        ("group", "/admin/groups/servicegroup/audit/change/"),
    ):
        page.goto(base + path)
        wait_live(page)
        if name == "group":  # the members and their partitions, below the owner and grants
            page.locator(".field-members_table").first.evaluate("el => el.scrollIntoView({block: 'center'})")
        time.sleep(1.2)  # the deadlines have ticked once
        page.screenshot(path=str(SHOTS / f"{name}.png"))
        print(f"  docs/screenshots/{name}.png")


# Stamps, in the page, the moment the expected id first shows in the services table (window.__shownAt).
WATCH_JS = """
(id) => {
  window.__shownAt = null;
  const seen = () => {
    const table = document.getElementById("result_list");
    return table !== null && table.textContent.includes(id);
  };
  const observer = new MutationObserver(() => {
    if (window.__shownAt === null && seen()) { window.__shownAt = Date.now(); observer.disconnect(); }
  });
  observer.observe(document.body, { childList: true, subtree: true });
}
"""


def change_to_page(page: Any, base: str, api: httpx.Client, changes: int) -> list[float]:
    """Milliseconds from just before each registration's POST to the open list showing the new row."""
    page.goto(base + "/admin/registry/service/?service_name=latency-probe")
    wait_live(page)
    delays = []
    for n in range(changes):
        service_id = f"probe-{n:03}"
        time.sleep(0.3)  # let the previous change's trailing re-fetch finish: each change starts idle
        page.evaluate(WATCH_JS, service_id)
        t0 = time.time() * 1000
        body = service(n, service_id=service_id, service_name="latency-probe")
        assert api.post("/services/", json=body).is_success
        page.wait_for_function("() => window.__shownAt !== null", timeout=10_000)
        delays.append(page.evaluate("window.__shownAt") - t0)
    return delays


def overview_server_time(base: str, rounds: int = 20) -> list[float]:
    """Milliseconds per GET /admin/ (the overview), logged in, over loopback."""
    with httpx.Client(base_url=base, timeout=60) as client:
        client.get("/admin/login/")
        csrf = client.cookies["csrftoken"]
        client.post(
            "/admin/login/?next=/admin/",
            data={"username": "operator", "password": PASSWORD, "csrfmiddlewaretoken": csrf, "next": "/admin/"},
            headers={"Referer": base + "/admin/login/"},
        )
        assert client.get("/admin/").status_code == 200
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            response = client.get("/admin/")
            times.append((time.perf_counter() - start) * 1000)
            assert response.status_code == 200 and "conveyor-live" in response.text
    return times


def queries_per_page() -> list[tuple[str, int, int]]:
    """(page, queries, status) for the index, every changelist and a change page of each model."""
    from django.apps import apps
    from django.contrib import admin
    from django.contrib.auth.models import User
    from django.db import connection
    from django.test import Client
    from django.test.utils import CaptureQueriesContext
    from django.urls import reverse

    client = Client()
    client.force_login(User.objects.get(username="operator"))
    pages = ["/admin/"]
    for model in apps.get_models():
        if not admin.site.is_registered(model):
            continue
        opts = model._meta
        pages.append(reverse(f"admin:{opts.app_label}_{opts.model_name}_changelist"))
        first = model._default_manager.order_by("pk").first()
        if first is not None:
            pages.append(reverse(f"admin:{opts.app_label}_{opts.model_name}_change", args=[first.pk]))
    rows = []
    for path in pages:
        client.get(path)  # warm caches (content types, sessions) so the count is the page's own
        with CaptureQueriesContext(connection) as captured:
            response = client.get(path)
        rows.append((path, len(captured), response.status_code))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--changes", type=int, default=50)
    parser.add_argument("--services", type=int, default=10_000)
    parser.add_argument("--groups", type=int, default=100)
    parser.add_argument("--no-screenshots", action="store_true")
    args = parser.parse_args()
    if not os.access(CHROMIUM, os.X_OK):
        sys.exit(f"no Chromium at {CHROMIUM}: apt-get install -y chromium (or set CHROMIUM)")
    from playwright.sync_api import sync_playwright

    with Stack(workers=1) as stack:
        stack.env["DJANGO_SUPERUSER_PASSWORD"] = PASSWORD
        stack.manage("createsuperuser", "--noinput", "--username", "operator", "--email", "op@example.com")
        # This process reads the stack's database and Redis directly (seeding, query counts).
        os.environ.update({k: v for k, v in stack.env.items() if k in ("DATABASE_URL", "REDIS_URL", "SECRET_KEY")})
        os.environ.update(
            REGISTRY_VAR_DIR=stack.env["REGISTRY_VAR_DIR"], DJANGO_SETTINGS_MODULE="registry_project.settings"
        )
        import django

        django.setup()
        logging.getLogger("httpx").setLevel(logging.WARNING)
        api = httpx.Client(
            base_url=stack.url + "/api/v1", headers={"Authorization": f"Bearer {stack.token}"}, timeout=30
        )
        print("== fleet: 30 services, 2 groups")
        seed_small_fleet(api)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1440, "height": 900})
            login(page, stack.url)
            if not args.no_screenshots:
                time.sleep(2.5)  # the short leases have lapsed
                print("== screenshots (1440x900)")
                screenshots(page, stack.url)
            print(f"== API change -> open services list shows it ({args.changes} registrations, Chromium)")
            delays = change_to_page(page, stack.url, api, args.changes)
            print(
                f"  median {statistics.median(delays):.0f} ms, p99 {percentile(delays, 99):.0f} ms, "
                f"min {min(delays):.0f} ms, max {max(delays):.0f} ms"
            )
            browser.close()
        print(f"== {args.services} services, {args.groups} groups")
        seed_bulk(args.services, args.groups, api)
        os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"  # playwright's loop is gone; nothing async runs here
        times = overview_server_time(stack.url)
        print(
            f"== overview (GET /admin/) server time over loopback, 20 requests: median "
            f"{statistics.median(times):.0f} ms, p99 {percentile(times, 99):.0f} ms"
        )
        from registry import dashboard

        runs = []
        for _ in range(10):
            start = time.perf_counter()
            o = dashboard.overview()
            runs.append((time.perf_counter() - start) * 1000)
        print(
            f"  dashboard.overview() in this process, 10 calls: median {statistics.median(runs):.0f} ms "
            f"({o.services_total.count} services, {o.lapsed.count} lapsed, {o.groups_total.count} groups)"
        )
        print(f"== queries per admin page with {args.services} services (Django test client)")
        for path, queries, status in queries_per_page():
            print(f"  {queries:4d}  {path}" + ("" if status == 200 else f"  (HTTP {status})"))


if __name__ == "__main__":
    main()
