"""Group membership: join, leave, member heartbeats and acknowledgements, and removing the members of
services that went away. Each change runs under the group's row lock and rebalances through
``groups.rebalance``; a member's session is a lease in Redis."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime

from django.db import transaction
from django.db.models import F

from registry import lease_store
from registry.errors import Forbidden, NotFound
from registry.models import ApiToken
from registry.redis_client import get_redis

from . import events, quotas
from .assignments import PartitionAssignment, assignment_of, member_rows, no_member
from .models import GroupMember, Partition, RebalanceReason, ServiceGroup
from .rebalance import lock_group, members_of, rebalance, update_state
from .topics import ensure_topics


class MemberNotFound(NotFound):
    pass


class NotOwner(Forbidden):
    """The token did not create this member and is not staff."""


class GroupNotYours(Forbidden):
    """The group belongs to another token: only its owner, granted tokens and staff may join it."""


def put_session(member: GroupMember, now_ms: int) -> None:
    lease_store.put_session(
        get_redis(),
        member.group_id,
        member.member_id,
        timeout_seconds=member.session_timeout,
        deadline_ms=now_ms + member.session_timeout * 1000,
        owner_id=member.owner_id,
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
    quotas.check_topics_per_join(topics)
    now_ms = lease_store.to_ms(now)
    with transaction.atomic():
        # Any refusal below rolls back these creations: nothing is written.
        ensure_topics(topics, owner=token)
        # The first join creates the group, owned by its token.
        ServiceGroup.objects.bulk_create([ServiceGroup(group_id=group_id, owner=token)], ignore_conflicts=True)
        group = lock_group(group_id)
        assert group is not None
        if not group.allows(token):
            raise GroupNotYours(
                f"group {group_id!r} belongs to another token; an operator can grant your token access to it "
                "(admin: consumer groups, grants)"
            )
        member = group.members.filter(member_id=member_id).first()
        created = member is None
        if created:
            quotas.check_room_for_member(group)
            member = GroupMember.objects.create(
                group=group,
                member_id=member_id,
                service_name=service_name,
                topics=topics,
                session_timeout=session_timeout,
                joined_at=now,
                owner=token,
            )
            rebalance(group, RebalanceReason.JOIN, now, members_before=members_of(group, exclude=member_id))
        else:
            if not token.may_change_member(member):
                raise NotOwner(f"member {member_id!r} was joined by another token")
            changed = member.topics != topics
            member.service_name, member.topics, member.session_timeout = service_name, topics, session_timeout
            member.save(update_fields=["service_name", "topics", "session_timeout"])
            if changed:
                rebalance(group, RebalanceReason.JOIN, now)
        put_session(member, now_ms)
        return assignment_of(group, member), created


def leave(
    group_id: str, member_id: str, actor: ApiToken | None, now: datetime, reason: str = RebalanceReason.LEAVE
) -> None:
    """Remove a member and rebalance. ``actor`` None is an operator or the system (authorised)."""
    with transaction.atomic():
        group = lock_group(group_id)
        member = group.members.filter(member_id=member_id).first() if group else None
        if group is None or member is None:
            raise MemberNotFound(no_member(group_id, member_id))
        if actor is not None and not actor.may_change_member(member):
            raise NotOwner(f"member {member_id!r} was joined by another token")
        before = members_of(group)
        lease_store.remove_session(get_redis(), group_id, member_id)
        member.delete()  # its partitions lose their owner and target (SET NULL)
        event = rebalance(group, reason, now, members_before=before)
        events.member_removed(group_id, member_id, event.generation, group.version, reason)


def remove_members(owners: Mapping[str, int | None], reason: str, now: datetime) -> list[tuple[str, str]]:
    """Their services went away: remove each member id in ``owners`` from every group where the token
    that joined it is the one that owned the service (``owners``: service id -> owner token id). A
    member of the same id joined by another token is not the service's to remove."""
    removed = []
    for group_id, member_id, owner_id in GroupMember.objects.filter(member_id__in=list(owners)).values_list(
        "group_id", "member_id", "owner_id"
    ):
        if owner_id is None or owner_id != owners[member_id]:
            continue
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
            group = lock_group(group_id)
            member = group.members.filter(member_id=member_id).first() if group else None
            if member is None:
                raise MemberNotFound(no_member(group_id, member_id))
            put_session(member, now_ms)
    rows = member_rows(member)
    must_release = any(
        owner_id == member.pk and target_id != member.pk and target_gen <= generation
        for _t, _n, owner_id, target_id, target_gen in rows
    )
    if must_release or member.acked_generation < generation <= member.group.generation:
        acknowledge(group_id, member_id, generation)
        member = GroupMember.objects.select_related("group").filter(group_id=group_id, member_id=member_id).first()
        if member is None:
            raise MemberNotFound(no_member(group_id, member_id))
        rows = member_rows(member)
    return assignment_of(member.group, member, rows)


def acknowledge(group_id: str, member_id: str, generation: int) -> int:
    """The member confirms ``generation``: hand over what it was revoking up to that generation.

    A generation ahead of the group's is not applied. Returns how many partitions changed hands.
    """
    with transaction.atomic():
        group = lock_group(group_id)
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
            update_state(group)
            events.group_changed(group_id)
        return released
