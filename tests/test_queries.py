"""Reads over many services: the list's filters, /metrics, the admin list and overview stay exact and
work during a mass lapse (the lapsed ids reach SQL as one parameter, registry.id_sets); a lapsed lease
reads unhealthy in each of them the moment it lapses; and the list answers what DRF's generic
serializer would, in a fixed number of queries."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import time_machine
from django.db import connection
from django.test.utils import CaptureQueriesContext
from rest_framework import serializers

from registry import dashboard, lease_store, leases, metrics
from registry.admin import ServiceAdmin
from registry.id_sets import InIdSet
from registry.models import ApiToken, Health, Service
from registry.redis_client import get_redis
from registry.serializers import ServiceSerializer
from tests.conftest import service_body

pytestmark = pytest.mark.django_db

T0 = datetime(2026, 7, 1, 9, 0, 0, tzinfo=UTC)
SERVICES = "/admin/registry/service/"
MASS = 40_000  # past SQLite's 32,766 SQL variables: an IN list of every lapsed id fails there


def register(api: Any, service_id: str, **overrides: Any) -> None:
    response = api.post("/api/v1/services/", service_body(service_id, **overrides), format="json")
    assert response.status_code in (200, 201), response.content


def seed_fleet(n: int, owner: ApiToken, now: datetime, lapsed: bool) -> None:
    """``n`` services written straight to the database and the lease store (as registering them would),
    their leases lapsed a minute before ``now`` when ``lapsed``; removal is a day away. One executemany
    per table: a mass of rows in well under a second on either database."""
    deadline = now - timedelta(seconds=60) if lapsed else now + timedelta(seconds=3600)
    template = Service(
        service_name="mass",
        service_type="source",
        endpoint="10.0.0.1:9000",
        labels={"env": "prod"},
        registered_at=deadline - timedelta(seconds=30),
        lease_duration=30,
        deregister_after=86400,
        lease_expires_at=deadline,
        owner=owner,
    )
    fields = [f for f in Service._meta.concrete_fields if f.name not in ("service_id", "health")]
    constant = [f.get_db_prep_save(getattr(template, f.attname), connection) for f in fields]
    columns = ", ".join(connection.ops.quote_name(c) for c in ["service_id", "health", *(f.column for f in fields)])
    marks = ", ".join(["%s"] * (len(fields) + 2))
    with connection.cursor() as cursor:
        cursor.executemany(
            f"INSERT INTO registry_service ({columns}) VALUES ({marks})",
            [(f"m-{i}", Health.DEGRADED if i % 4 == 0 else Health.HEALTHY, *constant) for i in range(n)],
        )
        cursor.executemany(
            "INSERT INTO registry_servicelabel (service_id, service_name, key, value) VALUES (%s, %s, %s, %s)",
            [(f"m-{i}", "mass", "env", "prod") for i in range(n)],
        )
    r, k = get_redis(), lease_store.keys()
    ms = lease_store.to_ms(deadline)
    conf = lease_store.conf_value(30, 86400, owner.pk)
    pipe = r.pipeline(transaction=False)
    for start in range(0, n, 5000):
        ids = [f"m-{i}" for i in range(start, min(n, start + 5000))]
        pipe.zadd(k.deadline, dict.fromkeys(ids, ms))
        pipe.zadd(k.removal, dict.fromkeys(ids, ms + 86_400_000))
        pipe.hset(k.conf, mapping=dict.fromkeys(ids, conf))
    pipe.execute()


def list_count(api: Any, query: str) -> int:
    response = api.get(f"/api/v1/services/{query}")
    assert response.status_code == 200, response.content[:300]
    return response.json()["count"]


def changelist(operator: Any, query: str = "") -> Any:
    response = operator.get(SERVICES + query)
    assert response.status_code == 200, response.content[:300]
    return response.context["cl"]


def health_column() -> int:
    return ServiceAdmin.list_display.index("health_badge") + 1


# --- the id-set expression ----------------------------------------------------------------------------


def test_id_set_filters_negates_and_handles_the_empty_set(owner: tuple[ApiToken, str]) -> None:
    seed_fleet(5, owner[0], T0, lapsed=False)
    ids = ["m-1", "m-3", "not-registered"]
    assert sorted(Service.objects.filter(InIdSet("pk", ids)).values_list("pk", flat=True)) == ["m-1", "m-3"]
    assert Service.objects.lapsed(ids).count() == 2
    assert sorted(Service.objects.live(ids).values_list("pk", flat=True)) == ["m-0", "m-2", "m-4"]
    assert Service.objects.lapsed([]).count() == 0
    assert Service.objects.live([]).count() == 5


def test_a_quote_in_an_id_set_is_data_not_sql(owner: tuple[ApiToken, str]) -> None:
    seed_fleet(2, owner[0], T0, lapsed=False)
    # identifiers cannot hold these characters, but the expression must not depend on it
    assert Service.objects.lapsed(["m-0", "x' OR '1'='1", 'y"]']).count() == 1


# --- a mass lapse -------------------------------------------------------------------------------------


@pytest.fixture
def stock_sqlite_limit() -> None:
    """SQLite's own limit of variables per statement (32,766), whatever this build was compiled with
    (Debian's allows 250,000): the limit a mass lapse ran into."""
    if connection.vendor == "sqlite":
        connection.ensure_connection()
        connection.connection.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 32_766)


