"""Paging of the service list: a page's rows and the total count, written to JSON shapes straight from the
database's tuples.

For a selective label selector the ids of every match are read in the list's order, in one query of the
label index (the selector's ranges merged, each already in that order: ``matching_ids``) that reads no
service row; their number is the count, and the page's rows are then read by id. On 10,000 services and
834 matches this replaced a page query carrying ``COUNT(*) OVER ()`` (which kept every matching row until
the count was known), and the ids outlive changes that cannot change them (below). For a broad result
(no selector, or one most services carry) a page that stops after its rows plus a count that reads no row
is cheaper: ``fuse_selector`` estimates the matches from the label counts (one indexed count per pair, as
a planner would, pairs taken as independent). Only a page past the end (or an empty result) reads no row.

Counts, a selector's ids and pages read from the database are remembered per process (``PAGES``), keyed
by the list's filters and the registry's membership counter (``registry.events.services_membership_key``),
which every registration and removal bumps inside its transaction and again after commit, as the select
caches' name counters are: they hold while no service was registered or removed since they were read,
and for at most PAGE_CACHE_SECONDS. A page also holds only while the change counter of every service name
on it is unchanged (each registry event bumps its service's name's counter, ``stamps_after``): a change of
health, drain or weight makes the next list read again the page's rows of that name (``read_page``), not
the matches nor the page's other rows, and leaves the other pages as they were. Should a remembered id be
gone all the same (its removal's bump lost), the page notices the missing row and reads afresh. What is
live in Redis (each lease's deadline, hence the effective health) is read for every answer, so only
database rows are remembered; a health filter, which depends on the lapsed leases of the moment, is never
served from memory.

The rows are tuples of exactly the columns the list shows, the owner's name joined in: no model instance
per service. ``representation`` writes each as ``registry.serializers.read_representation`` writes a
Service (the same keys, order and values; tests compare them).
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import redis
from django.conf import settings
from django.core.paginator import InvalidPage, Page, Paginator
from django.db import connection
from django.db.models import F, QuerySet
from django.utils import timezone
from django.utils.functional import cached_property

from . import events, lease_store
from .id_sets import InIdSet, array_literal
from .models import Health, Service, ServiceLabel
from .pagination import RegistryPagination
from .redis_client import get_redis

log = logging.getLogger(__name__)

# The columns a listed service is written from, in the order ``representation`` reads them.
COLUMNS = (
    "service_id",
    "service_name",
    "service_type",
    "endpoint",
    "labels",
    "health",
    "group_id",
    "weight",
    "drained",
    "operator_weight",
    "registered_at",
    "lease_duration",
    "deregister_after",
    "lease_expires_at",
    "owner_name",
)
# Estimated matches up to which a selector's page carries its count (measured on 10,000 services: the
# window wins by a third at 834 matches and loses by as much at 3,334 on SQLite; PostgreSQL breaks
# even near 3,000).
FUSE_AT_MOST = 2000


# An estimate only chooses how a page is read (both ways answer the same), so it is kept a while per selector.
ESTIMATE_SECONDS = 30.0
ESTIMATES_KEPT = 1024
_estimates: dict[tuple[Any, ...], tuple[float, float]] = {}  # (database, pairs) -> (estimate, when read)


def filters_key(params: dict[str, Any]) -> tuple[Any, ...]:
    """A list's validated filters as ``PAGES`` keys them (the view and the fast path alike)."""
    return tuple(sorted((k, repr(v)) for k, v in params.items()))


IdsReader = Callable[[Callable[[], QuerySet[Any]]], list[str] | None]


def ids_for(params: dict[str, Any]) -> IdsReader | None:
    """What gives ``CountingPaginator`` every id its queryset (the list's, ``params`` filtering it, built by
    the callable it is given) selects, in the list's order, when they are few (``fuse_selector``; None when
    they are not): called only when the database is read, and only for a selector."""
    selector = params.get("selector")
    if not selector:
        return None
    return lambda queryset: matching_ids(params, queryset) if fuse_selector(selector) else None


# Filters a selector's ids are read for from the label index alone (each label row carries its name).
LABEL_FILTERS = frozenset({"selector", "name"})


