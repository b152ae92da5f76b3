"""The select endpoint's cached instance lists stay exact: once a change commits, no server process answers
from the list as it was (drain, weight, reported health, deregistration, a lapsed lease), and a mass lapse
on SQLite builds no SQL list of lapsed ids."""

from __future__ import annotations

import sqlite3
import time
from collections import Counter
from datetime import UTC, datetime, timedelta

import httpx
import pytest
import time_machine
from django.db import connection

from balancer import selection
from registry import lease_store, leases
from registry.models import Service
from registry.redis_client import get_redis
from tests.conftest import asgi_request, client_for, service_body

SELECT = "/api/v1/balancer/select/?name=sink"


def register(api, sid: str, **extra) -> None:
    response = api.post("/api/v1/services/", service_body(sid, service_name="sink", **extra), format="json")
    assert response.status_code in (200, 201), response.content


def picks(clients: list[httpx.Client], query: str = "", n: int = 12) -> list[str]:
    chosen = []
    for i in range(n):
        response = clients[i % len(clients)].get(SELECT + query)
        assert response.status_code == 200, response.text
        chosen.append(response.json()["service_id"])
    return chosen


@pytest.mark.django_db(transaction=True)
def test_no_process_answers_from_a_list_a_committed_change_made_stale(servers, owner):
    # given: two server processes that have both cached the list of "sink"
    api = client_for(owner[1])
    for sid in ("a", "b", "c", "d"):
        register(api, sid, weight=1)
    clients = [httpx.Client(base_url=url, headers={"Authorization": f"Bearer {owner[1]}"}) for url in servers]
    assert set(picks(clients)) == {"a", "b", "c", "d"}

    # a drain: b is never chosen again, by either process
    leases.drain(["b"])
    assert set(picks(clients)) == {"a", "c", "d"}

    # a weight change: the weighted schedule starts again for the new pool, on both processes alike
    leases.set_operator_weight(["a"], 5)
    assert Counter(picks(clients, "&strategy=weighted", 7)) == {"a": 5, "c": 1, "d": 1}

    # a reported health change: a degraded instance waits while healthy ones exist
    assert api.post("/api/v1/services/c/heartbeat/", {"health": "degraded"}, format="json").status_code == 200
    assert set(picks(clients)) == {"a", "d"}

    # a deregistration
    assert api.delete("/api/v1/services/a/").status_code == 204
    assert set(picks(clients)) == {"d"}

    # a lapsed lease (no event announces it): d is never chosen once its deadline passed; c, degraded, is
    register(api, "d", weight=1, lease_duration=1)
    assert set(picks(clients)) == {"d"}
    deadline = lease_store.deadlines(get_redis(), ["d"])["d"] / 1000
    time.sleep(max(0.0, deadline - time.time()) + 0.05)
    assert set(picks(clients)) == {"c"}

    # and a heartbeat brings d back, healthy, ahead of c
    assert api.post("/api/v1/services/d/heartbeat/", format="json").status_code == 200
    assert set(picks(clients)) == {"d"}

    # a re-registration that changes the endpoint answers with the new one at once
    register(api, "d", endpoint="10.9.9.9:1", lease_duration=30)
    assert {c.get(SELECT).json()["endpoint"] for c in clients} == {"10.9.9.9:1"}


@pytest.mark.django_db
@pytest.mark.parametrize("via", ["drf", "asgi"])
def test_weight_and_labels_changed_by_reregistration_are_seen_at_once(owner, via):
    api = client_for(owner[1])

    def get(query: str):
        path = SELECT + query
        if via == "drf":
            return api.get(path)
        return asgi_request("GET", path, headers={"Authorization": f"Bearer {owner[1]}"})

    register(api, "a", labels={"zone": "x"}, weight=1)
    register(api, "b", labels={"zone": "x"}, weight=1)
    assert {get("&selector=zone=x").json()["service_id"] for _ in range(4)} == {"a", "b"}
    register(api, "b", labels={"zone": "y"}, weight=1)
    assert {get("&selector=zone=x").json()["service_id"] for _ in range(4)} == {"a"}
    register(api, "a", labels={"zone": "x"}, weight=0)
    response = get("&selector=zone=x")
    assert response.status_code == 503
    assert response.json() == {"detail": f"sink: {selection.NO_INSTANCE}", "name": "sink"}


