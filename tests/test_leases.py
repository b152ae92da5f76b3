"""Lease semantics with a controlled clock: lapse, removal after deregister_after, re-registration."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import time_machine
from django.utils import timezone

from registry import leases
from registry.models import Health, Service
from registry.tasks import cleanup_once
from tests.conftest import client_for, service_body

pytestmark = pytest.mark.django_db

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


def health_of(api, service_id: str) -> str:
    return api.get(f"/api/v1/services/{service_id}/").json()["health"]


def test_lapsed_lease_reads_unhealthy_at_the_lapse_instant_without_any_job(api):
    with time_machine.travel(T0, tick=False) as clock:
        assert api.post("/api/v1/services/", service_body(lease_duration=30), format="json").status_code == 201

        clock.move_to(T0 + timedelta(seconds=29, microseconds=999000))
        assert health_of(api, "svc-1") == "healthy"

        clock.move_to(T0 + timedelta(seconds=30))
        assert health_of(api, "svc-1") == "unhealthy"
        listed = api.get("/api/v1/services/?health=unhealthy").json()
        assert [s["service_id"] for s in listed["results"]] == ["svc-1"]
        assert api.get("/api/v1/services/?health=healthy").json()["count"] == 0
        # reported health stays what the service said; only the effective health changed
        assert Service.objects.get().health == Health.HEALTHY


def test_heartbeat_keeps_the_lease_and_moves_the_deadline(api, owner):
    with time_machine.travel(T0, tick=False) as clock:
        api.post("/api/v1/services/", service_body(lease_duration=30), format="json")
        clock.move_to(T0 + timedelta(seconds=20))
        result = leases.heartbeat("svc-1", owner[1], Health.HEALTHY, timezone.now())
        assert result.status == 200
        assert result.body["lease"]["expires_at"] == "2026-01-01T12:00:50Z"

        clock.move_to(T0 + timedelta(seconds=45))
        body = api.get("/api/v1/services/svc-1/").json()
        assert body["health"] == "healthy"
        assert body["lease_expires_at"] == "2026-01-01T12:00:50Z"
        assert body["last_heartbeat"] == "2026-01-01T12:00:20Z"


def test_cleanup_removes_only_after_deregister_after(api):
    with time_machine.travel(T0, tick=False) as clock:
        api.post("/api/v1/services/", service_body(lease_duration=10, deregister_after=20), format="json")

        clock.move_to(T0 + timedelta(seconds=30))  # lapsed exactly deregister_after ago: kept
        assert cleanup_once() == []
        assert health_of(api, "svc-1") == "unhealthy"

        clock.move_to(T0 + timedelta(seconds=30, milliseconds=1))
        assert cleanup_once() == ["svc-1"]
        assert not Service.objects.exists()
        assert api.get("/api/v1/services/svc-1/").status_code == 404


def test_deregister_after_zero_removes_right_after_the_lapse(api):
    with time_machine.travel(T0, tick=False) as clock:
        api.post("/api/v1/services/", service_body(lease_duration=5, deregister_after=0), format="json")
        clock.move_to(T0 + timedelta(seconds=5))
        assert cleanup_once() == []
        clock.move_to(T0 + timedelta(seconds=5, milliseconds=1))
        assert cleanup_once() == ["svc-1"]


def test_heartbeat_after_removal_is_404_and_reregistration_works(api, owner, heartbeat):
    with time_machine.travel(T0, tick=False) as clock:
        api.post("/api/v1/services/", service_body(lease_duration=5, deregister_after=0), format="json")
        clock.move_to(T0 + timedelta(seconds=6))
        assert cleanup_once() == ["svc-1"]

        status, body = heartbeat("svc-1", owner[1])
        assert status == 404
        assert "register it again" in body["detail"]

        response = api.post("/api/v1/services/", service_body(lease_duration=5), format="json")
        assert response.status_code == 201
        assert response.json()["registered_at"] == "2026-01-01T12:00:06Z"
        assert heartbeat("svc-1", owner[1])[0] == 200


def test_heartbeat_on_a_lapsed_but_not_removed_lease_revives_it(api, owner, heartbeat):
    with time_machine.travel(T0, tick=False) as clock:
        api.post("/api/v1/services/", service_body(lease_duration=5, deregister_after=60), format="json")
        clock.move_to(T0 + timedelta(seconds=10))
        assert health_of(api, "svc-1") == "unhealthy"
        assert heartbeat("svc-1", owner[1])[0] == 200
        assert health_of(api, "svc-1") == "healthy"
        clock.move_to(T0 + timedelta(seconds=70))
        assert cleanup_once() == []  # the heartbeat moved the removal deadline too


def test_cleanup_works_in_bounded_batches(owner):
    token = owner[0]
    with time_machine.travel(T0, tick=False) as clock:
        for i in range(7):
            leases.register(service_body(f"svc-{i}", lease_duration=1, deregister_after=0), token, timezone.now())
        clock.move_to(T0 + timedelta(seconds=2))
        first = leases.expire_lapsed(timezone.now(), limit=3)
        second = leases.expire_lapsed(timezone.now(), limit=3)
        third = leases.expire_lapsed(timezone.now(), limit=3)
        assert (len(first), len(second), len(third)) == (3, 3, 1)
        assert sorted(first + second + third) == [f"svc-{i}" for i in range(7)]
        assert leases.expire_lapsed(timezone.now(), limit=3) == []


def test_reported_health_is_persisted_only_when_it_changes(api, owner, heartbeat):
    with time_machine.travel(T0, tick=False):
        api.post("/api/v1/services/", service_body(), format="json")
        status, body = heartbeat("svc-1", owner[1], {"health": "degraded"})
        assert (status, body["health"]) == (200, "degraded")
        assert Service.objects.get().health == Health.DEGRADED
        assert health_of(api, "svc-1") == "degraded"
        assert api.get("/api/v1/services/?health=degraded").json()["count"] == 1

        status, body = heartbeat("svc-1", owner[1])  # no body reports healthy
        assert (status, body["health"]) == (200, "healthy")
        assert Service.objects.get().health == Health.HEALTHY


def test_lost_redis_state_is_rebuilt_with_a_grace_lease(api, owner, heartbeat):
    from registry.redis_client import get_redis

    with time_machine.travel(T0, tick=False) as clock:
        api.post("/api/v1/services/", service_body(lease_duration=30), format="json")
        clock.move_to(T0 + timedelta(seconds=20))
        get_redis().flushall()  # Redis restarted without persistence

        assert cleanup_once() == []  # rebuilds instead of expiring anything
        body = api.get("/api/v1/services/svc-1/").json()
        assert body["health"] == "healthy"
        assert body["lease_expires_at"] == "2026-01-01T12:00:50Z"  # a full lease from the rebuild
        assert heartbeat("svc-1", owner[1])[0] == 200


def test_heartbeat_restores_a_missing_entry_for_a_registered_service(api, owner, heartbeat):
    from registry import lease_store
    from registry.redis_client import get_redis

    with time_machine.travel(T0, tick=False):
        api.post("/api/v1/services/", service_body(), format="json")
        lease_store.remove(get_redis(), ["svc-1"])
        status, _ = heartbeat("svc-1", owner[1])
        assert status == 200
        assert lease_store.deadlines(get_redis(), ["svc-1"]) == {"svc-1": lease_store.to_ms(T0) + 30_000}


def test_reconcile_drops_redis_entries_without_a_row(owner):
    from registry import lease_store
    from registry.redis_client import get_redis

    r = get_redis()
    lease_store.put(
        r, "ghost", deadline_ms=10**13, lease_seconds=30, deregister_after=60, owner_id=owner[0].pk, health="healthy"
    )
    assert leases.reconcile(timezone.now()) == {"restored": 0, "dropped": 1}
    assert lease_store.deadlines(r, ["ghost"]) == {}
    status = client_for(owner[1]).post("/api/v1/services/ghost/heartbeat/").status_code
    assert status == 404
