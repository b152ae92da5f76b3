"""Registering, renewing, deregistering and expiring services.

``register``, ``deregister`` and ``record_health`` change the database row and its Redis lease
entry together, under the row lock, so readers and the cleanup job never see one without the
other for longer than a crash window that ``reconcile`` repairs. ``register_many`` registers a batch in one
transaction with the same rules (``register`` is a batch of one). ``heartbeat_flow`` is the
heartbeat protocol written once, as a sequence of steps that a sync driver (the DRF view) or
an async driver (the ASGI fast path) executes.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import weakref
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import redis
from django.conf import settings
from django.db import IntegrityError, connection, connections, transaction
from django.db.models import AutoField, Field, JSONField, Max, Model
from django.utils import timezone
from psycopg.adapt import Transformer

from . import events, lease_store, lifecycle, reregister, revisions
from .errors import Forbidden, NotFound
from .lifecycle import Actor, Kind
from .models import ApiToken, Health, Service, ServiceEvent, ServiceLabel, hash_token
from .redis_client import get_redis
from .signals import services_removed

log = logging.getLogger(__name__)

# A transaction factory: transaction.atomic, or a leader's fenced transaction (registry.leadership).
Guard = Callable[[], AbstractContextManager[Any]]


class ServiceNotFound(NotFound):
    """No service is registered under this id (never was, deregistered, or expired)."""


class NotOwner(Forbidden):
    """The token may not change this service: it did not create it and is not staff."""


def _restore_lease_entry(r: redis.Redis, service: Service, deadline_ms: int) -> None:
    """Recreate a missing Redis entry from the row (only where there is none). Its recovery count starts
    a jump above the row's, so the revision never goes back (registry.revisions)."""
    lease_store.put(
        r,
        service.service_id,
        deadline_ms=deadline_ms,
        lease_seconds=service.lease_duration,
        deregister_after=service.deregister_after,
        owner_id=service.owner_id,
        health=service.health,
        only_if_absent=True,
        restored_recoveries=service.recoveries_seen + revisions.RESTORE_JUMP,
    )


def _new_revision(r: redis.Redis, service: Service, *, existing: bool = True) -> None:
    """Give a persisted change of ``service`` (row locked, not yet saved) its revision (registry.revisions)."""
    stored, seen = (service.revision, service.recoveries_seen) if existing else (0, 0)
    # Taking it also forgets the service's unchanged-registration snapshot (registry.reregister).
    service.revision, service.recoveries_seen = reregister.take_revision(r, service.service_id, stored, seen)
    service.live_recoveries = service.recoveries_seen


def _removal_revision(r: redis.Redis, service_id: str, stored: int, seen: int) -> int:
    """The revision of the event that a service was removed (row locked, Redis entry not yet removed)."""
    return revisions.removal_revision(reregister.take_revision(r, service_id, stored, seen, removal=True)[0])


def renew_unchanged(
    service_id: str, request_digest: str, health: str, token: ApiToken, now: datetime
) -> dict[str, Any] | None:
    """Re-register ``service_id`` without a write if the request is the one it last registered with
    (registry.reregister): the lease is renewed from ``now`` and the answer is what a registration
    would answer. None: it is not (or may not be) unchanged; register it."""
    r = get_redis()
    args = reregister.renew_args(service_id, request_digest, lease_store.to_ms(now), health)
    for _attempt in range(2):
        keys = [*reregister.renew_keys(), reregister.token_key(token.key_hash)]
        reply = r.eval(reregister.RENEW_UNCHANGED_LUA, len(keys), *keys, *args)
        code = reply[0].decode()
        if code == "OK":
            return reregister.unchanged_body(reply[2], int(reply[1]))
        if code != "TOKEN_MISS":
            return None
        lease_store.cache_token(r, token.key_hash, token.pk, token.is_staff)  # authenticated just now
    return None


def remember_registration(service: Service, request_digest: str, body: dict[str, Any]) -> None:
    """After a registration committed: let the same request again renew like a heartbeat (registry.reregister)."""
    reregister.remember(get_redis(), service.service_id, service.revision, request_digest, service.owner_id, body)


def register(data: dict[str, Any], token: ApiToken, now: datetime) -> tuple[Service, bool]:
    """Register ``data['service_id']`` or re-register it (same owner, or a staff token).

    Returns the service and whether it was created. A re-registration replaces every field
    given, resets the lease from ``now`` and keeps ``registered_at`` and the owner.
    ``register_many`` of one: both front doors share the rules.
    """
    outcome = register_many([(data, token)], now)[0]
    if isinstance(outcome, NotOwner):
        raise outcome
    return outcome


# What one registration of a batch came to: the service and whether it was created, or the refusal.
Outcome = tuple[Service, bool] | NotOwner


