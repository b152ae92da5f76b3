"""Registrations arriving together are written in batches (registry.fast_register's batcher and
registry.leases.register_many), and each request still gets exactly its own answer: created, replaced,
refused for another token's service, refused as invalid, and duplicates of one id as if one after the other,
with every history row and every watcher's event there."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
import redis
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.core.signals import request_finished, request_started
from django.db import close_old_connections

from registry import leases
from registry.events import watch_groups
from registry.models import Service, ServiceEvent
from registry.redis_client import get_redis
from registry.serializers import RegisterSerializer

from .conftest import client_for, service_body

TIMES = ("lease_expires_at", "last_heartbeat", "registered_at")


def _post(key: str | None, body: Any) -> dict[str, Any]:
    headers = {"content-type": "application/json"}
    if key:
        headers["authorization"] = f"Bearer {key}"
    return {"content": json.dumps(body).encode(), "headers": headers}


def _storm(requests: list[dict[str, Any]]) -> tuple[list[httpx.Response], list[dict[str, Any]]]:
    """Send all ``requests`` at once through the whole ASGI app; their answers, and the events watchers got."""
    from registry_project.asgi import application

    async def run() -> tuple[list[httpx.Response], list[dict[str, Any]]]:
        layer = get_channel_layer()
        channel = await layer.new_channel()
        await layer.group_add(watch_groups(None)[0], channel)
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            answers = await asyncio.gather(*(client.post("/api/v1/services/", **r) for r in requests))
        received = []
        while True:
            try:
                message = await asyncio.wait_for(layer.receive(channel), timeout=1.0)
            except TimeoutError:
                break
            received.append(message["payload"])
        await layer.group_discard(watch_groups(None)[0], channel)
        return list(answers), received

    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    try:
        return async_to_sync(run)()
    finally:
        request_started.connect(close_old_connections)
        request_finished.connect(close_old_connections)


def _without_times(body: dict[str, Any]) -> dict[str, Any]:
    rest = {k: v for k, v in body.items() if k not in (*TIMES, "service_id")}
    rest["lease"] = {k: v for k, v in body["lease"].items() if k != "expires_at"}
    return rest


@pytest.mark.django_db(transaction=True)
def test_a_storm_of_mixed_registrations_gets_each_its_own_answer(make_token, monkeypatch):
    _owner, key = make_token("owner")
    _other, other_key = make_token("other")
    assert client_for(other_key).post("/api/v1/services/", service_body("theirs"), format="json").status_code == 201
    assert client_for(key).post("/api/v1/services/", service_body("mine"), format="json").status_code == 201
    Service.objects.filter(pk="mine").update(drained=True)  # an operator's drain outlives the re-registration

    requests = [_post(key, service_body(f"new-{i}", endpoint=f"10.0.1.{i + 1}:9000")) for i in range(24)]
    requests += [
        _post(key, service_body("mine", endpoint="10.9.9.9:1")),  # replaced: 200
        _post(key, service_body("theirs")),  # another token's: 403
        _post(key, service_body("bad", service_type="pump")),  # invalid: 400 naming the field
        _post("not-a-token", service_body("nobody")),  # 401
        *(_post(key, service_body("dup", endpoint=f"10.0.2.{i + 1}:9000")) for i in range(3)),
    ]
    sizes: list[int] = []
    register_many = leases.register_many

    def counted(batch: Any, now: Any) -> Any:
        sizes.append(len(batch))
        return register_many(batch, now)

    monkeypatch.setattr(leases, "register_many", counted)
    answers, received = _storm(requests)
    monkeypatch.undo()
    assert max(sizes) > 1 and sum(sizes) == 24 + 2 + 3  # written in batches; the 400 and 401 never got there
    statuses = [a.status_code for a in answers]

    assert statuses[:24] == [201] * 24
    assert statuses[24:28] == [200, 403, 400, 401]
    assert sorted(statuses[28:]) == [200, 200, 201]
    assert answers[25].json() == {"detail": "service 'theirs' is registered by another token"}
    assert "service_type" in answers[26].json()
    mine = answers[24].json()
    assert (mine["endpoint"], mine["drained"], mine["weight"], mine["owner"]) == ("10.9.9.9:1", True, 0, "owner")

    # The same body the view answers for the same registration.
    view = client_for(key).post("/api/v1/services/", service_body("by-view", endpoint="10.0.1.1:9000"), format="json")
    assert view.status_code == 201
    assert _without_times(answers[0].json()) == _without_times(view.json())

    # Every registration is in the database, with its labels and its history row.
    assert Service.objects.filter(pk__startswith="new-").count() == 24
    assert set(Service.objects.get(pk="new-3").label_rows.values_list("key", "value")) == {
        ("env", "prod"),
        ("zone", "a"),
    }
    assert not Service.objects.filter(pk__in=["bad", "nobody"]).exists()
    assert Service.objects.get(pk="theirs").owner.name == "other"
    kinds = ServiceEvent.objects.filter(service_id="dup").order_by("id").values_list("kind", flat=True)
    assert list(kinds) == ["registered", "re-registered", "re-registered"]
    final = {a.json()["endpoint"] for a in answers[28:]}
    assert Service.objects.get(pk="dup").endpoint in final
    assert ServiceEvent.objects.filter(service_id__startswith="new-", kind="registered").count() == 24
    assert ServiceEvent.objects.filter(service_id="theirs").count() == 1

    # A watcher got one service.registered per registration written, with the revision of its history row.
    registered = [m for m in received if m["type"] == "service.registered"]
    assert len(registered) == 24 + 1 + 3
    history = {
        (e.service_id, e.revision) for e in ServiceEvent.objects.filter(kind__in=["registered", "re-registered"])
    }
    assert {(m["service_id"], m["revision"]) for m in registered} <= history
    dup_revisions = [m["revision"] for m in registered if m["service_id"] == "dup"]
    assert dup_revisions == sorted(dup_revisions) and len(set(dup_revisions)) == 3


def test_register_many_refuses_only_the_foreign_service_and_writes_the_rest(make_token):
    from django.utils import timezone

    owner, _ = make_token("owner")
    other, _ = make_token("other")
    leases.register(_valid(service_body("theirs")), other, timezone.now())
    outcomes = leases.register_many(
        [
            (_valid(service_body("a")), owner),
            (_valid(service_body("theirs")), owner),
            (_valid(service_body("b")), owner),
        ],
        timezone.now(),
    )
    assert isinstance(outcomes[1], leases.NotOwner)
    assert [o[1] for o in (outcomes[0], outcomes[2])] == [True, True]  # type: ignore[index]
    assert set(Service.objects.values_list("pk", flat=True)) == {"a", "b", "theirs"}
    with pytest.raises(ValueError):
        leases.register_many([(_valid(service_body("a")), owner), (_valid(service_body("a")), owner)], timezone.now())


def _valid(body: dict[str, Any]) -> dict[str, Any]:
    serializer = RegisterSerializer(data=body)
    serializer.is_valid(raise_exception=True)
    return dict(serializer.validated_data)


@pytest.fixture
def own_store(redis_server: Any) -> Any:
    """A redis-server of this test's own as the lease store, with short command timeouts, to stop."""
    from django.conf import settings

    from registry import outage
    from registry.redis_client import reset_clients
    from registry_project.embedded_redis import RedisServer

    server = RedisServer().start()
    saved = settings.REDIS_URL, settings.REDIS_SOCKET_TIMEOUT_MS
    settings.REDIS_URL, settings.REDIS_SOCKET_TIMEOUT_MS = server.url, 300
    reset_clients()
    outage.reset_note_throttle()
    yield server
    settings.REDIS_URL, settings.REDIS_SOCKET_TIMEOUT_MS = saved
    reset_clients()
    server.stop()


