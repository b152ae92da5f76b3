"""The operators' admin: changelist with live health, service page, deregister and drain, tokens."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import time_machine

from registry import lease_store
from registry.models import ApiToken, Service, ServiceEvent, ServiceEventKind
from registry.redis_client import get_redis
from tests.conftest import service_body

pytestmark = pytest.mark.django_db

T0 = datetime(2026, 7, 1, 9, 0, 0, tzinfo=UTC)


@pytest.fixture
def three_services(api):
    with time_machine.travel(T0, tick=False):
        api.post("/api/v1/services/", service_body("src-1", lease_duration=30), format="json")
        api.post(
            "/api/v1/services/",
            service_body(
                "sink-1", service_type="sink", service_name="pg-sink", labels={"team": "ingest"}, group_id="g1"
            ),
            format="json",
        )
        api.post("/api/v1/services/", service_body("src-2", lease_duration=10, health="degraded"), format="json")


def test_changelist_shows_effective_health_badges_and_time_left(operator, three_services):
    with time_machine.travel(T0 + timedelta(seconds=12), tick=False):
        html = operator.get("/admin/registry/service/").content.decode()
    assert html.count(">healthy</span>") == 2
    # src-2's 10 s lease lapsed; it reported degraded
    assert 'title="lease lapsed (it last reported degraded)">unhealthy</span>' in html
    assert 'data-deadline="2026-07-01T09:00:30Z" title="deadline 2026-07-01 09:00:30 UTC">18 s left</span>' in html
    assert '>lapsed 2 s ago</span><span class="conveyor-muted conveyor-tail">removal in 58 s</span>' in html


def test_changelist_filters_by_effective_health_type_name_and_group(operator, three_services):
    with time_machine.travel(T0 + timedelta(seconds=12), tick=False):

        def ids(query: str) -> set[str]:
            response = operator.get(f"/admin/registry/service/?{query}")
            assert response.status_code == 200
            return {s.service_id for s in response.context["cl"].result_list}

        assert ids("health=unhealthy") == {"src-2"}
        assert ids("health=healthy") == {"src-1", "sink-1"}
        assert ids("health=degraded") == set()
        assert ids("service_type__exact=sink") == {"sink-1"}
        assert ids("service_name=pg-sink") == {"sink-1"}
        assert ids("group_id=g1") == {"sink-1"}


def test_changelist_search_by_id_endpoint_label_and_selector(operator, three_services):
    def ids(term: str) -> set[str]:
        return {s.service_id for s in operator.get("/admin/registry/service/", {"q": term}).context["cl"].result_list}

    assert ids("sink-1") == {"sink-1"}
    assert ids("10.0.0.1") == {"src-1", "sink-1", "src-2"}
    assert ids("ingest") == {"sink-1"}
    assert ids("team=ingest") == {"sink-1"}
    assert ids("env=prod,zone=a") == {"src-1", "src-2"}


def test_service_page_renders_read_only_lease_and_saves_operator_weight(operator, three_services):
    with time_machine.travel(T0 + timedelta(seconds=5), tick=False):
        page = operator.get("/admin/registry/service/src-1/change/")
        assert page.status_code == 200
        html = page.content.decode()
        assert "25 s left" in html
        assert 'name="operator_weight"' in html
        assert 'name="lease_duration"' not in html  # read-only
        assert 'name="weight"' not in html  # the weight in effect is derived
        assert "env=prod, zone=a" in html
        response = operator.post("/admin/registry/service/src-1/change/", {"operator_weight": "0", "_save": "Save"})
    assert response.status_code == 302
    service = Service.objects.get(pk="src-1")
    assert (service.weight, service.operator_weight, service.registered_weight) == (0, 0, 100)


def test_deregister_action_removes_row_and_lease(operator, three_services):
    response = operator.post(
        "/admin/registry/service/",
        {"action": "deregister", "_selected_action": ["src-1", "src-2"], "post": "yes"},
        follow=True,
    )
    assert "Deregistered 2 service(s)." in response.content.decode()
    assert list(Service.objects.values_list("pk", flat=True)) == ["sink-1"]
    assert lease_store.deadlines(get_redis(), ["src-1", "src-2", "sink-1"]).keys() == {"sink-1"}


def test_the_delete_page_deregisters_with_the_lease_history_and_events(operator, api, three_services):
    listed = api.get("/api/v1/services/?selector=team=ingest").json()  # remembered by the list
    assert [s["service_id"] for s in listed["results"]] == ["sink-1"]
    assert operator.get("/admin/registry/service/sink-1/delete/").status_code == 200
    response = operator.post("/admin/registry/service/sink-1/delete/", {"post": "yes"})
    assert response.status_code == 302
    assert not Service.objects.filter(pk="sink-1").exists()
    assert "sink-1" not in lease_store.deadlines(get_redis(), ["sink-1"])
    assert ServiceEvent.objects.filter(service_id="sink-1", kind=ServiceEventKind.DEREGISTERED).exists()
    assert api.get("/api/v1/services/?selector=team=ingest").json()["count"] == 0  # not remembered past it


def test_drain_action_sets_weight_zero(operator, three_services):
    response = operator.post(
        "/admin/registry/service/", {"action": "drain", "_selected_action": ["sink-1"]}, follow=True
    )
    assert "Drained 1 service(s)" in response.content.decode()
    assert dict(Service.objects.values_list("pk", "weight")) == {"src-1": 100, "sink-1": 0, "src-2": 100}


def test_services_are_not_added_by_hand(operator):
    assert operator.get("/admin/registry/service/add/").status_code == 403


def test_token_created_in_the_admin_shows_its_key_once(operator):
    response = operator.post("/admin/registry/apitoken/add/", {"name": "etl-team", "is_active": "on"}, follow=True)
    html = response.content.decode()
    assert "Its key, shown only this once: cr_" in html
    key = html.split("shown only this once: ")[1].split("<")[0].strip()
    token = ApiToken.objects.get(name="etl-team")
    from registry.models import hash_token

    assert token.key_hash == hash_token(key)
    assert operator.get("/admin/registry/apitoken/").status_code == 200