@dataclass
class _Pending:
    """One registration of a batch on its way through ``_register_batch``."""

    data: dict[str, Any]
    token: ApiToken
    fields: dict[str, Any]
    deadline_ms: int
    service: Service | None = None
    created: bool = False
    before: dict[str, Any] | None = None
    relabel: bool = False  # its label rows are written again: its labels or its name (which they carry) change


def _fields(data: dict[str, Any], now: datetime) -> tuple[dict[str, Any], int]:
    """The row fields a registration sets (defaults filled in) and its lease deadline."""
    lease = data.get("lease_duration") or settings.REGISTRY_DEFAULT_LEASE
    deregister_after = data.get("deregister_after")
    if deregister_after is None:
        deregister_after = settings.REGISTRY_DEREGISTER_AFTER
    deadline_ms = lease_store.to_ms(now) + lease * 1000
    return {
        "service_name": data["service_name"],
        "service_type": data["service_type"],
        "endpoint": data["endpoint"],
        "labels": data.get("labels") or {},
        "health": data.get("health") or Health.HEALTHY,
        "group_id": data.get("group_id") or None,
        "registered_weight": 100 if data.get("weight") is None else data["weight"],
        "lease_duration": lease,
        "deregister_after": deregister_after,
        "lease_expires_at": lease_store.from_ms(deadline_ms),
    }, deadline_ms


def register_many(batch: Sequence[tuple[dict[str, Any], ApiToken]], now: datetime) -> list[Outcome]:
    """Register a batch of (validated data, token), each id at most once, in ONE transaction: the rows of
    all its ids locked and read in one query, services, labels and history rows written in bulk, the
    revisions and lease entries taken in one Redis step each. Each registration gets the outcome it would
    get alone (a foreign service: its ``NotOwner``, the rest unaffected); an error fails the whole batch,
    with nothing written."""
    ids = [data["service_id"] for data, _token in batch]
    if len(set(ids)) != len(ids):
        raise ValueError("a batch of registrations takes each service id at most once")
    r = get_redis()
    now = lease_store.from_ms(lease_store.to_ms(now))  # the lease store keeps milliseconds
    prepared = [(data, token, *_fields(data, now)) for data, token in batch]
    for attempt in range(3):
        try:
            with _sqlite_writer_turn():
                return _register_batch(r, [_Pending(*p) for p in prepared], now)
        except IntegrityError:
            # First registrations of an id raced (there was no row to lock); the batch that lost
            # now finds the winner's row, locks it and re-registers over it.
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


_writer_locks: dict[str, tuple[threading.Lock, int]] = {}


@contextmanager
def _sqlite_writer_turn() -> Iterator[None]:
    """On SQLite, wait for this registration's turn to write in a queue (a lock file beside the database)
    instead of in SQLite's busy handler, which polls with sleeps of up to 100 ms: under a storm of
    registrations from several server processes that starves some writers for seconds. Other databases
    lock the row and need nothing here."""
    name = str(connection.settings_dict["NAME"])
    if connection.vendor != "sqlite" or connection.in_atomic_block or name.startswith((":memory:", "file:")):
        yield
        return
    path = f"{name}.writer-lock"
    if path not in _writer_locks:
        _writer_locks.setdefault(path, (threading.Lock(), os.open(path, os.O_RDWR | os.O_CREAT, 0o600)))
    lock, fd = _writer_locks[path]
    with lock:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)