def matching_ids(params: dict[str, Any], queryset: Callable[[], QuerySet[Any]]) -> list[str]:
    """Every id of the list's queryset (``queryset()`` builds it; ``params`` are its filters, a selector among
    them), in the list's order (name, id).

    With no filter but the selector and a name, from the label index alone: each key=value pair is a range of
    it in that order already (``ServiceLabel``), and the ranges are merged in one statement that reads no
    service row and sorts nothing (``_label_statement``). On 10,000 services and 834 matches of two pairs,
    about a third of the time of the ranges' ids intersected and then looked up in the service table for
    their order, Python's part included. With other filters, the queryset's ids."""
    if not params.keys() <= LABEL_FILTERS:
        return list(queryset().values_list("pk", flat=True))
    selector: dict[str, str] = params["selector"]
    name = params.get("name")
    values: list[str] = []
    for key, value in selector.items():
        values += [key, value] if name is None else [key, value, name]
    with connection.cursor() as cursor:
        cursor.execute(_label_statement(len(selector), name is not None), values)
        return [row[0] for row in cursor.fetchall()]


_LABEL_STATEMENTS: dict[tuple[str, int, bool], str] = {}


def _label_statement(pairs: int, named: bool) -> str:
    """The statement reading the ids of the services carrying ``pairs`` key=value pairs (and, if ``named``, a
    name), in the list's order; its parameters are each pair's key, value (and name). SQLite runs an
    ``INTERSECT`` of the ranges ordered as they are as a merge of them; PostgreSQL runs the ``EXISTS``
    semi-joins on (name, id) as merge semi joins."""
    found = _LABEL_STATEMENTS.get((connection.vendor, pairs, named))
    if found is not None:
        return found
    q = connection.ops.quote_name
    label, name, service, key, value = (
        q(ServiceLabel._meta.db_table),
        q("service_name"),
        q("service_id"),
        q("key"),
        q("value"),
    )

    def pair(of: str = "") -> str:
        """One pair's range (``of``: the table's alias and a dot, if any)."""
        return f"{of}{key} = %s AND {of}{value} = %s" + (f" AND {of}{name} = %s" if named else "")

    if connection.vendor == "sqlite":
        one = f"SELECT {service}, {name} FROM {label} WHERE {pair()}"
        # the ids are the first column; the order is (name, id) as the list's
        statement = " INTERSECT ".join([one] * pairs) + " ORDER BY 2, 1"
    else:
        where = [pair("p0.")]
        for i in range(1, pairs):
            same = f"p{i}.{name} = p0.{name} AND p{i}.{service} = p0.{service}"
            where.append(f"EXISTS (SELECT 1 FROM {label} p{i} WHERE {pair(f'p{i}.')} AND {same})")
        statement = (
            f"SELECT p0.{service} FROM {label} p0 WHERE " + " AND ".join(where) + f" ORDER BY p0.{name}, p0.{service}"
        )
    _LABEL_STATEMENTS[(connection.vendor, pairs, named)] = statement
    return statement


def fuse_selector(selector: dict[str, str]) -> bool:
    """Whether a selector's matches are few enough (estimated) to be read as ids (``CountingPaginator``)."""
    return bool(selector) and estimated_matches(selector) <= FUSE_AT_MOST


def estimated_matches(selector: dict[str, str]) -> float:
    """How many services carry every pair of ``selector``, estimated; remembered for ESTIMATE_SECONDS."""
    key = (connection.alias, *selector.items())
    found = _estimates.get(key)
    if found is not None and time.monotonic() - found[1] < ESTIMATE_SECONDS:
        return found[0]
    quote = connection.ops.quote_name
    service = quote(Service._meta.db_table)
    total = f"(SELECT COUNT(*) FROM {service})"
    params: list[Any] = []
    if connection.vendor == "postgresql":
        # The planner's row count of the table (kept by autovacuum), not a count of every row; only
        # a table never analyzed (reltuples < 1) is counted.
        total = (
            f"COALESCE((SELECT reltuples::bigint FROM pg_class WHERE oid = %s::regclass AND reltuples >= 1), {total})"
        )
        params.append(Service._meta.db_table)
    label = quote(ServiceLabel._meta.db_table)
    pair = f"(SELECT COUNT(*) FROM {label} WHERE {quote('key')} = %s AND {quote('value')} = %s)"
    sql = f"SELECT {total}, " + ", ".join([pair] * len(selector))
    with connection.cursor() as cursor:
        cursor.execute(sql, params + [part for item in selector.items() for part in item])
        total_rows, *pairs = cursor.fetchone()
    services = max(total_rows, *pairs)  # a stale row count is at least every pair's count
    estimate = float(services)
    for count in pairs:
        estimate = estimate * count / services if services else 0.0
    if len(_estimates) >= ESTIMATES_KEPT:
        _estimates.clear()
    _estimates[key] = (estimate, time.monotonic())
    return estimate


