"""The rebalance: bump a group's generation, ask the pure assignor for the target and apply it
revoke-before-assign. A partition whose target changed stays with its owner until the owner
confirms the new generation, leaves or times out.

Every change to a group runs under that group's row lock (SELECT ... FOR UPDATE on PostgreSQL,
SQLite's immediate transactions), taken with ``lock_group``, so generations are strictly
sequential per group without a global lock.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import TypeVar

from django.db import connection, transaction
from django.db.models import F

from registry.errors import NotFound
from registry.lifecycle import current_operator
from registry.models import ApiToken

from . import assignor, events
from .models import GroupState, Partition, RebalanceEvent, RebalanceReason, RetiredGroup, ServiceGroup, Topic

log = logging.getLogger(__name__)
T = TypeVar("T")


class GroupNotFound(NotFound):
    pass


def lock_group(group_id: str, *, create_for: ApiToken | None = None) -> ServiceGroup | None:
    """The group's row, locked until the transaction ends; None if absent. With ``create_for``, a missing
    group is created first, owned by that token; a group deleted before continues its member epochs."""
    if create_for is not None:
        retired = RetiredGroup.objects.filter(pk=group_id).values_list("member_epochs", flat=True).first()
        ServiceGroup.objects.bulk_create(
            [ServiceGroup(group_id=group_id, owner=create_for, member_epochs=retired or 0)], ignore_conflicts=True
        )
    return ServiceGroup.objects.select_for_update().filter(pk=group_id).first()


def members_of(group: ServiceGroup, exclude: str | None = None) -> list[str]:
    """The group's member ids, sorted (``exclude`` left out): the history's before/after lists."""
    return sorted(m for m in group.members.values_list("member_id", flat=True) if m != exclude)


BATCH = 500  # rows per statement: well under SQLite's 999 bound parameters, and short statements
GROWTH_BATCH = 2000  # new partition rows per transaction when a topic grows: tens of milliseconds
SQLITE_WRITER_PAUSE = 0.11  # longer than SQLite's longest sleep between two tries for its lock


def _chunks(items: Sequence[T], size: int = BATCH) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# pk, owner_id, target_id, target_generation, held_until
PartitionRow = tuple[int, int | None, int | None, int, datetime | None]


def _partition_rows(group: ServiceGroup) -> dict[tuple[str, int], PartitionRow]:
    """The group's partition rows as plain tuples, not model instances: a grown topic can give a group
    10,000 of them."""
    return {
        (topic, number): (pk, owner_id, target_id, target_generation, held_until)
        for pk, topic, number, owner_id, target_id, target_generation, held_until in group.partitions.values_list(
            "pk", "topic", "number", "owner_id", "target_id", "target_generation", "held_until"
        )
    }


def _insert_partitions(group_id: str, keys: Sequence[tuple[str, int]]) -> None:
    """Insert unassigned partition rows; rows that already exist (made concurrently) are left alone."""
    for chunk in _chunks(keys):
        Partition.objects.bulk_create(
            [Partition(group_id=group_id, topic=t, number=n) for t, n in chunk], ignore_conflicts=True
        )


def add_partitions(group_id: str, topic: str, count: int) -> int:
    """Create the missing rows of ``topic``'s first ``count`` partitions for a group, unassigned, one short
    transaction per batch and without the group lock, so growing a large topic never holds a lock that
    registrations, heartbeats or other groups wait for. The next rebalance assigns them (an unowned,
    untargeted row is what a rebalance treats as new). Returns how many rows were created."""
    existing = set(Partition.objects.filter(group_id=group_id, topic=topic).values_list("number", flat=True))
    missing = [(topic, n) for n in range(count) if n not in existing]
    for chunk in _chunks(missing, GROWTH_BATCH):
        with transaction.atomic():
            if not ServiceGroup.objects.filter(pk=group_id).exists():
                return 0  # the group was deleted meanwhile
            _insert_partitions(group_id, chunk)
        yield_to_writers()
    return len(missing)


def yield_to_writers() -> None:
    """Between the transactions of a long job on SQLite, leave the database's single write lock free
    for a moment. SQLite has no queue for its lock: a waiting writer polls, sleeping up to 100 ms
    between tries, so a job that commits and begins again at once would starve it for the whole job."""
    if connection.vendor == "sqlite":
        time.sleep(SQLITE_WRITER_PAUSE)


def update_state(group: ServiceGroup) -> None:
    if not group.members.exists():
        state = GroupState.EMPTY
    elif group.partitions.exclude(owner=F("target")).exists() or group.partitions.filter(owner=None).exists():
        state = GroupState.RECONCILING
    else:
        state = GroupState.STABLE
    if state != group.state:
        group.state = state
        group.save(update_fields=["state", "updated_at"])


def rebalance(
    group: ServiceGroup, reason: str, now: datetime, members_before: list[str] | None = None, detail: str = ""
) -> RebalanceEvent:
    """Bump the generation and apply a new target assignment. The caller holds the group lock."""
    started = time.perf_counter()
    members = list(group.members.all())
    if members_before is None:
        members_before = sorted(m.member_id for m in members)
    by_pk = {m.pk: m for m in members}
    by_id = {m.member_id: m for m in members}
    subscribed = sorted({t for m in members for t in m.topics})
    sizes = dict(Topic.objects.filter(name__in=subscribed).values_list("name", "partitions"))

    wanted = set(assignor.all_partitions(sizes, subscribed))
    rows = _partition_rows(group)
    missing = wanted - rows.keys()
    if missing:
        _insert_partitions(group.group_id, sorted(missing))
        rows = _partition_rows(group)
    # a held partition (groups.incarnations) outlives its topic's subscription until its hold ends
    stale = [row[0] for key, row in rows.items() if key not in wanted and not _held(row[4], now)]
    for chunk in _chunks(stale):
        Partition.objects.filter(pk__in=chunk).delete()

    current = {key: by_pk[row[2]].member_id for key, row in rows.items() if row[2] in by_pk}
    target = assignor.assign({m.member_id: m.topics for m in members}, sizes, current)
    generation = group.generation + 1
    # Rows that change, bucketed by their new (owner, target): one UPDATE per bucket and run of
    # partition numbers (see _update_rows) instead of bulk_update's CASE WHEN per row, which took
    # seconds for 10,000 rows.
    buckets: dict[tuple[int | None, int | None, bool, bool], list[tuple[str, int, int]]] = {}
    moved = 0  # partitions that had a target before and now go to another member (a departed one's included)
    for key, (pk, owner_id, target_id, target_generation, held_until) in rows.items():
        if key not in wanted:
            continue
        new_target = by_id[target[key]].pk if key in target else None
        retarget = target_id != new_target
        moved += retarget and target_generation > 0  # a row never assigned before did not move
        new_owner = owner_id
        if owner_id is None and new_target is not None and not _held(held_until, now):
            new_owner = new_target  # nobody to revoke from (and no fenced incarnation holds it): assign at once
        clear_hold = new_owner != owner_id and held_until is not None
        if retarget or new_owner != owner_id:
            buckets.setdefault((new_owner, new_target, retarget, clear_hold), []).append((*key, pk))
    for (new_owner, new_target, retarget, clear_hold), changed in buckets.items():
        values: dict[str, object] = {"owner_id": new_owner}
        if retarget:
            values.update(target_id=new_target, target_generation=generation)
        if clear_hold:
            values["held_until"] = None
        _update_rows(group, changed, values)

    group.generation = generation
    group.version += 1
    group.topics = subscribed
    group.save(update_fields=["generation", "version", "topics", "updated_at"])
    update_state(group)
    event = RebalanceEvent.objects.create(
        group=group,
        generation=generation,
        reason=reason,
        detail=detail[:255],
        members_before=members_before,
        members_after=sorted(by_id),
        partitions_moved=moved,
        duration_ms=(time.perf_counter() - started) * 1000,
        created_at=now,
    )
    events.group_changed(group.group_id)
    log.info(
        "group %s generation %d (%s): %d member(s), %d partition(s) moved",
        group.group_id,
        generation,
        reason,
        len(members),
        event.partitions_moved,
    )
    return event


RUN = 64  # consecutive partition numbers worth an UPDATE by range rather than by primary key


def _update_rows(group: ServiceGroup, changed: list[tuple[str, int, int]], values: dict[str, object]) -> None:
    """Apply ``values`` to the rows ``changed`` ((topic, number, pk) each). The assignor hands out ranges,
    so a grown topic's new rows come in long runs of consecutive numbers: each run is one UPDATE by
    number range on the (group, topic, number) index; scattered rows go by primary key, 500 at a time."""
    scattered: list[int] = []
    changed.sort()
    start = 0
    while start < len(changed):
        end = start
        topic, first, _pk = changed[start]
        while end + 1 < len(changed) and changed[end + 1][:2] == (topic, changed[end][1] + 1):
            end += 1
        if end - start + 1 >= RUN:
            last = changed[end][1]
            Partition.objects.filter(group=group, topic=topic, number__gte=first, number__lte=last).update(**values)
        else:
            scattered += [pk for _t, _n, pk in changed[start : end + 1]]
        start = end + 1
    for chunk in _chunks(scattered):
        Partition.objects.filter(pk__in=chunk).update(**values)


def _held(held_until: datetime | None, now: datetime) -> bool:
    """A fenced incarnation may still be consuming it (groups.incarnations): no owner until then."""
    return held_until is not None and held_until >= now


def force_rebalance(group_id: str, now: datetime) -> RebalanceEvent:
    with transaction.atomic():
        group = lock_group(group_id)
        if group is None:
            raise GroupNotFound(f"no group {group_id!r}")
        operator = current_operator()  # forced in the admin: the history names who
        detail = f"forced by operator {operator.name}" if operator else ""
        return rebalance(group, RebalanceReason.MANUAL, now, detail=detail)
