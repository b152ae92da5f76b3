"""Joining, leaving, heartbeating and expiring group members, and the rebalance they cause.

Every change to a group runs under that group's row lock (SELECT ... FOR UPDATE on PostgreSQL,
SQLite's immediate transactions), so generations are strictly sequential per group without a
global lock. ``rebalance`` bumps the generation, asks the pure assignor for the target and
applies revoke-before-assign: a partition whose target changed stays with its owner until the
owner confirms the new generation, leaves or times out.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import F, Q

from registry import lease_store
from registry.errors import Forbidden, NotFound
from registry.leases import Guard
from registry.models import ApiToken
from registry.redis_client import get_redis

from . import assignor, events
from .models import GroupMember, GroupState, Partition, RebalanceEvent, RebalanceReason, ServiceGroup, Topic

log = logging.getLogger(__name__)

MAX_PARTITIONS = 10_000


class GroupNotFound(NotFound):
    pass


class MemberNotFound(NotFound):
    pass


class NotOwner(Forbidden):
    """The token did not create this member and is not staff."""


class TopicShrink(Exception):
    """Topics can grow, never shrink: consumers' offsets are per partition."""


class TopicInUse(Exception):
    """A topic some group reads cannot be deleted: its partitions would vanish under their owners."""


@dataclass(frozen=True)
class PartitionAssignment:
    """A member's view: what it owns now, what of that it must give up, what it will receive."""

    group_id: str
    member_id: str
    generation: int
    assigned_partitions: dict[str, list[int]]
    revoking: dict[str, list[int]] = field(default_factory=dict)
    pending: dict[str, list[int]] = field(default_factory=dict)
    version: int = 0  # the group's version: orders views of one generation (hand-overs)

    def as_dict(self) -> dict[str, Any]:
        return {
            "group_id": self.group_id,
            "member_id": self.member_id,
            "generation": self.generation,
            "assigned_partitions": self.assigned_partitions,
            "revoking": self.revoking,
            "pending": self.pending,
            "version": self.version,
        }


def no_member(group_id: str, member_id: str) -> str:
    return f"no member {member_id!r} in group {group_id!r}; join again"


def _by_topic(pairs: Iterable[tuple[str, int]]) -> dict[str, list[int]]:
    result: dict[str, list[int]] = {}
    for topic, number in sorted(pairs):
        result.setdefault(topic, []).append(number)
    return result


def member_views(group: ServiceGroup) -> dict[str, PartitionAssignment]:
    """Every member's PartitionAssignment, from one read of the group's partitions."""
    members = {m.pk: m.member_id for m in group.members.all()}
    owned: dict[str, list[tuple[str, int]]] = {m: [] for m in members.values()}
    revoking: dict[str, list[tuple[str, int]]] = {m: [] for m in members.values()}
    pending: dict[str, list[tuple[str, int]]] = {m: [] for m in members.values()}
    for topic, number, owner_id, target_id in group.partitions.values_list("topic", "number", "owner_id", "target_id"):
        if owner_id in members:
            owned[members[owner_id]].append((topic, number))
            if target_id != owner_id:
                revoking[members[owner_id]].append((topic, number))
        if target_id in members and target_id != owner_id:
            pending[members[target_id]].append((topic, number))
    return {
        m: PartitionAssignment(
            group.group_id,
            m,
            group.generation,
            _by_topic(owned[m]),
            _by_topic(revoking[m]),
            _by_topic(pending[m]),
            group.version,
        )
        for m in members.values()
    }


def _member_rows(member: GroupMember) -> list[tuple[str, int, int | None, int | None, int]]:
    return list(
        Partition.objects.filter(Q(owner=member) | Q(target=member))
        .filter(group_id=member.group_id)
        .values_list("topic", "number", "owner_id", "target_id", "target_generation")
    )