def test_a_mass_lapse_fails_no_read(
    api: Any, operator: Any, owner: tuple[ApiToken, str], stock_sqlite_limit: None
) -> None:
    # given 40,000 services whose leases all lapsed (no job has run), a quarter of them reported degraded
    seed_fleet(MASS, owner[0], T0, lapsed=True)
    with time_machine.travel(T0, tick=False):
        # then the list's health filter answers, exactly
        assert list_count(api, "?health=unhealthy") == MASS
        assert list_count(api, "?health=healthy") == 0
        assert list_count(api, "?health=degraded&selector=env=prod") == 0
        # and /metrics
        assert metrics.services_by_health(T0) == {"healthy": 0, "degraded": 0, "unhealthy": MASS, "unknown": 0}
        # and the admin list
        assert changelist(operator, "?health=unhealthy").result_count == MASS
        assert changelist(operator, "?lease=live").result_count == 0
        assert len(changelist(operator, f"?o={health_column()}").result_list) == 100
        # and the overview
        overview = dashboard.overview(T0)
        assert overview.lapsed.count == MASS
        assert [c.count for c in overview.health_totals] == [0, 0, MASS, 0]


# --- at once, everywhere ------------------------------------------------------------------------------


@pytest.fixture
def lapsing(api: Any) -> None:
    """At T0: ok-1 (30 s lease), short-1 (10 s lease, reports healthy), slow-1 (degraded, 30 s)."""
    with time_machine.travel(T0, tick=False):
        register(api, "ok-1", lease_duration=30)
        register(api, "short-1", lease_duration=10)
        register(api, "slow-1", lease_duration=30, health="degraded")