def _register_batch(r: redis.Redis, batch: list[_Pending], now: datetime) -> list[Outcome]:
    outcomes: list[Outcome | None] = [None] * len(batch)
    with transaction.atomic():
        ids = [p.data["service_id"] for p in batch]
        # In key order, as every multi-row lock here is taken: two batches never wait on each other in a cycle.
        rows = {s.service_id: s for s in _locked_rows(ids)}
        work: list[_Pending] = []
        for index, p in enumerate(batch):
            service = rows.get(p.data["service_id"])
            if service is None:
                p.created = True
                p.before = {}
                service = Service(service_id=p.data["service_id"], registered_at=now, owner=p.token, **p.fields)
            else:
                if not p.token.may_change(service):
                    outcomes[index] = NotOwner(f"service {service.service_id!r} is registered by another token")
                    continue
                p.before = lifecycle.snapshot(service)
                p.relabel = service.labels != p.fields["labels"] or service.service_name != p.fields["service_name"]
                for name, value in p.fields.items():
                    setattr(service, name, value)
            service.weight = service.weight_in_effect()  # an operator's drain or weight outlives the restart
            p.service = service
            work.append(p)
        if not work:
            return [o for o in outcomes if o is not None]
        services = [p.service for p in work if p.service is not None]
        # Revisions for every change in one step (each also forgets the id's unchanged-registration snapshot).
        changes = [
            (s.service_id, 0 if p.created else s.revision, 0 if p.created else s.recoveries_seen)
            for p, s in zip(work, services, strict=True)
        ]
        for service, (taken, recoveries) in zip(services, reregister.take_revisions(r, changes), strict=True):
            service.revision, service.recoveries_seen = taken, recoveries
            service.live_recoveries = recoveries
            service.live_expires_at = service.lease_expires_at
        created = [p.service for p in work if p.created and p.service is not None]
        replaced = [p.service for p in work if not p.created and p.service is not None]
        if replaced:
            Service.objects.bulk_update(replaced, [*_FIELDS, "weight", "revision", "recoveries_seen"])
        relabelled = [p.service for p in work if p.relabel and p.service is not None]
        if relabelled:
            ServiceLabel.objects.filter(service__in=[s.service_id for s in relabelled]).delete()
        # New rows, their labels and every registration's history row in one step.
        _insert_rows(
            (Service, created),
            (
                ServiceLabel,
                [
                    ServiceLabel(service=s, service_name=s.service_name, key=k, value=v)
                    for s in [*created, *relabelled]
                    for k, v in s.labels.items()
                ],
            ),
            (
                ServiceEvent,
                [
                    lifecycle.event(
                        p.service,
                        Kind.REGISTERED if p.created else Kind.REREGISTERED,
                        Actor.token(p.token),
                        {
                            **lifecycle.diff(p.before or {}, lifecycle.snapshot(p.service)),
                            "lease_expires_at": [None, _iso(p.deadline_ms)],
                        },
                        now,
                        p.service.effective_revision(now),
                    )
                    for p in work
                    if p.service is not None
                ],
            ),
        )
        # After the inserts: a first registration that loses a race must not touch the winner's entry.
        _put_leases(r, [(p.service, p.deadline_ms) for p in work if p.service is not None])
        counts = {"registrations": len(created), "reregistrations": len(replaced)}
        transaction.on_commit(lambda: _count(r, counts))
        events.services_registered([(p.service, (p.before or {}).get("service_name")) for p in work if p.service])
    for index, p in enumerate(batch):
        if outcomes[index] is None and p.service is not None:
            outcomes[index] = (p.service, p.created)
    return [o for o in outcomes if o is not None]


def _locked_rows(ids: list[str]) -> list[Service]:
    """``Service.objects.select_for_update().filter(pk__in=ids).order_by("pk")``, as a raw query: the ORM's
    compilation of that statement cost more than the database's answer to it."""
    if not ids:
        return []
    lock = " FOR UPDATE" if connection.features.has_select_for_update else ""
    quote = connection.ops.quote_name
    where = f"WHERE {quote('service_id')} IN ({', '.join(['%s'] * len(ids))}) ORDER BY {quote('service_id')}{lock}"
    return select_rows(Service, where, ids)


# Per database connection and model: (index, converters, column) of each column whose value Django converts.
_Converters = list[tuple[int, list[Callable[..., Any]], Any]]
_converters: weakref.WeakKeyDictionary[Any, dict[type[Model], _Converters]] = weakref.WeakKeyDictionary()


def select_rows(model: type[Model], where: str, params: Sequence[Any]) -> list[Any]:
    """``model.objects.raw(f"SELECT * FROM <its table> {where}", params)``: the same instances, each value
    through the same converters, without the raw queryset's machinery, which works out the columns, their
    fields and their converters anew at every call (more than the database's answer costs, for a batch)."""
    db = connections[connection.alias]  # the connection itself: each use of the proxy looks it up again
    fields = model._meta.concrete_fields
    quote = db.ops.quote_name
    sql = f"SELECT {', '.join(quote(f.column) for f in fields)} FROM {quote(model._meta.db_table)} {where}"
    with db.cursor() as cursor:
        cursor.execute(sql, params)
        rows = cursor.fetchall()
    known = _converters.setdefault(db, {})
    converters = known.get(model)
    if converters is None:
        converters = known[model] = []
        for index, f in enumerate(fields):
            column = f.get_col(model._meta.db_table)
            functions = db.ops.get_db_converters(column) + column.get_db_converters(db)
            if functions:
                converters.append((index, functions, column))
    out = []
    for row in rows:
        if converters:
            values = list(row)
            for index, functions, column in converters:
                for convert in functions:
                    values[index] = convert(values[index], column, db)
            row = values
        out.append(model.from_db(db.alias, None, row))
    return out