# How long a remembered entry may be served: a bound for a change whose counter bump was lost, as the select
# caches have (balancer.selection.MAX_AGE_SECONDS).
PAGE_CACHE_SECONDS = 10.0
PAGE_CACHE_ENTRIES = 256  # filter combinations remembered per process
# Rows remembered per process, all entries together (a row is about 1 KiB in memory, an id a tenth of that
# and counted so): the least recently used entries are dropped to stay within it.
PAGE_CACHE_ROWS = 20_000
IDS_PER_ROW = 10

# A name's change counter as remembered: its raw value, "" while it is unset (Redis lost it or never set it).
Stamps = tuple[tuple[str, str], ...]


@dataclass
class RememberedPage:
    """A page's rows and, for each service name on it, its change counter before the rows were read."""

    rows: list[tuple[Any, ...]]
    stamps: Stamps


@dataclass
class Remembered:
    """What the database said for one combination of filters at one value of the membership counter: the
    count, a selector's ids, and pages."""

    key: tuple[Any, ...]
    version: int
    born: float
    count: int | None = None
    pages: dict[tuple[int, int], RememberedPage] = field(default_factory=dict)
    ids: list[str] | None = None  # every match's id, in the list's order (a selective selector's)
    rows: int = 0  # the size of ``pages`` and ``ids`` in the cache's budget

    def fresh(self, version: int) -> bool:
        return self.version == version and time.monotonic() - self.born < PAGE_CACHE_SECONDS


@dataclass
class Reading:
    """One request's view of the cache: the entry for its filters, and the registry's change counter as it
    was before anything was read from the database (``stamps_after``)."""

    memo: Remembered
    changes: bytes | None


class PageCache:
    """Service list counts, ids and pages per (filters, membership counter), least recently used dropped
    first, within ``entries`` entries and ``rows`` rows."""

    def __init__(self, entries: int = PAGE_CACHE_ENTRIES, rows: int = PAGE_CACHE_ROWS) -> None:
        self.entries = entries
        self.budget = rows
        self.total = 0
        self.lock = threading.Lock()
        self.remembered: OrderedDict[tuple[Any, ...], Remembered] = OrderedDict()

    def entry(self, filters: tuple[Any, ...]) -> Reading | None:
        """The entry to read and fill for ``filters`` at the current membership counter; None (read the
        database, remember nothing) when the counter cannot be read or is unset."""
        try:
            membership, changes = get_redis().mget(events.services_membership_key(), events.services_version_key())
        except (redis.RedisError, OSError):
            log.debug("registry counters unreadable: list pages not remembered", exc_info=True)
            return None
        if membership is None:
            return None  # no registration counted since Redis started: nothing to key on
        version = int(membership)
        key = (connection.alias, *filters)
        with self.lock:
            found = self.remembered.get(key)
            if found is None or not found.fresh(version):
                if found is not None:
                    self.total -= found.rows
                found = self.remembered[key] = Remembered(key, version, time.monotonic())
            self.remembered.move_to_end(key)
            self._shrink(self.entries)
        return Reading(found, changes)

    def add_page(self, memo: Remembered, page: tuple[int, int], rows: list[tuple[Any, ...]], stamps: Stamps) -> None:
        """Remember ``rows`` as ``page`` (number, size) of ``memo``, if it is still in the cache."""
        with self.lock:
            if self.remembered.get(memo.key) is not memo or len(rows) > self.budget:
                return
            before = memo.pages.get(page)
            memo.pages[page] = RememberedPage(rows, stamps)
            grown = len(rows) - (len(before.rows) if before is not None else 0)
            memo.rows += grown
            self.total += grown
            self._shrink(self.entries)

    def add_ids(self, memo: Remembered, ids: list[str]) -> None:
        """Remember ``ids`` as every match of ``memo``, if it is still in the cache."""
        size = len(ids) // IDS_PER_ROW + 1
        with self.lock:
            if self.remembered.get(memo.key) is not memo or memo.ids is not None or size > self.budget:
                return
            memo.ids = ids
            memo.rows += size
            self.total += size
            self._shrink(self.entries)

    def forget(self, memo: Remembered) -> None:
        """Drop ``memo`` (found stale by its reader)."""
        with self.lock:
            if self.remembered.get(memo.key) is memo:
                del self.remembered[memo.key]
                self.total -= memo.rows

    def _shrink(self, entries: int) -> None:
        while self.remembered and (len(self.remembered) > entries or self.total > self.budget):
            _, dropped = self.remembered.popitem(last=False)
            self.total -= dropped.rows

    def remembered_now(self, filters: tuple[Any, ...]) -> Remembered | None:
        """The entry for ``filters`` if it is not too old, without reading the counter: its ``version`` is
        for the caller to compare with the counter's value (registry.list_fastpath does, in Redis)."""
        with self.lock:
            found = self.remembered.get((connection.alias, *filters))
        if found is None or time.monotonic() - found.born >= PAGE_CACHE_SECONDS:
            return None
        return found

    def clear(self) -> None:
        with self.lock:
            self.remembered.clear()
            self.total = 0