def assignment_of(group: ServiceGroup, member: GroupMember, rows: list | None = None) -> PartitionAssignment:
    """The member's view. ``group`` must have been read before the partition rows: a generation
    label older than the rows is harmless (the member confirms less than it could), a newer one
    would let it confirm a revocation it has not been shown."""
    owned, revoking, pending = [], [], []
    for topic, number, owner_id, target_id, _gen in _member_rows(member) if rows is None else rows:
        if owner_id == member.pk:
            owned.append((topic, number))
            if target_id != member.pk:
                revoking.append((topic, number))
        elif target_id == member.pk:
            pending.append((topic, number))
    return PartitionAssignment(
        group.group_id,
        member.member_id,
        group.generation,
        _by_topic(owned),
        _by_topic(revoking),
        _by_topic(pending),
        group.version,
    )


# --- topics ----------------------------------------------------------------------------------


def put_topic(name: str, partitions: int, now: datetime) -> tuple[Topic, bool]:
    """Create a topic or grow it; shrinking raises TopicShrink. Groups reading it rebalance."""
    with transaction.atomic():
        topic, created = Topic.objects.select_for_update().get_or_create(name=name, defaults={"partitions": partitions})
        if not created:
            if topic.partitions == partitions:
                return topic, created
            if partitions < topic.partitions:
                raise TopicShrink(f"{name} has {topic.partitions} partitions; topics can grow but never shrink")
            topic.partitions = partitions
            topic.save(update_fields=["partitions", "updated_at"])
    # A created topic may already be subscribed to (its groups waited for it): they rebalance too.
    for group_id in groups_reading(name):
        with transaction.atomic():
            group = _lock_group(group_id)
            if group is not None:
                rebalance(group, RebalanceReason.TOPIC_CHANGE, now)
    return topic, created


def delete_topic(name: str) -> None:
    """Delete a topic no group reads; TopicInUse otherwise (the admin and the API refuse it)."""
    with transaction.atomic():
        topic = Topic.objects.select_for_update().filter(pk=name).first()
        if topic is None:
            return
        readers = groups_reading(name)
        if readers:
            raise TopicInUse(
                f"topic {name!r} is read by group(s) {', '.join(readers)}; they must stop reading it first"
            )
        topic.delete()


def groups_reading(topic: str) -> list[str]:
    return [g for g, topics in ServiceGroup.objects.values_list("group_id", "topics") if topic in topics]


def _ensure_topics(names: Iterable[str]) -> None:
    default = settings.REGISTRY_DEFAULT_PARTITIONS
    Topic.objects.bulk_create([Topic(name=n, partitions=default) for n in names], ignore_conflicts=True)


# --- membership ------------------------------------------------------------------------------


def _lock_group(group_id: str, *, create: bool = False) -> ServiceGroup | None:
    group = ServiceGroup.objects.select_for_update().filter(pk=group_id).first()
    if group is None and create:
        ServiceGroup.objects.bulk_create([ServiceGroup(group_id=group_id)], ignore_conflicts=True)
        group = ServiceGroup.objects.select_for_update().get(pk=group_id)
    return group


def _put_session(member: GroupMember, now_ms: int) -> None:
    lease_store.put_session(
        get_redis(),
        member.group_id,
        member.member_id,
        timeout_seconds=member.session_timeout,
        deadline_ms=now_ms + member.session_timeout * 1000,
    )


def join(
    group_id: str,
    member_id: str,
    service_name: str,
    topics: Sequence[str],
    token: ApiToken,
    now: datetime,
    session_timeout: int = 30,
) -> tuple[PartitionAssignment, bool]:
    """Join (or re-join) a group. A new member or changed subscriptions rebalance the group."""
    topics = sorted(set(topics))
    now_ms = lease_store.to_ms(now)
    with transaction.atomic():
        _ensure_topics(topics)
        group = _lock_group(group_id, create=True)
        assert group is not None
        member = group.members.filter(member_id=member_id).first()
        created = member is None
        if created:
            member = GroupMember.objects.create(
                group=group,
                member_id=member_id,
                service_name=service_name,
                topics=topics,
                session_timeout=session_timeout,
                joined_at=now,
                owner=token,
            )
            rebalance(group, RebalanceReason.JOIN, now, members_before=_ids(group, exclude=member_id))
        else:
            if not token.may_change_member(member):
                raise NotOwner(f"member {member_id!r} was joined by another token")
            changed = member.topics != topics
            member.service_name, member.topics, member.session_timeout = service_name, topics, session_timeout
            member.save(update_fields=["service_name", "topics", "session_timeout"])
            if changed:
                rebalance(group, RebalanceReason.JOIN, now)
        _put_session(member, now_ms)
        return assignment_of(group, member), created


