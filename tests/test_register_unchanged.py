"""Re-registering an unchanged service renews its lease without a write, through either front door (the DRF
view, and the ASGI fast path in front of it), and never when anything about the registration changed."""

from __future__ import annotations

import json
import threading
from datetime import timedelta
from typing import Any

import pytest
from django.db import close_old_connections
from django.utils import timezone

from registry import lease_store, leases, reregister
from registry.models import ApiToken, Service, ServiceEvent
from registry.redis_client import get_redis

from .conftest import asgi_request, client_for, service_body

DOORS = ["drf", "asgi"]
TIMES = ("lease_expires_at", "last_heartbeat")


def register(via: str, key: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    if via == "drf":
        response = client_for(key).post("/api/v1/services/", body, format="json")
        return response.status_code, response.json()
    answer = asgi_request(
        "POST",
        "/api/v1/services/",
        content=json.dumps(body).encode(),
        headers={"authorization": f"Bearer {key}", "content-type": "application/json"},
    )
    return answer.status_code, answer.json()


def history(service_id: str = "svc-1") -> list[str]:
    return list(ServiceEvent.objects.filter(service_id=service_id).order_by("id").values_list("kind", flat=True))


def without_times(body: dict[str, Any]) -> dict[str, Any]:
    rest = {k: v for k, v in body.items() if k not in TIMES}
    rest["lease"] = {k: v for k, v in body["lease"].items() if k != "expires_at"}
    return rest


@pytest.mark.parametrize("via", DOORS)
def test_an_unchanged_re_registration_renews_the_lease_and_writes_nothing(via, owner):
    status, first = register(via, owner[1], service_body())
    assert status == 201
    revision = Service.objects.get().revision
    status, again = register(via, owner[1], service_body())
    assert status == 200
    assert history() == ["registered"]
    assert Service.objects.get().revision == revision
    assert without_times(again) == without_times(first)
    assert again["lease_expires_at"] >= first["lease_expires_at"]
    assert again["lease"]["expires_at"] == again["lease_expires_at"]
    # The same answer as a registration through the database would give (its snapshot forgotten).
    get_redis().delete(reregister.snap_key())
    status, slow = register(via, owner[1], service_body())
    assert status == 200
    assert without_times(slow) == without_times(again)
    assert history() == ["registered", "re-registered"]


@pytest.mark.parametrize("via", DOORS)
def test_key_order_and_spacing_do_not_make_a_change(via, owner):
    assert register(via, owner[1], service_body())[0] == 201
    reordered = dict(reversed(list(service_body().items())))
    answer = asgi_request(
        "POST",
        "/api/v1/services/",
        content=json.dumps(reordered, indent=2).encode(),
        headers={"authorization": f"Bearer {owner[1]}", "content-type": "application/json"},
    )
    assert answer.status_code == 200
    assert history() == ["registered"]


CHANGES = {
    "service_name": {"service_name": "other-name"},
    "service_type": {"service_type": "sink"},
    "endpoint": {"endpoint": "10.0.0.2:50051"},
    "labels changed": {"labels": {"env": "prod", "zone": "b"}},
    "labels dropped": {"labels": {}},
    "group_id": {"group_id": "g1"},
    "lease_duration": {"lease_duration": 45},
    "deregister_after": {"deregister_after": 5},
    "weight": {"weight": 7},
    "health": {"health": "degraded"},
}


@pytest.mark.parametrize("via", DOORS)
@pytest.mark.parametrize("change", list(CHANGES))
def test_every_changed_field_is_written_and_recorded(via, change, owner):
    assert register(via, owner[1], service_body())[0] == 201
    assert register(via, owner[1], service_body())[0] == 200  # unchanged: remembered
    status, body = register(via, owner[1], service_body(**CHANGES[change]))
    assert status == 200
    assert history() == ["registered", "re-registered"]
    service = Service.objects.get()
    for name, value in CHANGES[change].items():
        field = "registered_weight" if name == "weight" else name
        assert getattr(service, field) == value
        assert body["reported_health" if name == "health" else name] == value
    # and going back is a change too
    assert register(via, owner[1], service_body())[0] == 200
    assert history() == ["registered", "re-registered", "re-registered"]


@pytest.mark.parametrize("via", DOORS)
def test_another_token_is_refused_and_staff_keeps_the_owner(via, owner, make_token):
    assert register(via, owner[1], service_body())[0] == 201
    assert register(via, owner[1], service_body())[0] == 200
    _other, other_key = make_token("other")
    status, _ = register(via, other_key, service_body())
    assert status == 403
    _staff, staff_key = make_token("ops", staff=True)
    status, body = register(via, staff_key, service_body())
    assert status == 200
    assert body["owner"] == "owner"
    assert Service.objects.get().owner_id == owner[0].pk
    assert history() == ["registered"]


@pytest.mark.parametrize("via", DOORS)
def test_a_service_deregistered_meanwhile_is_registered_anew(via, owner):
    assert register(via, owner[1], service_body())[0] == 201
    assert register(via, owner[1], service_body())[0] == 200
    leases.deregister("svc-1", owner[0])
    status, _ = register(via, owner[1], service_body())
    assert status == 201
    assert history() == ["registered", "deregistered", "registered"]


@pytest.mark.parametrize("via", DOORS)
def test_a_drain_is_kept_and_shown(via, owner):
    assert register(via, owner[1], service_body())[0] == 201
    assert register(via, owner[1], service_body())[0] == 200
    leases.drain(["svc-1"])
    status, body = register(via, owner[1], service_body())
    assert status == 200
    assert (body["drained"], body["weight"]) == (True, 0)
    status, body = register(via, owner[1], service_body())
    assert (status, body["drained"], body["weight"]) == (200, True, 0)
    assert Service.objects.get().drained


@pytest.mark.parametrize("via", DOORS)
def test_a_health_reported_since_is_reset_by_the_registration(via, owner):
    assert register(via, owner[1], service_body())[0] == 201
    assert register(via, owner[1], service_body())[0] == 200
    assert leases.heartbeat("svc-1", owner[1], "degraded", timezone.now()).status == 200
    status, body = register(via, owner[1], service_body())
    assert (status, body["health"], body["reported_health"]) == (200, "healthy", "healthy")
    assert Service.objects.get().health == "healthy"
    assert history() == ["registered", "health_changed", "re-registered"]


@pytest.mark.parametrize("via", DOORS)
def test_a_lapsed_lease_re_registers_through_the_database(via, owner):
    assert register(via, owner[1], service_body(lease_duration=1))[0] == 201
    r = get_redis()
    past = lease_store.to_ms(timezone.now() - timedelta(seconds=5))
    r.zadd(lease_store.keys().deadline, {"svc-1": past})
    status, body = register(via, owner[1], service_body(lease_duration=1))
    assert (status, body["health"]) == (200, "healthy")
    assert history() == ["registered", "re-registered"]


@pytest.mark.parametrize("via", DOORS)
def test_a_renamed_token_is_named_in_the_answer(via, owner):
    assert register(via, owner[1], service_body())[0] == 201
    token = owner[0]
    token.name = "renamed"
    token.save()
    status, body = register(via, owner[1], service_body())
    assert (status, body["owner"]) == (200, "renamed")


@pytest.mark.django_db(transaction=True)
def test_concurrent_first_registrations_by_two_tokens_leave_one_owner(make_token):
    tokens = [make_token("a"), make_token("b")]
    for round_ in range(4):
        sid = f"race-{round_}"
        answers: dict[str, int] = {}
        barrier = threading.Barrier(2)

        def go(token: Any, key: str, sid: str = sid, answers: dict[str, int] = answers, barrier: Any = barrier) -> None:
            try:
                barrier.wait()
                answers[token.name] = (
                    client_for(key).post("/api/v1/services/", service_body(sid), format="json").status_code
                )
                # and the unchanged shortcut refuses the loser too
                answers[token.name + "-again"] = (
                    client_for(key).post("/api/v1/services/", service_body(sid), format="json").status_code
                )
            finally:
                close_old_connections()

        threads = [threading.Thread(target=go, args=t) for t in tokens]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted([answers["a"], answers["b"]]) == [201, 403], answers
        winner = "a" if answers["a"] == 201 else "b"
        loser = "b" if winner == "a" else "a"
        assert (answers[winner + "-again"], answers[loser + "-again"]) == (200, 403)
        service = Service.objects.get(pk=sid)
        assert service.owner.name == winner
        conf = get_redis().hget(lease_store.keys().conf, sid).decode()
        assert conf.endswith(f":{service.owner_id}")


def test_the_direct_answer_is_the_serializers(owner, make_token):
    from registry.serializers import RegisteredServiceSerializer, registered_body

    now = timezone.now()
    leases.register(service_body("a"), owner[0], now)
    leases.register(service_body("b", group_id="g", weight=3, health="degraded", lease_duration=7), owner[0], now)
    leases.drain(["b"])
    leases.set_operator_weight(["a"], 40)
    gone, _ = make_token("gone")
    leases.register(service_body("c"), gone, now)
    gone.delete()
    for service in leases.attach_live_leases(Service.objects.select_related("owner")):
        for at in (now, now + timedelta(seconds=3600)):  # live, and lapsed
            for zone in ("UTC", "Europe/Paris", "America/St_Johns"):  # Z, and offsets
                with timezone.override(zone):
                    expected = RegisteredServiceSerializer(service, context={"now": at}).data
                    owner_name = service.owner.name if service.owner else None
                    assert json.dumps(registered_body(service, at, owner_name)) == json.dumps(expected)


@pytest.mark.django_db(transaction=True)
def test_a_token_revoked_while_it_is_being_cached_is_not_cached(make_token, monkeypatch):
    """cache_token read the row before the revocation committed and writes the cache after the revocation
    forgot it: the entry is dropped again, and the token refused."""
    token, key = make_token("racing")
    real = lease_store.cache_token

    def revoked_meanwhile(r: Any, key_hash: str, token_id: int, is_staff: bool) -> None:
        ApiToken.objects.filter(pk=token.pk).update(is_active=False)
        lease_store.forget_token(r, key_hash)  # what the revocation's signal does after its commit
        real(r, key_hash, token_id, is_staff)

    monkeypatch.setattr(lease_store, "cache_token", revoked_meanwhile)
    assert leases.cache_token(token.key_hash) is False
    monkeypatch.undo()
    assert get_redis().get(lease_store.keys().token(token.key_hash)) is None
    answer = asgi_request(
        "POST",
        "/api/v1/services/",
        content=json.dumps(service_body()).encode(),
        headers={"authorization": f"Bearer {key}", "content-type": "application/json"},
    )
    assert answer.status_code == 401
    assert not Service.objects.exists()