PAGES = PageCache()


def stamp_keys(stamps: Stamps) -> list[str]:
    return [events.name_version_key(name) for name, _ in stamps]


def moved_names(stamps: Stamps) -> set[str] | None:
    """The names of ``stamps`` whose change counter no longer has its value there (none: the page they
    stamp holds); None when the counters cannot be read."""
    if not stamps:
        return set()
    try:
        now = get_redis().mget(stamp_keys(stamps))
    except (redis.RedisError, OSError):
        return None
    return {name for (name, stamp), value in zip(stamps, now, strict=True) if (value or b"").decode() != stamp}


def stamps_after(rows: list[tuple[Any, ...]], changes: bytes | None) -> Stamps | None:
    """The change counters of the names on ``rows``, read after the rows were; None (do not remember the
    rows) if the registry's change counter moved since ``changes``, read before them.

    Any change of a service on the page that committed after the rows were read bumps its name's counter
    after its commit: if that bump came before the counters were read here, the registry's counter moved
    too (the same script bumps both) and the rows are not remembered; if after, the counter remembered
    here is older than the name's and the page is read again next time."""
    names = sorted({row[1] for row in rows})
    try:
        values = get_redis().mget([events.services_version_key(), *(events.name_version_key(n) for n in names)])
    except (redis.RedisError, OSError):
        return None
    if values[0] != changes:
        return None
    return tuple((name, (value or b"").decode()) for name, value in zip(names, values[1:], strict=True))


def page_rows(queryset: QuerySet[Any], offset: int, limit: int) -> list[tuple[Any, ...]]:
    """The rows ``offset`` .. ``offset + limit`` of ``queryset`` (filtered and ordered, not annotated) as
    ``COLUMNS`` tuples: the values ``values_list(*COLUMNS)`` gives, its SQL run on a plain cursor and each
    value converted as the ORM's converters would (``_converter``; tests compare the two), which costs about a
    third of the ORM's per-row machinery on a page of 100."""
    query = queryset.annotate(owner_name=F("owner__name")).values_list(*COLUMNS)[offset : offset + limit]
    sql, params = query.query.get_compiler(using=query.db).as_sql()
    return _fetch(sql, params)