def test_a_batch_that_fails_fails_every_request_in_it_as_the_view_does_and_writes_nothing(
    make_token, own_store, monkeypatch
):
    _owner, key = make_token("owner")
    own_store.stop()
    view = client_for(key).post("/api/v1/services/", service_body("by-view"), format="json")
    sizes: list[int] = []
    register_many = leases.register_many

    def counted(batch: Any, now: Any) -> Any:
        sizes.append(len(batch))
        return register_many(batch, now)

    monkeypatch.setattr(leases, "register_many", counted)
    answers, _received = _storm([_post(key, service_body(f"new-{i}")) for i in range(6)])
    assert sum(sizes) == 6 and max(sizes) > 1  # the batches answered, not the view
    assert view.status_code == 503
    assert [a.status_code for a in answers] == [503] * 6
    assert all(a.json() == view.json() for a in answers)
    assert all(a.headers["retry-after"] == "1" for a in answers)
    assert not Service.objects.exists()
    assert not ServiceEvent.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_answers_not_remembered_after_the_commit_are_still_the_registrations_answers(make_token, monkeypatch):
    """The Redis step after the commit fails: the registrations committed, so they are answered 201 and
    their events sent; the next unchanged re-registration is written through the database (no snapshot),
    and the one after that renews without a write again."""
    from registry import fast_register, reregister

    _owner, key = make_token("owner")
    real = fast_register.get_async_redis
    failed: list[int] = []

    class RememberFails:
        def __init__(self, client: Any) -> None:
            self.client = client

        def __getattr__(self, name: str) -> Any:
            return getattr(self.client, name)

        async def eval(self, script: str, *args: Any) -> Any:
            if script == reregister.REMEMBER_MANY_LUA:
                failed.append(1)
                raise redis.ConnectionError("lost after the commit")
            return await self.client.eval(script, *args)

    monkeypatch.setattr(fast_register, "get_async_redis", lambda: RememberFails(real()))
    bodies = [service_body(f"svc-{i}", endpoint=f"10.0.3.{i + 1}:9000") for i in range(6)]
    answers, received = _storm([_post(key, body) for body in bodies])
    monkeypatch.undo()
    assert failed
    assert [a.status_code for a in answers] == [201] * 6
    assert Service.objects.filter(pk__startswith="svc-").count() == 6
    assert len([m for m in received if m["type"] == "service.registered"]) == 6
    assert not get_redis().hget(reregister.snap_key(), "svc-0")

    again, _ = _storm([_post(key, body) for body in bodies])
    assert [a.status_code for a in again] == [200] * 6
    assert all(a.json()["endpoint"] == body["endpoint"] for a, body in zip(again, bodies, strict=True))
    kinds = ServiceEvent.objects.filter(service_id="svc-0").order_by("id").values_list("kind", flat=True)
    assert list(kinds) == ["registered", "re-registered"]  # the long way: written, and remembered this time

    third, _ = _storm([_post(key, body) for body in bodies])
    assert [a.status_code for a in third] == [200] * 6
    assert ServiceEvent.objects.filter(service_id__startswith="svc-").count() == 12  # no write