def _insert_rows(*groups: tuple[type[Model], list[Any]]) -> None:
    """``bulk_create`` of each group's rows (new instances of its model; an auto id is not read back), in
    the order given. On PostgreSQL ONE statement for all of them (each INSERT before the last a
    data-modifying WITH query: PostgreSQL runs every one to completion, and checks the foreign keys, which
    Django declares deferred, at commit), with the values Django prepares for each field written as the
    literals psycopg's client-side binding writes. Django's own statement there (INSERT ... SELECT * FROM
    UNNEST of one array per column) costs several times more to build and bind for the few dozen rows of
    a batch, and psycopg splits a statement of more than 50 parameters anew at every call."""
    groups = tuple((model, rows) for model, rows in groups if rows)
    if not groups:
        return
    if connection.vendor != "postgresql":
        for model, rows in groups:
            model.objects.bulk_create(rows)
        return
    db = connections[connection.alias]  # the connection itself: each use of the proxy looks it up again
    with db.cursor() as cursor:
        literal = Transformer.from_context(cursor.cursor).as_literal
        *first, last = [_insert_sql(model, rows, db, literal) for model, rows in groups]
        sql = "".join([f"WITH {', '.join(f'i{n} AS ({s})' for n, s in enumerate(first))} " if first else "", last])
        cursor.execute(sql)
    for _model, rows in groups:
        for obj in rows:
            obj._state.adding = False
            obj._state.db = db.alias


# Per model: its INSERT up to VALUES, and for each column its field, the attribute to read when the field's
# ``pre_save`` is Field's own (the attribute as it is; None: call it), and whether it is a JSON field.
_InsertPlan = tuple[str, list[tuple[Any, str | None, bool]]]
_insert_plans: dict[type[Model], _InsertPlan] = {}


def _insert_plan(model: type[Model], db: Any) -> _InsertPlan:
    plan = _insert_plans.get(model)
    if plan is None:
        fields = [f for f in model._meta.concrete_fields if not isinstance(f, AutoField)]
        quote = db.ops.quote_name
        head = f"INSERT INTO {quote(model._meta.db_table)} ({', '.join(quote(f.column) for f in fields)}) VALUES "
        columns = [
            (f, f.attname if type(f).pre_save is Field.pre_save else None, isinstance(f, JSONField)) for f in fields
        ]
        plan = _insert_plans[model] = (head, columns)
    return plan


def _insert_sql(model: type[Model], rows: list[Any], db: Any, literal: Callable[[Any], bytes]) -> str:
    """A multi-row INSERT of ``rows`` with every value written as a literal (psycopg's ``as_literal``): the
    value Django prepares for the field, or the value itself where Django would hand the driver it unchanged
    (None, a plain str, int or bool, an aware datetime; never a JSON field's: Django wraps those)."""
    head, columns = _insert_plan(model, db)
    values = []
    for obj in rows:
        row = []
        for f, attname, is_json in columns:
            value = getattr(obj, attname) if attname is not None else f.pre_save(obj, True)
            kind = type(value)
            if kind is str or kind is int or kind is bool or value is None:
                if is_json:
                    value = f.get_db_prep_save(value, db)
            elif kind is not datetime or value.tzinfo is None:
                value = f.get_db_prep_save(value, db)
            row.append(b"NULL" if value is None else literal(value))
        values.append(b"(" + b", ".join(row) + b")")
    return head + b", ".join(values).decode(db.connection.info.encoding)


# The row fields a registration sets (``_fields``).
_FIELDS = (
    "service_name",
    "service_type",
    "endpoint",
    "labels",
    "health",
    "group_id",
    "registered_weight",
    "lease_duration",
    "deregister_after",
    "lease_expires_at",
)


# ``lease_store.put`` of several services in one step. KEYS: deadline, removal, conf, health.
# ARGV: id, deadline_ms, removal_ms, conf, health; id, ...
PUT_MANY_LUA = """
for i = 1, #ARGV, 5 do
  redis.call('ZADD', KEYS[1], ARGV[i + 1], ARGV[i])
  redis.call('ZADD', KEYS[2], ARGV[i + 2], ARGV[i])
  redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 3])
  redis.call('HSET', KEYS[4], ARGV[i], ARGV[i + 4])
end
"""


def _put_leases(r: redis.Redis, entries: list[tuple[Service, int]]) -> None:
    """``lease_store.put`` of each registered service's whole lease entry, all in one script call."""
    k = lease_store.keys()
    args: list[str | int] = []
    for service, deadline_ms in entries:
        conf = lease_store.conf_value(service.lease_duration, service.deregister_after, service.owner_id)
        args += [service.service_id, deadline_ms, deadline_ms + service.deregister_after * 1000, conf, service.health]
    r.eval(PUT_MANY_LUA, 4, k.deadline, k.removal, k.conf, k.health, *args)


def _count(r: redis.Redis, counts: dict[str, int]) -> None:
    pipe = r.pipeline(transaction=False)
    for name, amount in counts.items():
        if amount:
            pipe.incrby(lease_store.keys().counter(name), amount)
    pipe.execute()


def _iso(ms: int) -> str:
    return lease_store.from_ms(ms).isoformat().replace("+00:00", "Z")


