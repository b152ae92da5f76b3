"""The heartbeat fast path under concurrency: heartbeats that arrive together share one lease-store call
(registry.fastpath.HeartbeatBatcher), and each still gets its own answer; a revoked or deactivated token is
refused by every server process right after the change."""

from __future__ import annotations

import asyncio
import json
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import time_machine
from asgiref.sync import async_to_sync
from django.core.signals import request_finished, request_started
from django.db import close_old_connections

from registry import lease_store, leases
from registry.models import Service
from registry.redis_client import get_redis
from tests.conftest import client_for, service_body, wait_for

pytestmark = pytest.mark.django_db

T0 = datetime(2026, 5, 1, 0, 0, 0, tzinfo=UTC)


def heartbeats_at_once(requests: list[tuple[str, str | None, dict[str, Any] | None]]) -> list[tuple[int, Any]]:
    """Send every (service id, token key, body) heartbeat through the ASGI application concurrently, in one
    event loop; the (status, body) answers in the same order."""
    from registry_project.asgi import application

    async def send_all() -> list[tuple[int, Any]]:
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:

            async def one(service_id: str, key: str | None, body: dict[str, Any] | None) -> tuple[int, Any]:
                headers = {"Authorization": f"Bearer {key}"} if key else {}
                response = await client.post(
                    f"/api/v1/services/{service_id}/heartbeat/",
                    content=json.dumps(body).encode() if body is not None else b"",
                    headers={**headers, "content-type": "application/json"},
                )
                return response.status_code, response.json()

            return await asyncio.gather(*(one(*request) for request in requests))

    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    try:
        return async_to_sync(send_all)()
    finally:
        request_started.connect(close_old_connections)
        request_finished.connect(close_old_connections)


