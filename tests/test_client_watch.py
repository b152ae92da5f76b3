"""The client's service watch: the snapshot, then live changes in order; a forced reconnect (the server it
follows killed and started again while another server takes changes) resyncs with only the differences; the
ordering and de-duplication rules of the watch state; a watch the registry refuses raises a typed error."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterable

import pytest
from conveyor import InvalidRequest, Registry, Unauthorized
from conveyor import aio as conveyor_aio
from conveyor._watch_state import WatchState
from conveyor.records import WatchEvent

from tests.client_support import register_raw, rest
from tests.conftest import wait_for

pytest_plugins = ["tests.client_fixtures"]
pytestmark = pytest.mark.django_db(transaction=True)


class Collector:
    """Iterates a sync watch on a thread, keeping every event (and the error that ended it, if any)."""

    def __init__(self, watch: Iterable[WatchEvent]) -> None:
        self.watch = watch
        self.events: list[WatchEvent] = []
        self.error: Exception | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for event in self.watch:
                self.events.append(event)
        except Exception as exc:  # noqa: BLE001 - kept for the test to look at
            self.error = exc


def brief(events: list[WatchEvent]) -> list[tuple[str, str, str | None, bool]]:
    return [(e.type, e.service_id, e.service.health if e.service else e.reason, e.resync) for e in events]


def heartbeat(url: str, key: str, service_id: str, health: str) -> None:
    with rest(url, key) as client:
        client.post(f"/services/{service_id}/heartbeat/", json={"health": health}).raise_for_status()


def test_the_snapshot_comes_first_then_every_change_in_order(server, key):
    register_raw(server.url, key, "a-1", "a")
    register_raw(server.url, key, "a-2", "a")
    register_raw(server.url, key, "b-1", "b")
    with Registry(server.url, key).watch_services("a") as watch:
        seen = Collector(watch)
        wait_for(lambda: len(seen.events) == 2, 10)
        heartbeat(server.url, key, "a-1", "degraded")
        register_raw(server.url, key, "a-3", "a")
        with rest(server.url, key) as client:
            client.delete("/services/a-2/").raise_for_status()
        wait_for(lambda: len(seen.events) == 5, 10)
        assert brief(seen.events) == [
            ("service.registered", "a-1", "healthy", False),
            ("service.registered", "a-2", "healthy", False),
            ("service.health", "a-1", "degraded", False),
            ("service.registered", "a-3", "healthy", False),
            ("service.deregistered", "a-2", "deregistered", False),
        ]
        a1 = [e.revision for e in seen.events if e.service_id == "a-1"]
        assert a1 == sorted(set(a1))  # per service: increasing, never repeated
        assert sorted(watch.view()) == ["a-1", "a-3"]
    seen.thread.join(5)
    assert not seen.thread.is_alive() and seen.error is None  # close() ended the iteration


def test_a_reconnect_resyncs_from_a_fresh_snapshot_with_only_the_differences(live, key):
    followed, other = live(), live()
    for sid in ("x", "y", "z"):
        register_raw(other.url, key, sid, "n", lease_duration=3600)
    register_raw(other.url, key, "short", "n", lease_duration=1)
    with Registry(followed.url, key, timeout=5).watch_services("n") as watch:
        seen = Collector(watch)
        wait_for(lambda: len(seen.events) == 4, 10)
        followed.stop()  # the watch loses its server
        with rest(other.url, key) as client:
            client.delete("/services/y/").raise_for_status()
        register_raw(other.url, key, "w", "n", lease_duration=3600)
        heartbeat(other.url, key, "x", "degraded")
        # "short" lapses meanwhile: no message is ever pushed for that (no leader job runs here), the
        # snapshot after the reconnect shows it unhealthy under the revision the watch already has.
        wait_for(lambda: rest(other.url, key).get("/services/short/").json()["health"] == "unhealthy", 10)
        followed.start()
        wait_for(lambda: len(seen.events) >= 8, 30)
        register_raw(other.url, key, "v", "n", lease_duration=3600)  # a live change after the resync
        wait_for(lambda: len(seen.events) >= 9, 10)
        assert brief(seen.events[4:]) == [
            ("service.health", "short", "unhealthy", True),
            ("service.registered", "w", "healthy", True),
            ("service.health", "x", "degraded", True),
            ("service.deregistered", "y", "absent", True),
            ("service.registered", "v", "healthy", False),
        ]
        assert watch.connects == 2
        assert sorted(watch.view()) == ["short", "v", "w", "x", "z"]


def record(sid: str, revision: int, health: str = "healthy", kind: str = "service.registered") -> dict:
    return {
        "type": kind,
        "revision": revision,
        "service_id": sid,
        "service_name": "n",
        "endpoint": "h:1",
        "health": health,
        "weight": 100,
        "labels": {},
    }


BARRIER = {"type": "error", "detail": "unknown message type 'sync'"}


def test_the_watch_state_orders_and_deduplicates_per_service():
    state = WatchState()
    state.connected()
    assert state.feed(record("s", 5)) == []  # part of the snapshot: nothing until its end
    assert [(e.type, e.revision) for e in state.feed(BARRIER)] == [("service.registered", 5)]
    assert [e.revision for e in state.feed(record("s", 7, "unhealthy", "service.health"))] == [7]
    assert state.feed(record("s", 7, "unhealthy", "service.health")) == []  # the same revision again
    assert state.feed(record("s", 6, "degraded", "service.health")) == []  # older than what it has
    assert [e.type for e in state.feed(record("t", 3, kind="service.health"))] == ["service.registered"]  # new to it
    gone = {"type": "service.deregistered", "revision": 8, "service_id": "s", "reason": "expired"}
    assert [(e.type, e.reason) for e in state.feed(gone)] == [("service.deregistered", "expired")]
    assert state.feed(gone) == []
    assert state.feed(record("s", 7, kind="service.health")) == []  # a straggler from before the removal
    assert [e.type for e in state.feed(record("s", 9))] == ["service.registered"]  # registered again
    assert state.feed({"type": "service.deregistered", "revision": 10, "service_id": "nobody"}) == []


def test_a_snapshot_is_applied_whatever_its_revisions_say():
    """Today's registry can show a lapse (or a recovery) in a snapshot under a revision the watcher already
    has, and a Redis that lost its data restarts the counter: the snapshot is the state when it was read."""
    state = WatchState()
    state.connected()
    state.feed(record("s", 9))
    state.feed(BARRIER)
    state.connected()
    state.feed(record("s", 9, "unhealthy"))  # same revision, other health
    assert [(e.type, e.resync) for e in state.feed(BARRIER)] == [("service.health", True)]
    state.connected()
    state.feed(record("s", 2, "unhealthy"))  # the counter restarted
    assert state.feed(BARRIER) == []  # nothing changed for the consumer...
    assert [e.revision for e in state.feed(record("s", 3, "healthy", "service.health"))] == [3]  # ...nor is stuck


def test_a_refused_watch_raises_a_typed_error(server, key):
    with pytest.raises(Unauthorized):
        next(iter(Registry(server.url, "not-a-token").watch_services("a")))
    with pytest.raises(InvalidRequest):
        next(iter(Registry(server.url, key).watch_services("not an identifier")))


# --- asyncio ---------------------------------------------------------------------------------


def test_aio_watch_snapshot_changes_and_resync(live, key):
    followed, other = live(), live()
    register_raw(other.url, key, "x", "n")
    register_raw(other.url, key, "y", "n")

    async def scenario() -> list[WatchEvent]:
        events: list[WatchEvent] = []
        reg = conveyor_aio.Registry(followed.url, key, timeout=5)
        async with reg.watch_services("n") as watch:

            async def consume() -> None:
                async for event in watch:
                    events.append(event)

            async def until(count: int) -> None:
                while len(events) < count:
                    await asyncio.sleep(0.05)

            task = asyncio.create_task(consume())
            await until(2)
            await asyncio.to_thread(heartbeat, other.url, key, "x", "unhealthy")
            await until(3)
            await asyncio.to_thread(followed.stop)
            await asyncio.to_thread(lambda: rest(other.url, key).delete("/services/y/").raise_for_status())
            await asyncio.to_thread(followed.start)
            await until(4)
            assert watch.connects == 2
        await asyncio.wait_for(task, 5)  # closing ended the iteration
        return events

    events = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert brief(events) == [
        ("service.registered", "x", "healthy", False),
        ("service.registered", "y", "healthy", False),
        ("service.health", "x", "unhealthy", False),
        ("service.deregistered", "y", "absent", True),
    ]
