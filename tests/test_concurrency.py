"""20 threads registering, heartbeating and deregistering overlapping ids at once, on the suite's database
(CI runs it on SQLite and on PostgreSQL): no 500, no lost update, Redis and the database agree."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter

import httpx
import pytest
from asgiref.sync import async_to_sync
from django.db import connection

from registry import lease_store
from registry.models import Service, ServiceLabel
from registry.redis_client import get_redis
from tests.conftest import client_for, service_body

THREADS = 20
SECONDS = 4.0
IDS = [f"svc-{i}" for i in range(8)]


def heartbeat_via_fast_path(service_id: str, key: str, health: str) -> int:
    from registry_project.asgi import application

    async def send() -> int:
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            response = await client.post(
                f"/api/v1/services/{service_id}/heartbeat/",
                json={"health": health},
                headers={"Authorization": f"Bearer {key}"},
            )
            return response.status_code

    return async_to_sync(send)()


@pytest.mark.django_db(transaction=True)
def test_concurrent_register_heartbeat_deregister_stays_consistent(owner):
    _, key = owner
    outcomes: list[tuple[str, str, int]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + SECONDS

    def worker(n: int) -> None:
        rng = random.Random(n)
        client = client_for(key)
        try:
            while time.monotonic() < stop_at:
                sid = rng.choice(IDS)
                op = rng.choices(["register", "heartbeat", "deregister"], weights=[3, 6, 2])[0]
                if op == "register":
                    labels = {"writer": f"t{n}", "zone": rng.choice("abc")}
                    status = client.post(
                        "/api/v1/services/", service_body(sid, labels=labels), format="json"
                    ).status_code
                elif op == "heartbeat":
                    health = rng.choice(["healthy", "degraded"])
                    if n % 2:
                        status = heartbeat_via_fast_path(sid, key, health)
                    else:
                        status = client.post(
                            f"/api/v1/services/{sid}/heartbeat/", {"health": health}, format="json"
                        ).status_code
                else:
                    status = client.delete(f"/api/v1/services/{sid}/").status_code
                with lock:
                    outcomes.append((sid, op, status))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert errors == []
    allowed = {"register": {200, 201}, "heartbeat": {200, 404}, "deregister": {204, 404}}
    bad = [o for o in outcomes if o[2] not in allowed[o[1]]]
    assert bad == []
    assert len(outcomes) > 200  # the run really overlapped many operations

    counts = Counter((sid, status) for sid, _op, status in outcomes)
    r = get_redis()
    rows = {s.service_id: s for s in Service.objects.all()}
    for sid in IDS:
        # Every create is matched by at most one delete and vice versa: none was lost or doubled.
        alive = counts[(sid, 201)] - counts[(sid, 204)]
        assert alive in (0, 1), sid
        assert (sid in rows) == (alive == 1), sid

    k = lease_store.keys()
    assert sorted(raw.decode() for raw in r.hkeys(k.conf)) == sorted(rows)
    assert sorted(raw.decode() for raw in r.zrange(k.deadline, 0, -1)) == sorted(rows)
    assert sorted(raw.decode() for raw in r.zrange(k.removal, 0, -1)) == sorted(rows)
    for sid, service in rows.items():
        assert r.hget(k.health, sid).decode() == service.health
        assert r.hget(k.conf, sid).decode() == lease_store.conf_value(
            service.lease_duration, service.deregister_after, service.owner_id
        )
        labels = dict(ServiceLabel.objects.filter(service=service).values_list("key", "value"))
        assert labels == service.labels