def test_rows_written_by_a_batch_read_back_as_given(make_token):
    """The batch's own INSERT statements (PostgreSQL) store each field as the ORM would: enum members as
    their values, JSON as JSON, datetimes as instants, None as NULL, the owner's id."""
    from django.utils import timezone

    from registry.models import Health, ServiceLabel

    owner, _ = make_token("owner")
    now = timezone.now()
    quoted = {"env": "prod", "note": 'it\'s "quoted" ; -- and \\ back'}
    data = _valid(service_body("rows", labels=quoted, group_id="g-1", weight=7, lease_duration=42))
    data["health"] = Health.DEGRADED  # an enum member, not a plain str
    leases.register_many([(data, owner), (_valid(service_body("plain")), owner)], now)

    row = Service.objects.get(pk="rows")
    assert (row.health, type(row.health)) == ("degraded", str)
    assert row.labels == quoted and row.group_id == "g-1" and row.owner_id == owner.pk
    assert (row.registered_weight, row.weight, row.lease_duration) == (7, 7, 42)
    assert abs((row.registered_at - now).total_seconds()) < 0.002
    assert row.lease_expires_at == row.registered_at + timezone.timedelta(seconds=42)
    assert Service.objects.get(pk="plain").group_id is None
    assert dict(ServiceLabel.objects.filter(service_id="rows").values_list("key", "value")) == quoted
    event = ServiceEvent.objects.get(service_id="rows")
    assert (event.kind, event.actor_kind, event.actor, event.revision) == (
        "registered",
        "token",
        "owner",
        row.effective_revision(now),
    )
    assert event.change["labels"] == [None, quoted] and event.change["health"] == [None, "degraded"]