def deregister(service_id: str, actor: ApiToken | None, by: Actor | None = None) -> None:
    """Remove a service. ``actor`` None is an operator acting through the admin (already authorised);
    the history names ``by``, else the token, else the operator of the admin request."""
    r = get_redis()
    with transaction.atomic():
        service = Service.objects.select_for_update().filter(pk=service_id).first()
        if service is None:
            raise ServiceNotFound(f"no service is registered under the id {service_id!r}")
        if actor is not None and not actor.may_change(service):
            raise NotOwner(f"service {service_id!r} is registered by another token")
        revision = _removal_revision(r, service_id, service.revision, service.recoveries_seen)
        lease_store.remove(r, [service_id])
        service.delete()
        lifecycle.record(
            service_id,
            service.service_name,
            Kind.DEREGISTERED,
            by or (Actor.token(actor) if actor is not None else lifecycle.actor_or_operator(None)),
            lifecycle.diff(lifecycle.snapshot(service), {}),
            revision=revision,
        )
        transaction.on_commit(lambda: lease_store.incr(r, "deregistrations"))
        events.service_deregistered(service_id, service.service_name, "deregistered", revision)
        owners = {service_id: service.owner_id}
        transaction.on_commit(lambda: _announce_removed(owners, "deregistered"))


def _announce_removed(owners: dict[str, int | None], reason: str, now: datetime | None = None) -> None:
    services_removed.send(
        sender=Service, service_ids=list(owners), owners=owners, reason=reason, now=now or timezone.now()
    )


def _operator_change(
    service_ids: Sequence[str], change: Callable[[Service], None], kind: str, by: Actor | None = None
) -> int:
    """Apply an operator's ``change`` to each service under its row lock and recompute the weight in effect;
    watchers get a ``service.updated`` and the history a ``kind`` row by ``by`` (else the admin request's
    operator). Returns how many services changed."""
    actor = lifecycle.actor_or_operator(by)
    changed = 0
    with transaction.atomic():
        for service in Service.objects.select_for_update().filter(pk__in=list(service_ids)).order_by("pk"):
            before, old_weight = (service.drained, service.operator_weight), service.weight
            change(service)
            if (service.drained, service.operator_weight) == before:
                continue
            service.weight = service.weight_in_effect()
            _new_revision(get_redis(), service)
            service.save(update_fields=["drained", "operator_weight", "weight", "revision", "recoveries_seen"])
            attach_live_leases([service])
            now = timezone.now()
            lifecycle.record(
                service.service_id,
                service.service_name,
                kind,
                actor,
                lifecycle.diff(
                    {"drained": before[0], "operator_weight": before[1], "weight": old_weight},
                    {"drained": service.drained, "operator_weight": service.operator_weight, "weight": service.weight},
                ),
                at=now,
                revision=service.effective_revision(now),
            )
            events.service_updated(service)
            changed += 1
    return changed


def drain(service_ids: Sequence[str], by: Actor | None = None) -> int:
    """Take services out of selection (weight 0) until an operator undrains them, across re-registrations."""
    return _operator_change(service_ids, lambda s: setattr(s, "drained", True), Kind.DRAINED, by)


def undrain(service_ids: Sequence[str], by: Actor | None = None) -> int:
    """Put drained services back with the weight they had before (the operator's, else their own)."""
    return _operator_change(service_ids, lambda s: setattr(s, "drained", False), Kind.UNDRAINED, by)


def set_operator_weight(service_ids: Sequence[str], weight: int | None, by: Actor | None = None) -> int:
    """Override the services' own weight (None clears the override); kept across re-registrations."""
    return _operator_change(service_ids, lambda s: setattr(s, "operator_weight", weight), Kind.WEIGHT_CHANGED, by)


def attach_live_leases(services: Iterable[Service]) -> list[Service]:
    """Load the Redis deadlines and recovery counts of ``services`` (one round trip) so their effective
    health and revision are current."""
    services = list(services)
    live = lease_store.live_entries(get_redis(), [s.service_id for s in services])
    for service in services:
        ms, recoveries = live.get(service.service_id, (None, None))
        service.live_expires_at = lease_store.from_ms(ms) if ms is not None else None
        service.live_recoveries = recoveries
    return services


def lapsed_ids(now: datetime) -> list[str]:
    return lease_store.lapsed_ids(get_redis(), lease_store.to_ms(now))


