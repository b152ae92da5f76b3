"""The admin overview (registry.dashboard) and the staff stream /ws/admin/ (registry.admin_stream)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import time_machine
from asgiref.sync import async_to_sync
from channels.testing.websocket import WebsocketCommunicator
from django.contrib.auth.models import User
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext, override_settings

from groups.models import RebalanceEvent, ServiceGroup
from registry import dashboard, leases
from registry.models import LeaderTerm, Service
from registry_project.asgi import application
from tests.conftest import service_body

T0 = datetime(2026, 7, 1, 9, 0, 0, tzinfo=UTC)


def register(api: Any, service_id: str, **overrides: Any) -> None:
    response = api.post("/api/v1/services/", service_body(service_id, **overrides), format="json")
    assert response.status_code in (200, 201), response.content


@pytest.fixture
def fleet(api: Any) -> None:
    """At T0: two healthy sources (one with a 10 s lease), a degraded transform, a drained sink."""
    with time_machine.travel(T0, tick=False):
        register(api, "src-1")
        register(api, "src-2", lease_duration=10)
        register(api, "tr-1", service_type="transform", health="degraded", lease_duration=10)
        register(api, "sink-1", service_type="sink")
    assert leases.drain(["sink-1"]) == 1


def changelist_count(operator: Client, url: str) -> int:
    response = operator.get(url)
    assert response.status_code == 200, url
    return response.context["cl"].result_count


@pytest.mark.django_db
def test_overview_counts_effective_health_lapsed_and_drained(operator: Client, fleet: None) -> None:
    # given src-2 and tr-1 lapsed 2 s ago (10 s leases) when the overview is read at T0 + 12 s
    with time_machine.travel(T0 + timedelta(seconds=12), tick=False):
        o = dashboard.overview()
    # then both read as unhealthy, whatever they reported, and are counted as lapsed
    by_type = {
        t: {h: c.count for h, c in zip(o.health_columns, cells, strict=True)} for t, cells, _ in o.services_by_type
    }
    assert by_type["source"] == {"healthy": 1, "degraded": 0, "unhealthy": 1, "unknown": 0}
    assert by_type["transform"] == {"healthy": 0, "degraded": 0, "unhealthy": 1, "unknown": 0}
    assert by_type["sink"] == {"healthy": 1, "degraded": 0, "unhealthy": 0, "unknown": 0}
    assert (o.services_total.count, o.lapsed.count, o.drained.count) == (4, 2, 1)


@pytest.mark.django_db
def test_every_overview_number_links_to_a_list_of_that_many(operator: Client, fleet: None) -> None:
    with time_machine.travel(T0 + timedelta(seconds=12), tick=False):
        o = dashboard.overview()
        cells = [c for _t, row, total in o.services_by_type for c in [*row, total]]
        cells += [*o.health_totals, o.services_total, o.lapsed, o.drained, o.groups_total, o.stuck]
        cells += [c for _s, c in o.groups_by_state]
        cells += [o.rebalances_last_hour, o.member_expiries_last_hour]
        for cell in cells:
            assert changelist_count(operator, cell.url) == cell.count, cell.url


@pytest.mark.django_db
@override_settings(REGISTRY_RECONCILING_ALERT_SECONDS=30)
def test_a_group_reconciling_longer_than_the_threshold_is_flagged(operator: Client, api: Any) -> None:
    # given g1 reconciling since a join at T0 (m1 still owns what goes to m2), and g2 stable
    with time_machine.travel(T0, tick=False):
        api.put("/api/v1/topics/orders/", {"partitions": 4}, format="json")
        for group, members in (("g1", ("m1", "m2")), ("g2", ("m3",))):
            for member in members:
                body = {"member_id": member, "service_name": "c", "topics": ["orders"]}
                assert api.post(f"/api/v1/groups/{group}/members/", body, format="json").status_code in (200, 201)
    assert ServiceGroup.objects.get(pk="g1").state == "reconciling"
    assert RebalanceEvent.objects.filter(group_id="g1").count() == 2
    # when read 20 s later it is not flagged yet, 31 s later it is
    with time_machine.travel(T0 + timedelta(seconds=20), tick=False):
        assert dashboard.overview().stuck.count == 0
    with time_machine.travel(T0 + timedelta(seconds=31), tick=False):
        o = dashboard.overview()
        assert o.stuck.count == 1
        assert [gid for gid, _url, _since in o.stuck_shown] == ["g1"]
        assert changelist_count(operator, o.stuck.url) == 1
        html = operator.get("/admin/").content.decode()
    assert "reconciling longer than 30 s" in html
    assert '<li><a href="/admin/groups/servicegroup/g1/change/">g1</a> reconciling since' in html
    assert {s: c.count for s, c in o.groups_by_state} == {"empty": 0, "reconciling": 1, "stable": 1}
    assert o.rebalances_last_hour.count == 3


@pytest.mark.django_db
def test_index_shows_the_leader_and_its_term(operator: Client) -> None:
    LeaderTerm.objects.create(name="periodic-jobs", term=7, holder="host-a:123", expires_at=T0 + timedelta(seconds=8))
    with time_machine.travel(T0, tick=False):
        html = operator.get("/admin/").content.decode()
    assert 'data-count="leader-holder">host-a:123</a>' in html
    assert 'data-count="leader-term">7</a>' in html
    assert 'data-deadline="2026-07-01T09:00:08Z"' in html
    assert 'src="/static/conveyor/live.js"' in html


@pytest.mark.django_db
def test_the_index_makes_the_same_number_of_queries_for_3_or_30_services(operator: Client, api: Any) -> None:
    def queries() -> int:
        with CaptureQueriesContext(connection) as captured:
            assert operator.get("/admin/").status_code == 200
        return len(captured)

    for n in range(3):
        register(api, f"s-{n}")
    few = queries()
    for n in range(3, 30):
        register(api, f"s-{n}", lease_duration=1 + n % 2)  # some of them lapse
    assert queries() == few
    assert Service.objects.count() == 30


@pytest.mark.django_db
def test_live_pages_include_the_live_script(operator: Client, fleet: None) -> None:
    for url in (
        "/admin/registry/service/",
        "/admin/registry/service/src-1/change/",
        "/admin/groups/servicegroup/",
    ):
        assert 'src="/static/conveyor/live.js"' in operator.get(url).content.decode(), url
    page = operator.get("/admin/registry/service/src-1/change/").content.decode()
    assert '<div id="conveyor-live">' in page


# The staff stream, through the project's whole ASGI application and the real Redis channel layer.


def session_headers(client: Client) -> list[tuple[bytes, bytes]]:
    cookie = f"sessionid={client.cookies['sessionid'].value}"
    return [(b"cookie", cookie.encode()), (b"origin", b"http://127.0.0.1:8000")]


@pytest.mark.django_db(transaction=True)
def test_admin_stream_forwards_service_and_group_events_to_staff(api: Any) -> None:
    staff = Client()
    staff.force_login(User.objects.create_superuser("op", "op@example.com", "pw-for-tests-only"))

    async def scenario() -> None:
        socket = WebsocketCommunicator(application, "/ws/admin/", headers=session_headers(staff))
        ok, _ = await socket.connect(timeout=5)
        assert ok
        assert await socket.receive_json_from(timeout=5) == {"type": "hello"}
        await call(register, api, "svc-9")
        event = await socket.receive_json_from(timeout=5)
        assert (event["type"], event["service_id"]) == ("service.registered", "svc-9")
        body = {"member_id": "m1", "service_name": "c", "topics": ["orders"]}
        await call(api.post, "/api/v1/groups/g7/members/", body, format="json")
        event = await socket.receive_json_from(timeout=5)
        assert (event["type"], event["group_id"]) == ("group.assignment", "g7")
        await socket.disconnect()

    async_to_sync(scenario)()


@pytest.mark.django_db(transaction=True)
def test_admin_stream_announces_a_lease_as_it_lapses(api: Any) -> None:
    staff = Client()
    staff.force_login(User.objects.create_superuser("op", "op@example.com", "pw-for-tests-only"))

    async def scenario() -> None:
        socket = WebsocketCommunicator(application, "/ws/admin/", headers=session_headers(staff))
        ok, _ = await socket.connect(timeout=5)
        assert ok
        assert (await socket.receive_json_from(timeout=5))["type"] == "hello"
        await call(register, api, "short", lease_duration=1)
        assert (await socket.receive_json_from(timeout=5))["type"] == "service.registered"
        event = await socket.receive_json_from(timeout=5)
        assert event == {"type": "service.lapsed", "service_ids": ["short"], "count": 1}
        await socket.disconnect()

    async_to_sync(scenario)()


@pytest.mark.django_db(transaction=True)
def test_admin_stream_refuses_anonymous_and_non_staff_users() -> None:
    clerk = Client()
    clerk.force_login(User.objects.create_user("clerk", "c@example.com", "pw-for-tests-only"))

    async def scenario() -> None:
        for headers, code in (([(b"origin", b"http://127.0.0.1:8000")], 4401), (session_headers(clerk), 4403)):
            socket = WebsocketCommunicator(application, "/ws/admin/", headers=headers)
            ok, _ = await socket.connect(timeout=5)
            assert ok
            assert await socket.receive_output(timeout=5) == {"type": "websocket.close", "code": code}

    async_to_sync(scenario)()


async def call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """A blocking call (a REST request) off the event loop, closing the thread's connection after."""
    from asgiref.sync import sync_to_async

    def in_thread() -> Any:
        try:
            return fn(*args, **kwargs)
        finally:
            connection.close()

    return await sync_to_async(in_thread, thread_sensitive=False)()