@pytest.mark.parametrize("offset, short_health", [(9.999, "healthy"), (10, "unhealthy")])
def test_a_lapsed_lease_reads_unhealthy_at_once_in_every_read(
    api: Any, operator: Any, lapsing: None, offset: float, short_health: str
) -> None:
    # when the reads happen just before and exactly at short-1's deadline (no job has run)
    at = T0 + timedelta(seconds=offset)
    with time_machine.travel(at, tick=False):
        lapsed = short_health == "unhealthy"
        unhealthy = {"short-1"} if lapsed else set()
        healthy = {"ok-1"} | (set() if lapsed else {"short-1"})

        def api_ids(query: str) -> set[str]:
            return {s["service_id"] for s in api.get(f"/api/v1/services/{query}").json()["results"]}

        def admin_ids(query: str) -> set[str]:
            return {s.service_id for s in changelist(operator, query).result_list}

        # the list: its body and its filter agree
        body = {s["service_id"]: s["health"] for s in api.get("/api/v1/services/").json()["results"]}
        assert body == {"ok-1": "healthy", "short-1": short_health, "slow-1": "degraded"}
        assert api_ids("?health=unhealthy") == unhealthy
        assert api_ids("?health=healthy") == healthy
        assert api_ids("?health=healthy&selector=env=prod") == healthy
        # /metrics
        text = metrics.render(at)
        assert f'conveyor_registry_services{{health="unhealthy"}} {len(unhealthy)}' in text
        assert f'conveyor_registry_services{{health="healthy"}} {len(healthy)}' in text
        # the admin list: filters and the health sort
        assert admin_ids("?health=unhealthy") == unhealthy
        assert admin_ids("?health=healthy") == healthy
        assert admin_ids("?lease=lapsed") == unhealthy
        assert admin_ids("?lease=live") == {"ok-1", "slow-1"} | healthy
        order = [s.service_id for s in changelist(operator, f"?o={health_column()}").result_list]
        assert order == (["short-1", "slow-1", "ok-1"] if lapsed else ["slow-1", "ok-1", "short-1"])
        # the overview
        overview = dashboard.overview(at)
        assert overview.lapsed.count == len(unhealthy)
        assert [c.count for c in overview.health_totals] == [len(healthy), 1, len(unhealthy), 0]


def test_a_renewed_lease_reads_healthy_again_at_once(api: Any, lapsing: None, heartbeat: Any, owner: Any) -> None:
    with time_machine.travel(T0 + timedelta(seconds=15), tick=False):
        assert list_count(api, "?health=unhealthy") == 1
        status, _ = heartbeat("short-1", owner[1])
        assert status == 200
        assert list_count(api, "?health=unhealthy") == 0
        assert metrics.services_by_health(T0 + timedelta(seconds=15))["unhealthy"] == 0


# --- the list's answers and cost -----------------------------------------------------------------------


class GenericServiceSerializer(ServiceSerializer):
    """ServiceSerializer as DRF's generic field machinery writes it (the reference for the fast path)."""

    def to_representation(self, instance: Service) -> dict[str, Any]:
        leases.attach_live_leases([instance])
        return serializers.ModelSerializer.to_representation(self, instance)


def test_the_list_answers_what_drfs_generic_serializer_writes(api: Any, lapsing: None) -> None:
    register(api, "bare-1", labels={}, group_id=None)
    register(api, "grouped-1", group_id="g-1", weight=7, labels={"k": "ü", "e": "x y"})
    leases.set_operator_weight(["grouped-1"], 3)
    leases.drain(["ok-1"])
    Service.objects.filter(pk="bare-1").update(owner=None)
    with time_machine.travel(T0 + timedelta(seconds=12), tick=False):
        listed = api.get("/api/v1/services/").json()["results"]
        now = datetime.now(UTC)
        services = Service.objects.select_related("owner").order_by("service_name", "service_id")
        expected = [dict(GenericServiceSerializer(s, context={"now": now}).data) for s in services]
    assert listed == [dict(e) for e in expected]
    assert {s["health"] for s in listed} == {"healthy", "degraded", "unhealthy"}
    assert [list(s) for s in listed] == [list(e) for e in expected]  # the same fields, in the same order


def test_the_selector_list_makes_the_same_queries_for_3_or_30_services(api: Any) -> None:
    def queries(n: int) -> int:
        with time_machine.travel(T0, tick=False):
            for i in range(n):
                register(api, f"s-{n}-{i}", labels={"env": "prod", "size": str(n)}, lease_duration=1 + i % 2)
        with (
            time_machine.travel(T0 + timedelta(seconds=1.5), tick=False),
            CaptureQueriesContext(connection) as captured,
        ):
            body = api.get(f"/api/v1/services/?selector=env=prod,size={n}&health=healthy").json()
        assert body["count"] == n // 2  # the 1 s leases lapsed
        return len(captured)

    assert queries(3) == queries(30)