@pytest.fixture
def sqlite_variable_limit():
    """SQLite as most builds ship it: at most 32,766 variables in one statement (this one may allow more)."""
    if connection.vendor != "sqlite":
        yield
        return
    connection.ensure_connection()
    raw = connection.connection
    before = raw.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
    raw.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 32766)
    yield
    raw.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, before)


@pytest.mark.django_db
@pytest.mark.parametrize("via", ["drf", "asgi"])
def test_select_during_a_mass_lapse_builds_no_list_of_lapsed_ids(owner, via, sqlite_variable_limit):
    # given: 40,000 lapsed leases in the lease store (more than SQLite takes as SQL variables), 2,000 of them
    # instances of this name, and one live instance
    api = client_for(owner[1])
    t0 = datetime(2026, 9, 1, tzinfo=UTC)
    with time_machine.travel(t0, tick=False) as clock:
        register(api, "live", lease_duration=3600)
        past = t0 - timedelta(seconds=5)
        rows = [
            Service(
                service_id=f"gone-{n}",
                service_name="sink",
                service_type="sink",
                endpoint="10.0.0.1:1",
                lease_duration=1,
                deregister_after=3600,
                registered_at=past,
                lease_expires_at=past,
            )
            for n in range(2000)
        ]
        Service.objects.bulk_create(rows, batch_size=2000)
        r = get_redis()
        past_ms = lease_store.to_ms(past)
        pipe = r.pipeline(transaction=False)
        ids = [s.service_id for s in rows] + [f"elsewhere-{n}" for n in range(38_000)]
        for start in range(0, len(ids), 5000):
            pipe.zadd(lease_store.keys().deadline, dict.fromkeys(ids[start : start + 5000], past_ms))
        pipe.execute()
        assert len(leases.lapsed_ids(t0)) == 40_000
        register(api, "live", lease_duration=3600)  # announces a change of "sink": lists reload
        clock.move_to(t0 + timedelta(seconds=1))

        def get():
            if via == "drf":
                return api.get(SELECT)
            return asgi_request("GET", SELECT, headers={"Authorization": f"Bearer {owner[1]}"})

        # when / then: the live instance, every time, and none of the lapsed ones
        for _ in range(3):
            response = get()
            assert response.status_code == 200, response.content
            assert response.json()["service_id"] == "live"


@pytest.mark.django_db
def test_the_fast_path_answers_with_the_views_body(owner):
    # given: an instance with every field set, an operator's weight among them
    api = client_for(owner[1])
    register(api, "a", labels={"zone": "x", "tier": "gold"}, group_id="g1", lease_duration=40, deregister_after=7)
    leases.set_operator_weight(["a"], 7)
    assert api.post("/api/v1/services/a/heartbeat/", {"health": "degraded"}, format="json").status_code == 200
    # when: both front doors select it
    view = api.get(SELECT)
    fast = asgi_request("GET", SELECT, headers={"Authorization": f"Bearer {owner[1]}"})
    # then: the same JSON, and the fast path answered (Django would have added its headers)
    assert fast.status_code == view.status_code == 200
    assert fast.json() == view.json()
    assert fast.json()["operator_weight"] == 7 and fast.json()["health"] == "degraded"
    assert "vary" not in fast.headers and "Vary" in view.headers


@pytest.mark.django_db
@pytest.mark.parametrize("via", ["drf", "asgi"])
def test_an_instance_reregistered_under_another_name_leaves_its_old_names_list(owner, via):
    api = client_for(owner[1])

    def get(name: str):
        path = f"/api/v1/balancer/select/?name={name}"
        if via == "drf":
            return api.get(path)
        return asgi_request("GET", path, headers={"Authorization": f"Bearer {owner[1]}"})

    register(api, "a")
    register(api, "b")
    assert {get("sink").json()["service_id"] for _ in range(4)} == {"a", "b"}
    assert api.post("/api/v1/services/", service_body("b", service_name="source"), format="json").status_code == 200
    assert {get("sink").json()["service_id"] for _ in range(4)} == {"a"}
    assert get("source").json()["service_id"] == "b"