@pytest.fixture
def batch_sizes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The size of every lease-store call the fast path makes (the calls themselves are the real ones)."""
    sizes: list[int] = []
    real = lease_store.heartbeat_many_async

    async def recorded(r: Any, beats: Any) -> list[list[str]]:
        sizes.append(len(beats))
        return await real(r, beats)

    monkeypatch.setattr(lease_store, "heartbeat_many_async", recorded)
    return sizes


def test_heartbeats_sent_together_share_a_call_and_each_gets_its_own_answer(make_token, batch_sizes):
    """Given services of two tenants with different leases, a staff token, a deregistered service and a
    bad token; when all of them heartbeat at once, in a shuffled order, several times over; then each
    request gets the answer of its own service and token, as it would alone."""
    alice, alice_key = make_token("alice")
    bob, bob_key = make_token("bob")
    staff, staff_key = make_token("ops", staff=True)
    with time_machine.travel(T0, tick=False) as clock:
        client_for(alice_key).post("/api/v1/services/", service_body("a-1", lease_duration=11), format="json")
        client_for(alice_key).post("/api/v1/services/", service_body("a-2", lease_duration=12), format="json")
        client_for(bob_key).post("/api/v1/services/", service_body("b-1", lease_duration=13), format="json")
        client_for(alice_key).post("/api/v1/services/", service_body("gone", lease_duration=14), format="json")
        assert client_for(alice_key).delete("/api/v1/services/gone/").status_code == 204
        clock.shift(5)
        for token in (alice, bob, staff):  # as after earlier heartbeats: the batch holds every kind of answer
            assert leases.cache_token(token.key_hash)

        ok = {"a-1": 11, "a-2": 12, "b-1": 13}
        cases: list[tuple[tuple[str, str | None, dict[str, Any] | None], int]] = [
            (("a-1", alice_key, None), 200),
            (("a-2", alice_key, {"health": "degraded"}), 200),
            (("b-1", bob_key, None), 200),
            (("b-1", alice_key, {"health": "unhealthy"}), 403),  # bob's service: refused, unchanged
            (("a-1", bob_key, None), 403),
            (("a-2", staff_key, {"health": "degraded"}), 200),
            (("b-1", staff_key, None), 200),
            (("gone", alice_key, None), 404),
            (("never", staff_key, None), 404),
            (("a-1", "cr_not-a-token", None), 401),
            (("a-1", None, None), 401),
        ]
        requests = cases * 6
        random.Random(13).shuffle(requests)
        answers = heartbeats_at_once([request for request, _ in requests])

    expires = {sid: (T0 + timedelta(seconds=5 + lease)).isoformat().replace("+00:00", "Z") for sid, lease in ok.items()}
    for ((service_id, _key, body), expected), (status, answer) in zip(requests, answers, strict=True):
        assert status == expected, (service_id, _key, body, answer)
        if expected == 200:
            health = (body or {}).get("health", "healthy")
            assert answer == {
                "service_id": service_id,
                "health": health,
                "lease": {
                    "duration": ok[service_id],
                    "heartbeat_interval": ok[service_id] // 3,
                    "expires_at": expires[service_id],
                },
            }
        elif expected == 403:
            assert answer == {"detail": "You do not have permission to perform this action."}
        elif expected == 404:
            assert answer == {"detail": "Service not registered; register it again."}
    # The requests with a token went out in one call, the bad token's again after its database lookup.
    assert batch_sizes[0] == len([r for r in requests if r[0][1]])
    # The foreign heartbeats changed nothing; the health reported by the owner and staff was recorded.
    assert Service.objects.get(pk="b-1").health == "healthy"
    assert Service.objects.get(pk="a-2").health == "degraded"
    assert not Service.objects.filter(pk="gone").exists()
    assert lease_store.counters(get_redis(), ["heartbeats"]) == {"heartbeats": 6 * 5}


def test_one_lease_store_call_answers_each_beat_in_order(make_token):
    """Given a lapsed lease and a live one; when one call carries beats of both, of an unknown service and of
    an uncached token; then the replies are in the beats' order, and only the renewals count."""
    owner, key = make_token("owner")
    with time_machine.travel(T0, tick=False) as clock:
        client_for(key).post("/api/v1/services/", service_body("live", lease_duration=30), format="json")
        client_for(key).post("/api/v1/services/", service_body("lapsed", lease_duration=2), format="json")
        clock.shift(3)
        now_ms = lease_store.to_ms(T0) + 3000
    r = get_redis()
    lease_store.cache_token(r, owner.key_hash, owner.pk, False)
    beats = [
        lease_store.Beat(owner.key_hash, "lapsed", now_ms, "healthy"),
        lease_store.Beat(owner.key_hash, "missing", now_ms, "healthy"),
        lease_store.Beat("0" * 64, "live", now_ms, "healthy"),
        lease_store.Beat(owner.key_hash, "live", now_ms, "degraded"),
        lease_store.Beat(owner.key_hash, "live", now_ms + 1, "healthy"),
    ]
    replies = lease_store.heartbeat_many(r, beats)
    assert replies == [
        ["OK", str(now_ms + 2000), "2000"],
        ["NOT_FOUND"],
        ["TOKEN_MISS"],
        ["HEALTH_CHANGED", str(now_ms + 30000), "30000"],
        ["OK", str(now_ms + 30001), "30000"],
    ]
    assert lease_store.counters(r, ["heartbeats"]) == {"heartbeats": 3}
    assert r.sismember(lease_store.keys().recovered, "lapsed")  # the lapsed lease's renewal is a recovery


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("change", ["deactivate", "delete"])
def test_a_revoked_token_is_refused_by_every_server_process(servers, make_token, change):
    """Given a token whose heartbeats both server processes have answered (so it is cached); when an
    operator deactivates or deletes it in another process; then both refuse its next heartbeat (401)."""
    token, key = make_token("fleet")
    assert client_for(key).post("/api/v1/services/", service_body("svc"), format="json").status_code == 201
    clients = [httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}) for url in servers]
    try:
        for client in clients:
            assert client.post("/api/v1/services/svc/heartbeat/").status_code == 200
        if change == "deactivate":
            token.is_active = False
            token.save()
        else:
            token.delete()
        for client in clients:
            # The change is committed when save()/delete() return: the next heartbeat is refused. The bound
            # only absorbs the scheduling of two processes on a busy machine.
            wait_for(lambda c=client: c.post("/api/v1/services/svc/heartbeat/").status_code == 401, 2)
            assert client.post("/api/v1/services/svc/heartbeat/").json() == {"detail": "Invalid token."}
    finally:
        for client in clients:
            client.close()


def test_a_heartbeat_failing_in_redis_fails_alone_in_its_call(make_token, batch_sizes):
    """Given two services, one of whose entries Redis cannot read (a key of the wrong type); when both heartbeat
    at once; then that one is answered 503 (the lease store failed for it) and the other is renewed."""
    token, key = make_token("owner")
    for sid in ("fine", "broken"):
        assert client_for(key).post("/api/v1/services/", service_body(sid), format="json").status_code == 201
    assert leases.cache_token(token.key_hash)
    get_redis().set(lease_store.keys().member_groups("broken"), "not a set")  # SMEMBERS fails: WRONGTYPE
    answers = heartbeats_at_once([("broken", key, None), ("fine", key, None)] * 3)
    assert batch_sizes == [6]
    assert [status for status, _ in answers] == [503, 200] * 3
    assert answers[0][1] == {"detail": "Lease store unavailable; retry shortly."}
    assert answers[1][1]["service_id"] == "fine"
