"""Per-service revisions on /ws/services/ (registry.revisions): every change of a service a watcher can see,
lease lapse and recovery included, has a higher revision than anything sent for it before, and a snapshot
shows a state under the revision of that state's event. Checked with a watcher that keeps, per service,
the newest revision it has and drops every message at or below it, across reconnects."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import pytest
import time_machine
from django.utils import timezone

from registry import lease_store, leases, revisions
from registry.models import Service
from registry.redis_client import get_redis
from registry.tasks import cleanup_once
from tests.conftest import client_for, service_body
from tests.test_websockets import call, run, socket

pytestmark = pytest.mark.django_db(transaction=True)


class Watcher:
    """A client's view of the services: a message is applied only if its revision is above the newest one
    it has for that service; the view outlives the connection (a reconnect's snapshot is merged into it)."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.revisions: dict[str, int] = {}
        self.health: dict[str, str | None] = {}
        self.received: list[dict[str, Any]] = []
        self.socket: Any = None

    def apply(self, message: dict[str, Any]) -> None:
        self.received.append(message)
        sid = message["service_id"]
        if message["revision"] <= self.revisions.get(sid, -1):
            return
        self.revisions[sid] = message["revision"]
        self.health[sid] = None if message["type"] == "service.deregistered" else message["health"]

    async def connect(self) -> None:
        self.socket = socket("/ws/services/?name=kafka-source", self.key)
        ok, _ = await self.socket.connect(timeout=5)
        assert ok
        await self.settle()

    async def settle(self, quiet: float = 0.3) -> list[dict[str, Any]]:
        """Apply every message that arrives until none has for ``quiet`` seconds; returns them."""
        got = []
        while not await self.socket.receive_nothing(timeout=quiet):
            message = await self.socket.receive_json_from(timeout=5)
            self.apply(message)
            got.append(message)
        return got

    async def reconnect(self) -> list[dict[str, Any]]:
        await self.socket.disconnect()
        self.socket = socket("/ws/services/?name=kafka-source", self.key)
        ok, _ = await self.socket.connect(timeout=5)
        assert ok
        return await self.settle()

    async def close(self) -> None:
        await self.socket.disconnect()


def truth(service_id: str, now: datetime) -> tuple[str, int]:
    """The effective health and revision a read at ``now`` gives (what every snapshot shows)."""
    service = leases.attach_live_leases(Service.objects.filter(pk=service_id))[0]
    return service.effective_health(now), service.effective_revision(now)


def test_a_dropping_watcher_converges_through_lapses_recoveries_and_reconnect_snapshots(owner):
    key = owner[1]
    api = client_for(key)
    t0 = timezone.now()

    async def scenario() -> None:
        with time_machine.travel(t0, tick=False) as clock:
            await call(
                api.post, "/api/v1/services/", service_body("s1", lease_duration=2, deregister_after=600), format="json"
            )
            watcher, witness = Watcher(key), Watcher(key)
            await watcher.connect()
            await witness.connect()
            assert watcher.health == {"s1": "healthy"}
            registered = watcher.revisions["s1"]

            # the lease lapses: a reconnect's snapshot shows it at once, under a higher revision
            clock.move_to(t0 + timedelta(seconds=3))
            (lapsed,) = await watcher.reconnect()
            assert (lapsed["health"], lapsed["revision"]) == ("unhealthy", registered + 1)
            assert watcher.health == {"s1": "unhealthy"}

            # it recovers before any cleanup run noticed the lapse (the case that stuck watchers before)
            await call(api.post, "/api/v1/services/s1/heartbeat/")
            (recovered,) = await watcher.reconnect()
            assert recovered["health"] == "healthy" and recovered["revision"] > lapsed["revision"]
            assert watcher.health == {"s1": "healthy"}

            # the cleanup run announces the lapse-and-recovery under the revision the snapshot showed
            await call(cleanup_once)
            (event,) = await witness.settle()
            assert (event["type"], event["health"], event["revision"]) == (
                "service.health",
                "healthy",
                recovered["revision"],
            )
            assert await watcher.settle() == []  # the same state: not sent again

            # a lapse noticed by the cleanup run while connected, then a recovery
            clock.move_to(t0 + timedelta(seconds=6))
            await call(cleanup_once)
            assert [m["health"] for m in await watcher.settle()] == ["unhealthy"]
            await call(api.post, "/api/v1/services/s1/heartbeat/")
            await call(cleanup_once)
            assert [m["health"] for m in await watcher.settle()] == ["healthy"]
            assert watcher.health == {"s1": "healthy"} == witness.health

            # lapse, recover, lapse again between two cleanup runs: the run announces the newest state
            clock.move_to(t0 + timedelta(seconds=9))
            await call(api.post, "/api/v1/services/s1/heartbeat/")
            clock.move_to(t0 + timedelta(seconds=12))
            await call(cleanup_once)
            (again,) = await watcher.settle()
            assert (again["health"], again["revision"]) == ("unhealthy", (await call(truth, "s1", timezone.now()))[1])
            assert watcher.health == {"s1": "unhealthy"}
            # and a reconnect shows nothing newer than that
            assert await watcher.reconnect() == [again | {"type": "service.registered"}]

            # an operator's drain of the lapsed service, a re-registration, a deregistration: each higher
            await call(leases.drain, ["s1"])
            await call(
                api.post, "/api/v1/services/", service_body("s1", lease_duration=2, deregister_after=600), format="json"
            )
            await call(api.delete, "/api/v1/services/s1/")
            changes = await watcher.settle()
            assert [m["type"] for m in changes] == ["service.updated", "service.registered", "service.deregistered"]
            assert [m["health"] for m in changes[:2]] == ["unhealthy", "healthy"]
            assert again["revision"] < changes[0]["revision"] < changes[1]["revision"] < changes[2]["revision"]
            # a registration of the same id after its removal is newer than the removal
            await call(api.post, "/api/v1/services/", service_body("s1"), format="json")
            (back,) = await watcher.settle()
            assert back["revision"] > changes[2]["revision"] and watcher.health == {"s1": "healthy"}

            # what either received never went down, and a repeated revision (a reconnect's snapshot)
            # repeated the state too
            for seen in (watcher.received, witness.received):
                sent = [m["revision"] for m in seen]
                assert sent == sorted(sent)
                states = {(m["revision"], m["type"] == "service.deregistered", m.get("health")) for m in seen}
                assert len(states) == len(set(sent))
            await watcher.close()
            await witness.close()

    run(scenario)


def test_an_event_and_a_snapshot_of_the_same_state_carry_the_same_revision(owner):
    key = owner[1]
    api = client_for(key)
    api.post("/api/v1/services/", service_body("s1", weight=40), format="json")

    async def scenario() -> None:
        witness = Watcher(key)
        await witness.connect()
        await call(api.post, "/api/v1/services/s1/heartbeat/", {"health": "degraded"}, format="json")
        await call(leases.drain, ["s1"])
        health, drained = await witness.settle()
        assert (health["type"], drained["type"]) == ("service.health", "service.updated")
        late = Watcher(key)
        await late.connect()
        (snapshot,) = late.received
        assert snapshot == drained | {"type": "service.registered"}
        await witness.close()
        await late.close()

    run(scenario)


def test_revisions_survive_the_lease_store_losing_its_state(owner):
    """After Redis lost everything (the counter and the recovery counts), a restored entry and a new
    registration of a removed id still read above every revision shown before."""
    key = owner[1]
    api = client_for(key)
    r = get_redis()
    api.post("/api/v1/services/", service_body("s1", lease_duration=2), format="json")
    api.post("/api/v1/services/", service_body("gone"), format="json")
    now = timezone.now()
    with time_machine.travel(now + timedelta(seconds=3), tick=False):
        api.post("/api/v1/services/s1/heartbeat/")  # a recovery: counted in Redis only
        shown = truth("s1", timezone.now())[1]
    api.delete("/api/v1/services/gone/")
    # the removal took the counter's newest value
    removal = revisions.removal_revision(int(r.get(lease_store.keys().counter("revision"))))

    r.flushall()  # everything Redis held is gone; the continuity check restores from the database
    cleanup_once()
    assert truth("s1", timezone.now())[1] > shown
    api.post("/api/v1/services/", service_body("gone"), format="json")
    assert truth("gone", timezone.now())[1] > removal


def test_the_revision_function():
    # while the lease holds: even; lapsed: odd; recoveries since the stored revision raise it
    assert revisions.revision_of(10, 3, 3, lapsed=False) == 20
    assert revisions.revision_of(10, 3, 3, lapsed=True) == 21
    assert revisions.revision_of(10, 3, 4, lapsed=False) == 22
    assert revisions.revision_of(10, 3, None, lapsed=False) == 20  # no live count read
    assert revisions.revision_of(10, 3, 1, lapsed=True) == 21  # a count below the seen one never lowers it