def _ids(group: ServiceGroup, exclude: str | None = None) -> list[str]:
    return sorted(m for m in group.members.values_list("member_id", flat=True) if m != exclude)


def leave(
    group_id: str, member_id: str, actor: ApiToken | None, now: datetime, reason: str = RebalanceReason.LEAVE
) -> None:
    """Remove a member and rebalance. ``actor`` None is an operator or the system (authorised)."""
    with transaction.atomic():
        group = _lock_group(group_id)
        member = group.members.filter(member_id=member_id).first() if group else None
        if group is None or member is None:
            raise MemberNotFound(no_member(group_id, member_id))
        if actor is not None and not actor.may_change_member(member):
            raise NotOwner(f"member {member_id!r} was joined by another token")
        before = _ids(group)
        lease_store.remove_session(get_redis(), group_id, member_id)
        member.delete()  # its partitions lose their owner and target (SET NULL)
        event = rebalance(group, reason, now, members_before=before)
        events.member_removed(group_id, member_id, event.generation, group.version, reason)


def remove_members(member_ids: Sequence[str], reason: str, now: datetime) -> list[tuple[str, str]]:
    """Remove these member ids from every group they are in (their service went away)."""
    removed = []
    for group_id, member_id in GroupMember.objects.filter(member_id__in=list(member_ids)).values_list(
        "group_id", "member_id"
    ):
        try:
            leave(group_id, member_id, None, now, reason=reason)
            removed.append((group_id, member_id))
        except MemberNotFound:
            pass
    return removed


def heartbeat(group_id: str, member_id: str, generation: int, actor: ApiToken, now: datetime) -> PartitionAssignment:
    """Keep a member's session and confirm ``generation``; answers with its current assignment.

    Confirming a generation releases the partitions the member was asked to give up at or
    before it; a stale generation releases nothing and still gets the current assignment.
    """
    member = GroupMember.objects.select_related("group").filter(group_id=group_id, member_id=member_id).first()
    if member is None:
        raise MemberNotFound(no_member(group_id, member_id))
    if not actor.may_change_member(member):
        raise NotOwner(f"member {member_id!r} was joined by another token")
    r = get_redis()
    now_ms = lease_store.to_ms(now)
    if lease_store.renew_session(r, group_id, member_id, now_ms) is None:
        # expired and removed a moment ago, or Redis lost the session: the row decides
        with transaction.atomic():
            group = _lock_group(group_id)
            member = group.members.filter(member_id=member_id).first() if group else None
            if member is None:
                raise MemberNotFound(no_member(group_id, member_id))
            _put_session(member, now_ms)
    rows = _member_rows(member)
    must_release = any(
        owner_id == member.pk and target_id != member.pk and target_gen <= generation
        for _t, _n, owner_id, target_id, target_gen in rows
    )
    if must_release or member.acked_generation < generation <= member.group.generation:
        acknowledge(group_id, member_id, generation)
        member = GroupMember.objects.select_related("group").filter(group_id=group_id, member_id=member_id).first()
        if member is None:
            raise MemberNotFound(no_member(group_id, member_id))
        rows = _member_rows(member)
    return assignment_of(member.group, member, rows)