def test_a_batch_waits_for_as_many_registrations_as_were_lately_in_flight_and_no_longer(monkeypatch):
    """Clients answered by one batch come back while the next would start: it waits for them (up to
    LINGER), so a steady load makes whole batches, not alternating small ones. Fewer than expected still
    make their batch once LINGER is over, and a lone registration never waits."""
    from registry import fast_register

    sizes: list[int] = []

    def run_batch(jobs: list[fast_register.Job], now: Any) -> fast_register.Done:
        sizes.append(len(jobs))
        return fast_register.Done([fast_register.Answer(201, {"id": j.service_id}, []) for j in jobs], [], [])

    monkeypatch.setattr(fast_register, "run_batch", run_batch)

    def job(i: int) -> fast_register.Job:
        return fast_register.Job({"service_id": f"svc-{i}"}, "key-hash", "digest")

    async def late(batcher: fast_register.RegistrationBatcher, i: int) -> Any:
        for _turn in range(5):
            await asyncio.sleep(0)
        return await batcher.submit(job(i))

    async def scenario() -> None:
        alone = fast_register.RegistrationBatcher()
        assert (await alone.submit(job(0))).body == {"id": "svc-0"}  # (LINGER is a minute here)
        batcher = fast_register.RegistrationBatcher()
        answers = await asyncio.gather(*(batcher.submit(job(i)) for i in range(4)))  # four in flight at once
        assert [a.body["id"] for a in answers] == [f"svc-{i}" for i in range(4)]
        await asyncio.gather(*(batcher.submit(job(i)) for i in range(10, 13)), late(batcher, 13))
        assert batcher.in_flight == 0
        fast_register.LINGER = 0.01
        await asyncio.gather(*(batcher.submit(job(i)) for i in range(20, 23)))  # the fourth never comes

    monkeypatch.setattr(fast_register, "LINGER", 60.0)
    asyncio.run(scenario())
    assert sizes == [1, 4, 4, 3]


def _fields_of(obj: Any) -> list[tuple[str, type, Any]]:
    return [(f.attname, type(getattr(obj, f.attname)), getattr(obj, f.attname)) for f in obj._meta.concrete_fields]


def test_rows_a_batch_reads_are_what_the_raw_queryset_reads(make_token):
    """``leases.select_rows`` (the batch's locking read and token read) builds the same instances as
    ``Model.objects.raw`` of the same statement: every field's value and type (JSON decoded, datetimes
    aware, NULLs None), marked as loaded from the database."""
    from django.db import connection
    from django.utils import timezone

    from registry import fast_register
    from registry.models import ApiToken

    owner, _ = make_token("owner")
    staff, _ = make_token("staff", staff=True)
    gone, _ = make_token("gone")
    gone.is_active = False
    gone.save()
    now = timezone.now()
    labels = {"env": "prod", "note": 'ü "q" ;', "e": ""}
    leases.register_many(
        [
            (_valid(service_body("read-1", labels=labels, group_id="g-1", weight=7, health="degraded")), owner),
            (_valid(service_body("read-2", labels={})), staff),
        ],
        now,
    )
    Service.objects.filter(pk="read-2").update(owner=None, operator_weight=3, drained=True)
    ids = ["read-1", "read-2", "absent"]

    rows = leases._locked_rows(ids)
    quote = connection.ops.quote_name
    table = quote(Service._meta.db_table)
    expected = list(Service.objects.raw(f"SELECT * FROM {table} WHERE service_id IN (%s, %s, %s) ORDER BY 1", ids))
    assert [_fields_of(r) for r in rows] == [_fields_of(r) for r in expected]
    assert rows[0].labels == labels and rows[1].owner_id is None and rows[1].drained is True
    assert all(not r._state.adding and r._state.db == "default" for r in rows)

    tokens = fast_register._active_tokens({owner.key_hash, staff.key_hash, gone.key_hash, "no-such-token"})
    found = ApiToken.objects.filter(key_hash__in=[owner.key_hash, staff.key_hash, gone.key_hash], is_active=True)
    assert sorted(map(_fields_of, tokens)) == sorted(map(_fields_of, found))
    assert {t.name for t in tokens} == {"owner", "staff"}