def expire_lapsed(now: datetime, limit: int | None = None, guard: Guard = transaction.atomic) -> list[str]:
    """Remove up to ``limit`` services whose lease lapsed more than their ``deregister_after`` ago.

    Returns the ids removed (empty when there was nothing to do). ``guard`` makes the transaction;
    a leader passes one that fences it with its term. Redis is changed only after that transaction
    committed: a job whose fence fails at the last moment leaves every row and every Redis entry as
    it was. A heartbeat that renews a candidate before the rows are locked wins (the deadlines are
    read again under the row locks); one that lands between that check and the commit renews an
    entry whose row is gone, and that entry stays until ``reconcile`` drops it as an orphan, after
    which the heartbeat answers 404 and the client registers again.
    """
    r = get_redis()
    now_ms = lease_store.to_ms(now)
    candidates = lease_store.removal_candidates(r, now_ms, limit or settings.REGISTRY_CLEANUP_BATCH)
    if not candidates:
        return []
    with guard() as run:
        locked = list(
            Service.objects.select_for_update().filter(pk__in=candidates).order_by("pk").values_list("pk", flat=True)
        )
        deadlines = lease_store.removal_deadlines(r, locked)
        removed = [sid for sid in locked if deadlines.get(sid, now_ms - 1) < now_ms]
        owners = {}
        history = []
        actor = Actor.leader_job(run, "cleanup")
        for service in Service.objects.filter(pk__in=removed):
            sid = service.service_id
            revision = _removal_revision(r, sid, service.revision, service.recoveries_seen)
            events.service_deregistered(sid, service.service_name, "expired", revision)
            owners[sid] = service.owner_id
            lapsed_at = _iso(deadlines[sid] - service.deregister_after * 1000) if sid in deadlines else None
            change = {**lifecycle.diff(lifecycle.snapshot(service), {}), "lapsed_at": [lapsed_at, None]}
            history.append(lifecycle.event(service, Kind.EXPIRED, actor, change, now, revision))
        lifecycle.record_many(history)
        Service.objects.filter(pk__in=removed).delete()
        if run is not None:
            run.items = len(removed)
        if removed:
            log.info("expired %d service(s): %s", len(removed), ", ".join(removed[:20]))
            transaction.on_commit(lambda: lease_store.incr(r, "expirations", len(removed)))
            transaction.on_commit(lambda: _announce_removed(owners, "expired", now))
    # Committed. Candidates with no row are entries a previous run deleted the rows of but could not
    # remove (Redis failed after its commit): removed now, which makes the removal idempotent.
    orphans = sorted(set(candidates) - set(locked))
    lease_store.remove_if_lapsed(r, removed + orphans, now_ms)
    return removed


# --- heartbeat -------------------------------------------------------------------------


@dataclass(frozen=True)
class Eval:
    """Step: run this heartbeat in the lease store (HEARTBEAT_LUA); its reply entry is sent back."""

    beat: lease_store.Beat


@dataclass(frozen=True)
class Call:
    """Step: run this blocking (database) function; its return value is sent back."""

    fn: Callable[..., Any]
    args: tuple[Any, ...]


@dataclass(frozen=True)
class HeartbeatResult:
    status: int
    body: dict[str, Any]


def _error(status: int, detail: str) -> HeartbeatResult:
    return HeartbeatResult(status, {"detail": detail})


def cache_token(key_hash: str) -> bool:
    """Load an active token into the Redis token cache; False if there is no such token.

    A revocation (or a change of staff) that commits between the read and the write here has already
    forgotten the cache entry (registry.signals) before this writes the old row into it: the row is read
    again after the write, and the entry dropped if it changed. Either that second read sees the change,
    or the change commits after it, and its own forgetting comes after the write."""
    token = ApiToken.objects.filter(key_hash=key_hash, is_active=True).first()
    if token is None:
        return False
    r = get_redis()
    lease_store.cache_token(r, key_hash, token.pk, token.is_staff)
    if not ApiToken.objects.filter(pk=token.pk, key_hash=key_hash, is_active=True, is_staff=token.is_staff).exists():
        lease_store.forget_token(r, key_hash)
        return False
    return True


def record_health(service_id: str, health: str, deadline_ms: int, key_hash: str | None = None) -> bool:
    """Persist a change of reported health (and checkpoint the deadline); False if the service is gone.
    ``key_hash``: the heartbeat's token, which the history names."""
    with transaction.atomic():
        service = Service.objects.select_for_update().filter(pk=service_id).first()
        if service is None:
            return False
        reporter = ApiToken.objects.filter(key_hash=key_hash).first() if key_hash else None
        old_health = service.health
        service.health = health
        service.lease_expires_at = lease_store.from_ms(deadline_ms)
        _new_revision(get_redis(), service)
        service.save(update_fields=["health", "lease_expires_at", "revision", "recoveries_seen"])
        lease_store.set_health(get_redis(), service_id, health)
        service.live_expires_at = service.lease_expires_at
        now = timezone.now()
        lifecycle.record(
            service_id,
            service.service_name,
            Kind.HEALTH_CHANGED,
            Actor.token(reporter or service.owner),
            {"health": [old_health, health]},
            at=now,
            revision=service.effective_revision(now),
        )
        events.service_health(service)
    return True


