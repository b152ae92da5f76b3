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
from datetime import datetime

from django.db import transaction
from django.db.models import F

from registry.errors import NotFound

from . import assignor, events
from .models import GroupState, Partition, RebalanceEvent, RebalanceReason, ServiceGroup, Topic

log = logging.getLogger(__name__)


class GroupNotFound(NotFound):
    pass


def lock_group(group_id: str, *, create: bool = False) -> ServiceGroup | None:
    """The group's row, locked until the transaction ends (created first with ``create``); None if absent."""
    group = ServiceGroup.objects.select_for_update().filter(pk=group_id).first()
    if group is None and create:
        ServiceGroup.objects.bulk_create([ServiceGroup(group_id=group_id)], ignore_conflicts=True)
        group = ServiceGroup.objects.select_for_update().get(pk=group_id)
    return group


def members_of(group: ServiceGroup, exclude: str | None = None) -> list[str]:
    """The group's member ids, sorted (``exclude`` left out): the history's before/after lists."""
    return sorted(m for m in group.members.values_list("member_id", flat=True) if m != exclude)


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
    group: ServiceGroup, reason: str, now: datetime, members_before: list[str] | None = None
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

    rows = {(p.topic, p.number): p for p in group.partitions.all()}
    wanted = set(assignor.all_partitions(sizes, subscribed))
    # a held partition (groups.incarnations) outlives its topic's subscription until its hold ends
    stale = [p.pk for key, p in rows.items() if key not in wanted and not _held(p, now)]
    if stale:
        Partition.objects.filter(pk__in=stale).delete()
    new_keys = wanted - rows.keys()
    Partition.objects.bulk_create([Partition(group=group, topic=t, number=n) for t, n in sorted(new_keys)])
    rows = {(p.topic, p.number): p for p in group.partitions.all()}

    current = {key: by_pk[p.target_id].member_id for key, p in rows.items() if p.target_id in by_pk}
    target = assignor.assign({m.member_id: m.topics for m in members}, sizes, current)
    generation = group.generation + 1
    changed = []
    moved = 0  # partitions that existed before and now go to another member (a departed one's included)
    for key, row in rows.items():
        new_target = by_id[target[key]].pk if key in target else None
        dirty = False
        if row.target_id != new_target:
            moved += key not in new_keys
            row.target_id, row.target_generation, dirty = new_target, generation, True
        if row.owner_id is None and row.target_id is not None and not _held(row, now):
            row.owner_id, row.held_until, dirty = row.target_id, None, True  # nobody to revoke from: assign at once
        if dirty:
            changed.append(row)
    Partition.objects.bulk_update(changed, ["owner", "target", "target_generation", "held_until"], batch_size=1000)

    group.generation = generation
    group.version += 1
    group.topics = subscribed
    group.save(update_fields=["generation", "version", "topics", "updated_at"])
    update_state(group)
    event = RebalanceEvent.objects.create(
        group=group,
        generation=generation,
        reason=reason,
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


def _held(row: Partition, now: datetime) -> bool:
    """A fenced incarnation may still be consuming it (groups.incarnations): no owner until then."""
    return row.held_until is not None and row.held_until >= now


def force_rebalance(group_id: str, now: datetime) -> RebalanceEvent:
    with transaction.atomic():
        group = lock_group(group_id)
        if group is None:
            raise GroupNotFound(f"no group {group_id!r}")
        return rebalance(group, RebalanceReason.MANUAL, now)