def _fetch(sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
    """The ``COLUMNS`` rows ``sql`` reads, as the ORM's values (``_converter``)."""
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql" and _c_times() is not None:
            cursor.cursor.adapters.register_loader("timestamptz", _c_times())
        cursor.execute(sql, params)
        return _converter()(cursor.fetchall())


@functools.cache
def _c_times() -> Any:
    """psycopg's C loader of ``timestamptz`` (psycopg[binary]), or None; looked up on first use, so that a
    deployment on SQLite does not import psycopg. Django's own loader, which the
    connection has, is its pure-Python one followed by a ``replace`` of the time zone: on a page of 100
    rows its two times cost about as much as the statement. ``_converter`` makes the same ``replace``."""
    try:
        from psycopg import adapters, postgres, pq
    except ImportError:
        return None
    loader = adapters.get_loader(postgres.types["timestamptz"].oid, pq.Format.TEXT)
    return loader if loader is not None and loader.__module__.startswith("psycopg_") else None


def _converter() -> Callable[[list[tuple[Any, ...]]], list[tuple[Any, ...]]]:
    """What turns raw ``COLUMNS`` rows of this connection into the ORM's values: ``labels`` is JSON text on
    both databases (Django loads jsonb as text); PostgreSQL's times are given the connection's time zone
    object, as Django's loader does (``_fetch``); SQLite gives its times as text and ``drained`` as 0/1."""
    loads = json.loads
    if connection.vendor != "sqlite":
        tz = connection.timezone

        def convert(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
            return [
                (
                    *row[:4],
                    loads(row[4]),
                    *row[5:10],
                    row[10].replace(tzinfo=tz),
                    *row[11:13],
                    row[13].replace(tzinfo=tz),
                    row[14],
                )
                for row in rows
            ]

        return convert
    # sqlite3 parses the times already (Django registers its converter for the column type); the ORM then
    # puts a naive one in the connection's time zone, as here, and leaves any other value to Django's own.
    orm_time = connection.ops.convert_datetimefield_value
    zone = connection.timezone if settings.USE_TZ else None

    def to_time(value: Any, expression: Any, db: Any) -> Any:
        if zone is not None and type(value) is datetime and value.tzinfo is None:
            return value.replace(tzinfo=zone)
        return orm_time(value, expression, db)

    def convert_sqlite(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        return [
            (
                *row[:4],
                loads(row[4]),
                row[5],
                row[6],
                row[7],
                bool(row[8]),
                row[9],
                to_time(row[10], None, connection),
                row[11],
                row[12],
                to_time(row[13], None, connection),
                row[14],
            )
            for row in rows
        ]

    return convert_sqlite


def rows_of(service_ids: list[str]) -> list[tuple[Any, ...]] | None:
    """The ``COLUMNS`` tuples of ``service_ids``, in that order (the list's), or None when one of them is
    gone (the caller's id list is stale). The ids are one parameter (``registry.id_sets``), so the statement
    is the same for every page: it is compiled once per database."""
    if not service_ids:
        return []
    statement = _BY_ID.get(connection.alias, "")
    if statement == "":
        by_id = Service.objects.filter(InIdSet("pk", ["?"])).annotate(owner_name=F("owner__name"))
        sql, params = by_id.values_list(*COLUMNS).query.get_compiler(using=connection.alias).as_sql()
        statement = _BY_ID[connection.alias] = sql if len(params) == 1 else None
    if statement is None or connection.vendor not in ("sqlite", "postgresql"):
        fetched = page_rows(Service.objects.filter(InIdSet("pk", service_ids)), 0, len(service_ids))
    else:
        ids = json.dumps(service_ids) if connection.vendor == "sqlite" else array_literal(service_ids)
        fetched = _fetch(statement, [ids])
    found = {row[0]: row for row in fetched}
    if len(found) != len(service_ids):
        return None
    return [found[service_id] for service_id in service_ids]


_BY_ID: dict[str, str | None] = {}  # per database: the statement reading rows by id (or None: use the ORM)


def filtered(params: dict[str, Any]) -> QuerySet[Service]:
    """The services a list's filters (as ``ServiceQuerySerializer`` validates them) select, but ``health``,
    which the view applies with the lapsed leases of the moment."""
    qs = Service.objects.all()
    if "name" in params:
        qs = qs.filter(service_name=params["name"])
    if "type" in params:
        qs = qs.filter(service_type=params["type"])
    if "group_id" in params:
        qs = qs.filter(group_id=params["group_id"])
    if "selector" in params:
        qs = qs.matching(params["selector"])
    return qs


def read_fresh(
    filters: tuple[Any, ...], params: dict[str, Any], number: int, per_page: int
) -> tuple[int, list[tuple[Any, ...]]] | None:
    """The count and page ``number`` of the list ``params`` selects (without a ``health`` filter), read and
    remembered as the view reads and remembers them (``CountingPaginator``); None for a page that does not
    exist (the view's 404)."""
    paginator = CountingPaginator(lambda: filtered(params), per_page, ids_for(params), PAGES.entry(filters))
    try:
        rows = paginator.page(number).object_list
    except InvalidPage:
        return None
    return paginator.count, list(rows)


def read_page(
    memo: Remembered,
    page: tuple[int, int],
    ids: list[str],
    changes: bytes | None,
    before: RememberedPage | None = None,
    moved: set[str] | frozenset[str] = frozenset(),
) -> list[tuple[Any, ...]] | None:
    """The rows of ``ids``, page ``page`` (number, size) of ``memo``'s remembered ids, remembered with it
    (``changes``: the registry's change counter before they were read); None if one is gone, and then
    ``memo`` is dropped. With ``before``, the page as remembered, only the rows of the names ``moved`` (whose
    change counters moved) are read: the others hold, their counters having held (the membership counter
    too, so the page's ids and order are the same)."""
    if before is not None and (not moved or [row[0] for row in before.rows] != ids):
        before = None  # nothing to keep: read the whole page
    fresh = rows_of(ids if before is None else [row[0] for row in before.rows if row[1] in moved])
    if fresh is None:
        PAGES.forget(memo)
        return None
    if before is None:
        rows, kept = fresh, ()
    else:
        read = {row[0]: row for row in fresh}
        rows = [read.get(row[0], row) for row in before.rows]
        kept = tuple((name, stamp) for name, stamp in before.stamps if name not in moved)
    stamps = stamps_after(fresh, changes)
    if stamps is not None:
        PAGES.add_page(memo, page, rows, tuple(sorted(kept + stamps)))
    return rows


class CountingPaginator(Paginator):
    """A Django paginator over a queryset, built by ``build`` only when the database is read, whose pages
    are ``COLUMNS`` tuples (``page_rows``). With ``ids`` (a callable, asked only when the database is
    read) giving the ids of every match in the list's order (they are few: ``ids_for``), their number is
    the count, and the page's rows are read by id. Otherwise
    ``count`` is ``queryset.count()`` and a page is a walk of the list's index. With ``reading``, the count,
    ids and pages come from its entry while they hold, and go to it when read."""

    def __init__(
        self,
        build: Callable[[], QuerySet[Any]],
        per_page: int,
        ids: IdsReader | None = None,
        reading: Reading | None = None,
    ) -> None:
        super().__init__(build, per_page)  # type: ignore[arg-type]
        self.build = build
        self.ids = ids
        self.reading = reading
        self.memo = reading.memo if reading is not None else None

    @cached_property
    def queryset(self) -> QuerySet[Any]:
        return self.build()

    @cached_property
    def count(self) -> int:
        memo = self.memo
        if memo is not None and memo.count is not None:
            return memo.count
        if memo is not None and memo.ids is not None:
            return len(memo.ids)
        count = self.queryset.count()
        if memo is not None:
            memo.count = count
        return count

    def matching_ids(self) -> list[str] | None:
        """Every match's id in the list's order, remembered or read by ``ids``; None when they are many."""
        if self.memo is not None and self.memo.ids is not None:
            return self.memo.ids
        ids = self.ids(lambda: self.queryset) if self.ids is not None else None
        if ids is None:
            return None
        if self.memo is not None:
            PAGES.add_ids(self.memo, ids)
        return ids

    def page(self, number: Any) -> Page:
        wanted = _page_number(number)
        memo = self.memo
        if memo is not None and memo.count is not None and wanted is not None:
            remembered = memo.pages.get((wanted, self.per_page))
            moved = moved_names(remembered.stamps) if remembered is not None else None
            if remembered is not None and moved == set():
                return self._get_page(remembered.rows, self.validate_number(number), self)
            if remembered is not None and moved and memo.ids is not None and self.reading is not None:
                # as the fast path does: the rows of the names that changed, the others kept
                ids = memo.ids[(wanted - 1) * self.per_page : wanted * self.per_page]
                key = (wanted, self.per_page)
                rows = read_page(memo, key, ids, self.reading.changes, remembered, moved)
                if rows is not None:
                    return self._get_page(rows, self.validate_number(number), self)
                self.memo = None  # a remembered id is gone (read_page dropped the entry): read afresh
                memo = None
        if wanted is not None and wanted >= 1 and "count" not in self.__dict__:
            ids = self.matching_ids()
            if ids is not None:
                self.__dict__["count"] = len(ids)
                number = self.validate_number(number)  # Django's rules and messages
                rows = rows_of(ids[(number - 1) * self.per_page : number * self.per_page])
                if rows is not None:
                    self._remember(number, rows, len(ids))
                    return self._get_page(rows, number, self)
                # A service of the remembered ids is gone, its removal not yet counted: read afresh.
                if memo is not None:
                    PAGES.forget(memo)
                self.memo = None
                del self.__dict__["count"]
        number = self.validate_number(number)  # Django's rules and messages (and the count query)
        bottom = (number - 1) * self.per_page
        top = min(bottom + self.per_page, self.count)  # as Django slices (no orphans): no query for none
        rows = page_rows(self.queryset, bottom, top - bottom) if top > bottom else []
        self._remember(number, rows, self.count)
        return self._get_page(rows, number, self)

    def _remember(self, number: int, rows: list[tuple[Any, ...]], count: int) -> None:
        memo = self.memo
        if memo is None or self.reading is None:
            return
        memo.count = count
        stamps = stamps_after(rows, self.reading.changes)
        if stamps is not None:
            PAGES.add_page(memo, (number, self.per_page), rows, stamps)


def _page_number(number: Any) -> int | None:
    """``number`` as Django's ``validate_number`` reads it, None where that refuses it."""
    try:
        if isinstance(number, float) and not number.is_integer():
            return None
        return int(number)
    except (TypeError, ValueError):
        return None


class ServiceListPagination(RegistryPagination):
    """RegistryPagination, each page a list of ``COLUMNS`` tuples from ``CountingPaginator``; ``ids`` and
    ``reading`` are set by the view per request."""

    ids: IdsReader | None = None
    reading: Reading | None = None

    def django_paginator_class(self, build: Any, per_page: int) -> CountingPaginator:  # type: ignore[override]
        return CountingPaginator(build, per_page, self.ids, self.reading)


def representation(
    rows: Sequence[tuple[Any, ...]], now: datetime, live: dict[str, tuple[int | None, int | None]] | None = None
) -> list[dict[str, Any]]:
    """The listed services' JSON shapes: ``read_representation``'s keys and values, with each lease's
    deadline from ``live`` or else read from the lease store (one round trip for the page), else the
    database's."""
    if live is None:
        live = lease_store.live_entries(get_redis(), [row[0] for row in rows])
    tz = timezone.get_current_timezone()
    body = []
    for (
        service_id,
        service_name,
        service_type,
        endpoint,
        labels,
        health,
        group_id,
        weight,
        drained,
        operator_weight,
        registered_at,
        lease_duration,
        deregister_after,
        lease_expires_at,
        owner_name,
    ) in rows:
        ms = live.get(service_id, (None, None))[0]
        expires_at = lease_store.from_ms(ms) if ms is not None else lease_expires_at
        body.append(
            {
                "service_id": service_id,
                "service_name": service_name,
                "service_type": service_type,
                "endpoint": endpoint,
                "labels": labels,
                "health": str(Health.UNHEALTHY) if expires_at <= now else health,
                "reported_health": health,
                "group_id": group_id,
                "weight": weight,
                "drained": drained,
                "operator_weight": operator_weight,
                "registered_at": _iso(registered_at, tz),
                "last_heartbeat": _iso(expires_at - timedelta(seconds=lease_duration), tz),
                "lease_duration": lease_duration,
                "deregister_after": deregister_after,
                "lease_expires_at": _iso(expires_at, tz),
                "owner": owner_name,
            }
        )
    return body


_ISO_MEMO_ENTRIES = 65536
_iso_memo: dict[tuple[datetime, Any], str] = {}


def _iso(moment: datetime, tz: Any) -> str:
    """As DRF's DateTimeField writes it: ISO 8601 in the current time zone, UTC as Z (remembered: a page
    shows the same registration times and lease deadlines again and again)."""
    found = _iso_memo.get((moment, tz))
    if found is None:
        text = moment.astimezone(tz).isoformat()
        found = text[:-6] + "Z" if text.endswith("+00:00") else text
        if len(_iso_memo) >= _ISO_MEMO_ENTRIES:
            _iso_memo.clear()
        _iso_memo[(moment, tz)] = found
    return found