def test_the_batch_insert_stores_what_bulk_create_stores(make_token):
    """``leases._insert_rows`` (on PostgreSQL one statement of literals) stores every column of every row
    as the ORM's ``bulk_create`` of the same instances does: JSON, enum members, aware datetimes in any
    zone, NULLs, quotes and backslashes, non-ASCII text."""
    from datetime import timedelta
    from datetime import timezone as dt_timezone

    from django.utils import timezone

    from registry.models import Health, ServiceLabel

    owner, _ = make_token("owner")
    at = timezone.now().astimezone(dt_timezone(timedelta(hours=5, minutes=30)))
    odd = 'it\'s "q" \\ ; -- ü 日本 %s %(x)s'

    def rows(prefix: str) -> tuple[list[Service], list[ServiceLabel], list[ServiceEvent]]:
        services = [
            Service(
                service_id=f"{prefix}-a",
                service_name="name",
                service_type="source",
                endpoint="[::1]:80",
                labels={"k": odd, "e": "", "n": "1"},
                health=Health.DEGRADED,
                group_id=None,
                registered_weight=0,
                weight=0,
                lease_duration=1,
                deregister_after=0,
                registered_at=at,
                lease_expires_at=at + timedelta(seconds=1),
                owner=owner,
                revision=2**40,
                recoveries_seen=3,
            ),
            Service(
                service_id=f"{prefix}-b",
                service_name="b",
                service_type="sink",
                endpoint="h:1",
                labels={},
                group_id="g.1:x",
                registered_weight=1000,
                lease_duration=3600,
                deregister_after=86400,
                registered_at=at,
                lease_expires_at=at,
                owner=None,
            ),
        ]
        labels = [
            ServiceLabel(service=services[0], service_name=services[0].service_name, key=k, value=v)
            for k, v in services[0].labels.items()
        ]
        events = [
            ServiceEvent(
                service_id=s.service_id,
                service_name=s.service_name,
                kind="registered",
                at=at,
                actor_kind="token",
                actor=odd,
                change={"labels": [None, s.labels], "weight": [None, 0], "x": [True, None, 1.5, odd]},
                revision=7,
            )
            for s in services
        ]
        events[1].change = odd  # a JSON string (Django writes it as JSON, not as text)
        return services, labels, events

    services, labels, events = rows("fast")
    leases._insert_rows((Service, services), (ServiceLabel, labels), (ServiceEvent, events))
    services, labels, events = rows("orm")
    Service.objects.bulk_create(services)
    ServiceLabel.objects.bulk_create(labels)
    ServiceEvent.objects.bulk_create(events)

    def stored(prefix: str) -> list[Any]:
        out: list[Any] = []
        for model, lookup, order in (
            (Service, "service_id__startswith", "service_id"),
            (ServiceLabel, "service__service_id__startswith", "key"),
            (ServiceEvent, "service_id__startswith", "service_id"),
        ):
            for row in model.objects.filter(**{lookup: prefix}).order_by(order).values():
                out.append({k: v.removeprefix(prefix) if k == "service_id" else v for k, v in row.items() if k != "id"})
        return out

    assert stored("fast") == stored("orm")
    assert len(stored("fast")) == 2 + 3 + 2