def acknowledge(group_id: str, member_id: str, generation: int) -> int:
    """The member confirms ``generation``: hand over what it was revoking up to that generation.

    A generation ahead of the group's is not applied. Returns how many partitions changed hands.
    """
    with transaction.atomic():
        group = _lock_group(group_id)
        member = group.members.filter(member_id=member_id).first() if group else None
        if group is None or member is None or generation > group.generation:
            return 0
        if generation > member.acked_generation:
            member.acked_generation = generation
            member.save(update_fields=["acked_generation"])
        released = (
            Partition.objects.filter(group=group, owner=member, target_generation__lte=generation)
            .exclude(target=member)
            .update(owner=F("target"))
        )
        if released:
            group.version += 1
            group.save(update_fields=["version", "updated_at"])
            _update_state(group)
            events.group_changed(group_id)
        return released


def _update_state(group: ServiceGroup) -> None:
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
    stale = [p.pk for key, p in rows.items() if key not in wanted]
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
        if row.owner_id is None and row.target_id is not None:
            row.owner_id, dirty = row.target_id, True  # nobody to revoke from: assign at once
        if dirty:
            changed.append(row)
    Partition.objects.bulk_update(changed, ["owner", "target", "target_generation"], batch_size=1000)

    group.generation = generation
    group.version += 1
    group.topics = subscribed
    group.save(update_fields=["generation", "version", "topics", "updated_at"])
    _update_state(group)
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


def force_rebalance(group_id: str, now: datetime) -> RebalanceEvent:
    with transaction.atomic():
        group = _lock_group(group_id)
        if group is None:
            raise GroupNotFound(f"no group {group_id!r}")
        return rebalance(group, RebalanceReason.MANUAL, now)


def expire_members(now: datetime, limit: int = 500, guard: Guard = transaction.atomic) -> list[tuple[str, str]]:
    """Remove up to ``limit`` members whose session ran out, one rebalance per group touched.

    ``guard`` makes each group's transaction; a leader passes one fenced with its term."""
    r = get_redis()
    now_ms = lease_store.to_ms(now)
    candidates = lease_store.expired_sessions(r, now_ms, limit)
    by_group: dict[str, list[str]] = {}
    for group_id, member_id in candidates:
        by_group.setdefault(group_id, []).append(member_id)
    removed: list[tuple[str, str]] = []
    for group_id, member_ids in sorted(by_group.items()):
        with guard() as run:
            group = _lock_group(group_id)
            gone = lease_store.remove_expired_sessions(r, [(group_id, m) for m in member_ids], now_ms)
            gone_ids = [m for _g, m in gone]
            if group is None or not gone_ids:
                continue
            before = _ids(group)
            deleted, _ = group.members.filter(member_id__in=gone_ids).delete()
            if deleted:
                event = rebalance(group, RebalanceReason.EXPIRY, now, members_before=before)
                for member_id in gone_ids:
                    events.member_removed(group_id, member_id, event.generation, group.version, RebalanceReason.EXPIRY)
                removed += [(group_id, m) for m in sorted(gone_ids) if m in before]
                if run is not None:
                    run.items = deleted
    return removed


def reconcile_sessions(now: datetime, grace: bool = False) -> int:
    """Restore missing Redis sessions of members in the database (one session timeout of grace
    when Redis lost its state); drop sessions whose member is gone. Returns how many changed."""
    r = get_redis()
    now_ms = lease_store.to_ms(now)
    changed = 0
    members = list(GroupMember.objects.values_list("group_id", "member_id", "session_timeout"))
    present = lease_store.session_deadlines(r, [(g, m) for g, m, _t in members])
    for group_id, member_id, timeout in members:
        if (group_id, member_id) not in present:
            deadline = now_ms + timeout * 1000 if grace else now_ms
            lease_store.put_session(
                r, group_id, member_id, timeout_seconds=timeout, deadline_ms=deadline, only_if_absent=True
            )
            changed += 1
    known = {(g, m) for g, m, _t in members}
    for session in list(lease_store.all_sessions(r)):
        if session not in known:
            lease_store.remove_session(r, *session)
            changed += 1
    lease_store.mark_sessions_built(r)
    return changed