def restore_lease(service_id: str, at_least_until_ms: int = 0, guard: Guard = transaction.atomic) -> bool:
    """Recreate a missing Redis entry from the database row; False if the service is not registered.

    The deadline is the row's checkpoint, or ``at_least_until_ms`` if that is later.
    """
    with guard():
        service = Service.objects.select_for_update().filter(pk=service_id).first()
        if service is None:
            return False
        deadline_ms = max(lease_store.to_ms(service.lease_expires_at), at_least_until_ms)
        _restore_lease_entry(get_redis(), service, deadline_ms)
    return True


def heartbeat_flow(
    service_id: str, token_key: str | None, health: str, now: datetime
) -> Generator[Eval | Call, Any, HeartbeatResult]:
    """The heartbeat protocol: renew the lease in Redis; touch the database only on a state change."""
    if not token_key:
        return _error(401, "Authentication credentials were not provided.")
    key_hash = hash_token(token_key)
    now_ms = lease_store.to_ms(now)
    for _attempt in range(3):
        reply = yield Eval(lease_store.Beat(key_hash, service_id, now_ms, health))
        code = reply[0]
        if code in ("OK", "HEALTH_CHANGED"):
            deadline_ms, lease_ms = int(reply[1]), int(reply[2])
            if code == "HEALTH_CHANGED" and not (
                yield Call(record_health, (service_id, health, deadline_ms, key_hash))
            ):
                return _error(404, "Service not registered; register it again.")
            return HeartbeatResult(
                200,
                {
                    "service_id": service_id,
                    "health": health,
                    "lease": {
                        "duration": lease_ms // 1000,
                        "heartbeat_interval": max(1, lease_ms // 3000),
                        "expires_at": lease_store.from_ms(deadline_ms).isoformat().replace("+00:00", "Z"),
                    },
                },
            )
        if code == "TOKEN_MISS":
            if not (yield Call(cache_token, (key_hash,))):
                return _error(401, "Invalid token.")
        elif code == "NOT_FOUND":
            if not (yield Call(restore_lease, (service_id,))):
                return _error(404, "Service not registered; register it again.")
        elif code == "FORBIDDEN":
            return _error(403, "You do not have permission to perform this action.")
    raise RuntimeError(f"heartbeat for {service_id!r} did not settle; last reply {reply!r}")


def run_flow(flow: Generator[Eval | Call, Any, HeartbeatResult], r: redis.Redis | None = None) -> HeartbeatResult:
    """Drive a heartbeat flow synchronously."""
    r = r or get_redis()
    try:
        step = next(flow)
        while True:
            if isinstance(step, Eval):
                reply: Any = lease_store.heartbeat_one(r, step.beat)
            else:
                reply = step.fn(*step.args)
            step = flow.send(reply)
    except StopIteration as stop:
        return stop.value


def heartbeat(service_id: str, token_key: str | None, health: str, now: datetime) -> HeartbeatResult:
    return run_flow(heartbeat_flow(service_id, token_key, health, now))


# --- repair ----------------------------------------------------------------------------


def reconcile(
    now: datetime, grace: bool = False, chunk: int = 1000, guard: Guard = transaction.atomic
) -> dict[str, int]:
    """Make Redis agree with the database: add missing lease entries, drop entries with no row.

    With ``grace`` (Redis lost its state), every restored lease runs at least one full lease
    from ``now``, as Consul resets TTLs after a leader change: the last heartbeats are unknown,
    and marking every live service unhealthy would be worse than trusting them one more lease.

    ``guard`` makes one transaction per chunk. A restore writes what the locked row says, only
    where Redis has no entry: true whatever the fence decides, since reconcile changes no row. A
    drop is decided in the guard's transaction and applied after it committed, and only to an
    entry whose removal deadline did not change meanwhile (a re-registration keeps its entry).
    """
    r = get_redis()
    now_ms = lease_store.to_ms(now)
    restored = dropped = 0
    if grace:
        # Redis may have lost the revision counter too (registry.revisions)
        newest = Service.objects.aggregate(newest=Max("revision"))["newest"] or 0
        lease_store.raise_revision_counter(r, newest, revisions.RESTORE_JUMP)
    last = ""
    while True:
        rows = list(Service.objects.filter(pk__gt=last).order_by("pk").values_list("pk", flat=True)[:chunk])
        if not rows:
            break
        last = rows[-1]
        present = lease_store.deadlines(r, rows)
        missing = [sid for sid in rows if sid not in present]
        if missing:
            restored += _restore_leases(missing, now_ms if grace else None, guard)
    conf_key = lease_store.keys().conf
    cursor = 0
    while True:
        cursor, entries = r.hscan(conf_key, cursor, count=chunk)
        ids = [raw.decode() for raw in entries]
        if ids:
            seen = lease_store.removal_deadlines(r, ids)
            with guard():
                known = set(Service.objects.filter(pk__in=ids).values_list("pk", flat=True))
            dropped += len(lease_store.remove_unchanged(r, {sid: s for sid, s in seen.items() if sid not in known}))
        if cursor == 0:
            break
    lease_store.mark_built(r)
    if restored or dropped:
        log.warning("lease state reconciled: %d restored, %d orphan(s) dropped", restored, dropped)
    return {"restored": restored, "dropped": dropped}


def _restore_leases(service_ids: Sequence[str], grace_from_ms: int | None, guard: Guard) -> int:
    """Recreate missing Redis entries from their rows, under the row locks (so a concurrent
    deregistration cannot leave an orphan); with ``grace_from_ms``, at least one lease from then."""
    restored = 0
    with guard():
        for service in Service.objects.select_for_update().filter(pk__in=list(service_ids)).order_by("pk"):
            deadline_ms = lease_store.to_ms(service.lease_expires_at)
            if grace_from_ms is not None:
                deadline_ms = max(deadline_ms, grace_from_ms + service.lease_duration * 1000)
            _restore_lease_entry(get_redis(), service, deadline_ms)
            restored += 1
    return restored


def _log_lapses(
    services: dict[str, Service],
    announced: set[str],
    recovered: set[str],
    lapsed: set[str],
    read_at: datetime,
    guard: Guard,
) -> None:
    """The lifecycle rows of one lapse scan: ``lapsed`` (newly, not in ``announced``) at the lease deadline,
    and recovered (announced before; now live, or queued as renewed since) when the scan read them."""
    pending: list[tuple[Service, str]] = []
    for sid, service in sorted(services.items()):
        was = sid in announced
        if was and (sid not in lapsed or sid in recovered):
            pending.append((service, Kind.RECOVERED))
        if sid in lapsed and (not was or sid in recovered):
            pending.append((service, Kind.LAPSED))
    if not pending:
        return
    with guard() as run:
        job = Actor.leader_job(run, "cleanup")
        rows = []
        for service, kind in pending:
            if kind == Kind.LAPSED:
                revision = service.effective_revision(service.expires_at)
                change = {
                    "effective_health": [service.health, Health.UNHEALTHY],
                    "lease_expires_at": [None, _iso(lease_store.to_ms(service.expires_at))],
                }
                rows.append(lifecycle.event(service, kind, job, change, service.expires_at, revision))
            else:
                revision = revisions.revision_of(
                    service.revision, service.recoveries_seen, service.live_recoveries, lapsed=False
                )
                change = {"effective_health": [Health.UNHEALTHY, service.health]}
                rows.append(lifecycle.event(service, kind, Actor.token(service.owner), change, read_at, revision))
        lifecycle.record_many(rows)
        if run is not None:
            run.items = len(rows)


def announce_lapses(now: datetime, limit: int = 500, guard: Guard = transaction.atomic) -> dict[str, int]:
    """Tell /ws/services/ watchers of leases that lapsed (effective health becomes unhealthy) and of lapsed
    leases renewed again (recovered) since the last run, each with its revision (registry.revisions), and
    write both to the lifecycle log in ``guard``'s transaction.

    Lapsing writes nothing, so this job notices it; a recovery is queued by the heartbeat script (or an
    outage's grace, or a restored entry) in the ``recovered`` set. A queued id is taken off the queue
    before its state is read, so a recovery after that read is queued again and announced next run.
    The log records a recovery only of a lapse this job saw (a restored entry is queued too, without
    having lapsed); a lapse renewed before the next run (they are 5 s apart) is not in the log.
    """
    r = get_redis()
    k = lease_store.keys()
    lapsed = set(lease_store.lapsed_ids(r, lease_store.to_ms(now)))
    announced = {raw.decode() for raw in r.smembers(k.lapse_announced)}
    queued = {raw.decode() for raw in r.smembers(k.recovered)}
    due = sorted((lapsed - announced) | queued | (announced - lapsed))[:limit]
    if not due:
        return {"lapsed": 0, "recovered": 0}
    taken = [sid for sid in due if sid in queued]
    if taken:
        r.srem(k.recovered, *taken)
    services = {s.pk: s for s in attach_live_leases(Service.objects.filter(pk__in=due).select_related("owner"))}
    read_at = timezone.now()
    now_lapsed, now_live = [], []
    for sid in due:
        service = services.get(sid)
        if service is None:  # removed meanwhile: its removal was announced
            now_live.append(sid)
            continue
        events.publish_now("service.health", service.service_name, events.service_payload(service, read_at))
        (now_lapsed if service.expires_at <= read_at else now_live).append(sid)
    try:
        _log_lapses(services, announced, set(taken), set(now_lapsed), read_at, guard)
    except BaseException:
        if taken:  # the log did not commit (a fenced-out leader): the next run sees these recoveries again
            r.sadd(k.recovered, *taken)
        raise
    if now_lapsed:
        r.sadd(k.lapse_announced, *now_lapsed)
    if now_live:
        r.srem(k.lapse_announced, *now_live)
    return {"lapsed": len(now_lapsed), "recovered": len([sid for sid in now_live if sid in services])}
