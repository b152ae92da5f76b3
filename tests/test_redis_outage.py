"""Redis outages with real redis-server processes: a crash and restart from an old snapshot, a pause past a lease,
a FLUSHALL. In each, a service or member that resumes heartbeating within its grace is not removed, the grace is
bounded (one that never comes back is still removed after it), and a Redis that stayed up grants no grace at all."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
import time_machine
from django.conf import settings

from groups.models import GroupMember
from groups.tasks import expire_once
from registry import outage
from registry.models import LeaseStoreState, Service
from registry.redis_client import reset_clients
from registry.tasks import cleanup_once
from registry_project.embedded_redis import RedisServer
from tests.conftest import service_body

pytestmark = pytest.mark.django_db

T0 = datetime(2026, 9, 1, 12, 0, 0, tzinfo=UTC)
LEASE = 10


@pytest.fixture
def store(redis_server: RedisServer) -> Iterator[RedisServer]:
    """A redis-server of this test's own, as the lease store, with short command timeouts.

    No automatic persistence: a test writes the snapshot it wants with SAVE, and a restart loads
    whatever dump.rdb is in the data directory then."""
    server = RedisServer().start()
    saved = settings.REDIS_URL, settings.REDIS_SOCKET_TIMEOUT_MS
    settings.REDIS_URL, settings.REDIS_SOCKET_TIMEOUT_MS = server.url, 300
    reset_clients()
    outage.reset_note_throttle()
    yield server
    settings.REDIS_URL, settings.REDIS_SOCKET_TIMEOUT_MS = saved
    reset_clients()
    server.stop()


@pytest.fixture
def clock() -> Iterator[time_machine.Coordinates]:
    with time_machine.travel(T0, tick=False) as traveller:
        yield traveller


def at(clock: time_machine.Coordinates, seconds: float) -> None:
    clock.move_to(T0 + timedelta(seconds=seconds))


def register(api, service_id: str) -> None:
    body = service_body(service_id, lease_duration=LEASE, deregister_after=0)
    assert api.post("/api/v1/services/", body, format="json").status_code == 201


def join(api, member_id: str) -> None:
    body = {"member_id": member_id, "service_name": "orders-consumer", "topics": ["orders"], "session_timeout": LEASE}
    assert api.post("/api/v1/groups/g1/members/", body, format="json").status_code == 201


def member_beat(api, member_id: str) -> int:
    epoch = GroupMember.objects.filter(group_id="g1", member_id=member_id).values_list("member_epoch", flat=True)
    body = {"generation": 0, "member_epoch": epoch.first() or 1}
    response = api.post(f"/api/v1/groups/g1/members/{member_id}/heartbeat/", body, format="json")
    return response.status_code


def run_jobs() -> list[str]:
    """What the leader runs every few seconds: lease cleanup, then member expiry. Returns the services removed."""
    removed = cleanup_once()
    expire_once()
    return removed


def registered() -> set[str]:
    return set(Service.objects.values_list("pk", flat=True))


def members() -> set[str]:
    return set(GroupMember.objects.values_list("member_id", flat=True))


@pytest.fixture
def fleet(store: RedisServer, api, heartbeat, owner, clock) -> dict:
    """At T0: 'keeps' (will keep heartbeating), 'quiet' (never heartbeats again), member 'm1'; the leader's
    first run has seen this Redis, so from here on only a real discontinuity grants grace."""
    register(api, "keeps")
    register(api, "quiet")
    join(api, "m1")
    run_jobs()
    assert LeaseStoreState.objects.get().run_id
    assert outage.ensure_continuity(datetime.now(UTC)) == []
    return {"heartbeat": heartbeat, "key": owner[1]}


def test_a_continuous_redis_grants_no_grace_and_lapsed_services_are_removed(fleet, clock):
    at(clock, LEASE + 1)
    assert fleet["heartbeat"]("keeps", fleet["key"])[0] == 200
    assert set(run_jobs()) == {"quiet"}
    assert registered() == {"keeps"}
    assert members() == set()  # m1 never heartbeated: its session ran out


def test_restart_from_an_old_snapshot_removes_nobody_who_kept_heartbeating(fleet, store, api, clock):
    store.client().save()  # the snapshot: every deadline is T0 + 10 s
    snapshot = store.dir / "dump.rdb"
    shutil.copy(snapshot, store.dir / "old.rdb")
    at(clock, 6)
    assert fleet["heartbeat"]("keeps", fleet["key"])[0] == 200  # deadline T0 + 16 s, not in the snapshot
    assert member_beat(api, "m1") == 200

    store.kill()
    shutil.copy(store.dir / "old.rdb", snapshot)
    at(clock, 8)
    assert fleet["heartbeat"]("keeps", fleet["key"])[0] == 503  # refused while Redis is down
    store.start()  # back with the old snapshot: 'keeps' and m1 read as lapsed at T0 + 10 s

    at(clock, 12)
    assert run_jobs() == []  # grace: everything lives until T0 + 22 s
    assert registered() == {"keeps", "quiet"} and members() == {"m1"}
    at(clock, 15)
    assert fleet["heartbeat"]("keeps", fleet["key"])[0] == 200
    assert member_beat(api, "m1") == 200

    at(clock, 23)  # past the grace: only what came back is still here
    assert run_jobs() == ["quiet"]
    assert registered() == {"keeps"} and members() == {"m1"}


def test_restart_without_any_failed_request_is_still_noticed_by_its_run_id(fleet, store, api, clock):
    store.client().save()
    store.kill()
    store.start()  # nobody tried Redis while it was down: only the run_id tells
    at(clock, LEASE + 2)
    assert run_jobs() == []
    assert registered() == {"keeps", "quiet"} and members() == {"m1"}
    assert fleet["heartbeat"]("keeps", fleet["key"])[0] == 200 and member_beat(api, "m1") == 200


def test_a_pause_past_the_lease_removes_nobody_who_kept_trying(fleet, store, api, clock):
    store.pause()
    try:
        at(clock, LEASE + 2)  # past every lease
        assert fleet["heartbeat"]("keeps", fleet["key"])[0] == 503  # timed out against the paused server
        assert member_beat(api, "m1") == 503
    finally:
        store.resume()

    at(clock, LEASE + 3)  # same run_id, same data, deadlines in the past: only the noted outage tells
    assert run_jobs() == []
    assert registered() == {"keeps", "quiet"} and members() == {"m1"}
    at(clock, LEASE + 5)
    assert fleet["heartbeat"]("keeps", fleet["key"])[0] == 200 and member_beat(api, "m1") == 200

    at(clock, 2 * LEASE + 4)  # grace was LEASE + 3 .. 2 * LEASE + 3
    assert run_jobs() == ["quiet"]
    assert registered() == {"keeps"} and members() == {"m1"}


def test_flushall_restores_every_lease_and_session_with_grace(fleet, store, api, clock):
    store.client().flushall()
    at(clock, LEASE + 2)
    assert run_jobs() == []  # grace until 2 * LEASE + 2
    assert registered() == {"keeps", "quiet"} and members() == {"m1"}
    at(clock, LEASE + 5)
    assert fleet["heartbeat"]("keeps", fleet["key"])[0] == 200 and member_beat(api, "m1") == 200

    at(clock, 2 * LEASE + 3)
    assert run_jobs() == ["quiet"]
    assert registered() == {"keeps"} and members() == {"m1"}


def test_grace_is_granted_once_per_outage(fleet, store, clock):
    store.pause()
    try:
        at(clock, 1)
        assert fleet["heartbeat"]("keeps", fleet["key"])[0] == 503
    finally:
        store.resume()
    at(clock, 2)
    assert outage.ensure_continuity(datetime.now(UTC)) == [
        f"Redis was unreachable at {(T0 + timedelta(seconds=1)).isoformat()}"
    ]
    assert outage.ensure_continuity(datetime.now(UTC)) == []


def test_the_admin_shows_the_last_check_read_only(fleet, admin_client):
    state = LeaseStoreState.objects.get()
    page = admin_client.get(f"/admin/registry/leasestorestate/{state.pk}/change/")
    assert page.status_code == 200
    assert state.run_id in page.content.decode()
    assert b'name="_save"' not in page.content
    assert admin_client.get("/admin/registry/leasestorestate/add/").status_code == 403
