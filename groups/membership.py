"""Group membership: join, leave, member heartbeats and acknowledgements, and removing the members of
services that went away. Each change runs under the group's row lock and rebalances through
``groups.rebalance``; a member's session is a lease in Redis. Every join starts a new incarnation
(``member_epoch``, see ``groups.incarnations``); heartbeats, acks and leaves carrying another one are
refused and change nothing."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import datetime

from django.db import transaction
from django.db.models import F

from registry import lease_store
from registry.errors import Forbidden, NotFound
from registry.models import ApiToken
from registry.redis_client import get_redis

from . import events, incarnations, quotas
from .assignments import PartitionAssignment, assignment_of, member_rows, no_member
from .models import GroupMember, Partition, RebalanceReason
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
        member_epoch=member.member_epoch,
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
    static: bool = False,
) -> tuple[PartitionAssignment, bool]:
    """Join a group as a new incarnation of ``member_id`` (a new ``member_epoch``).

    A member id whose current incarnation is live is refused (MemberIdInUse) unless ``static``: then
    that incarnation is fenced, told so and disconnected, and what it owned is held until its session
    deadline (at once if it had lapsed). A new member or changed subscriptions rebalance the group.
    """
    topics = sorted(set(topics))
    quotas.check_topics_per_join(topics)
    now_ms = lease_store.to_ms(now)
    with transaction.atomic():
        # Any refusal below rolls back these creations: nothing is written.
        ensure_topics(topics, owner=token)
        group = lock_group(group_id, create_for=token)  # the first join creates it, owned by its token
        assert group is not None
        if not group.allows(token):
            raise GroupNotYours(
                f"group {group_id!r} belongs to another token; an operator can grant your token access to it "
                "(admin: consumer groups, grants)"
            )
        member = group.members.filter(member_id=member_id).first()
        created = member is None
        if member is not None and not token.may_change_member(member):
            raise NotOwner(f"member {member_id!r} was joined by another token")
        if created:
            quotas.check_room_for_member(group)
        epoch = incarnations.next_epoch(group)
        if member is None:
            member = GroupMember.objects.create(
                group=group,
                member_id=member_id,
                service_name=service_name,
                topics=topics,
                session_timeout=session_timeout,
                joined_at=now,
                owner=token,
                member_epoch=epoch,
                static=static,
            )
            incarnations.start_session(member, now_ms, "new")
            rebalance(group, RebalanceReason.JOIN, now, members_before=members_of(group, exclude=member_id))
            return assignment_of(group, member), created
        fenced_epoch, old_timeout = member.member_epoch, member.session_timeout
        changed = member.topics != topics
        member.service_name, member.topics, member.session_timeout = service_name, topics, session_timeout
        member.member_epoch, member.static, member.joined_at, member.acked_generation = epoch, static, now, 0
        previous_ms = incarnations.start_session(member, now_ms, "static" if static else "dynamic", old_timeout)
        # told first: its sockets close before they could see the new incarnation's assignment
        events.member_removed(
            group_id, member_id, group.generation, group.version, events.FENCED, member_epoch=fenced_epoch
        )
        member.save(
            update_fields=[
                "service_name",
                "topics",
                "session_timeout",
                "member_epoch",
                "static",
                "joined_at",
                "acked_generation",
            ]
        )
        held = 0
        if previous_ms is not None and previous_ms >= now_ms:
            held = incarnations.hold(member, lease_store.from_ms(previous_ms))
        if changed:
            rebalance(group, RebalanceReason.JOIN, now)
        else:
            if held:
                group.version += 1
                group.save(update_fields=["version", "updated_at"])
                update_state(group)
            events.group_changed(group_id)  # the new incarnation's epoch, to the group's followers
        return assignment_of(group, member), created


def leave(
    group_id: str,
    member_id: str,
    actor: ApiToken | None,
    now: datetime,
    reason: str = RebalanceReason.LEAVE,
    member_epoch: int | None = None,
    detail: str = "",
) -> None:
    """Remove a member and rebalance. ``actor`` None is an operator or the system (authorised);
    ``member_epoch`` None removes whichever incarnation is current (operators), else it must be it.
    ``detail`` goes to the rebalance history (who removed it)."""
    with transaction.atomic():
        group = lock_group(group_id)
        member = group.members.filter(member_id=member_id).first() if group else None
        if group is None or member is None:
            raise MemberNotFound(no_member(group_id, member_id))
        if actor is not None and not actor.may_change_member(member):
            raise NotOwner(f"member {member_id!r} was joined by another token")
        incarnations.check_epoch(member, member_epoch)
        before = members_of(group)
        lease_store.remove_session(get_redis(), group_id, member_id)
        member.delete()  # its partitions lose their owner and target (SET NULL)
        event = rebalance(group, reason, now, members_before=before, detail=detail)
        events.member_removed(
            group_id, member_id, event.generation, group.version, reason, member_epoch=member.member_epoch
        )


def remove_by_operator(group_id: str, member_id: str, username: str, now: datetime) -> None:
    """An operator removes a member: a rebalance recorded as such ("removed by operator <username>"),
    not as the member's own leave."""
    leave(group_id, member_id, None, now, reason=RebalanceReason.REMOVED, detail=f"removed by operator {username}")


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


def heartbeat(
    group_id: str, member_id: str, generation: int, member_epoch: int, actor: ApiToken, now: datetime
) -> PartitionAssignment:
    """Keep the session of incarnation ``member_epoch`` and confirm ``generation``; answers with the
    member's current assignment. Another incarnation's epoch is refused (FencedMemberEpoch).

    Confirming a generation releases the partitions the member was asked to give up at or
    before it; a stale generation releases nothing and still gets the current assignment.
    """
    member = GroupMember.objects.select_related("group").filter(group_id=group_id, member_id=member_id).first()
    if member is None:
        raise MemberNotFound(no_member(group_id, member_id))
    if not actor.may_change_member(member):
        raise NotOwner(f"member {member_id!r} was joined by another token")
    incarnations.check_epoch(member, member_epoch)
    r = get_redis()
    now_ms = lease_store.to_ms(now)
    try:
        renewed = lease_store.renew_session(r, group_id, member_id, now_ms, member_epoch)
    except lease_store.StaleEpoch:
        renewed = None  # Redis says another incarnation: a later join, or one rolled back; the row decides
    if renewed is None:
        # expired and removed a moment ago, Redis lost the session, or another epoch: the row decides
        with transaction.atomic():
            group = lock_group(group_id)
            member = group.members.filter(member_id=member_id).first() if group else None
            if member is None:
                raise MemberNotFound(no_member(group_id, member_id))
            incarnations.check_epoch(member, member_epoch)
            put_session(member, now_ms)
            renewed = now_ms + member.session_timeout * 1000
    rows = member_rows(member)
    # a partition it will own may be held for a fenced incarnation: hand it over once the hold ended
    waiting = any(owner_id is None and target_id == member.pk for _t, _n, owner_id, target_id, _g in rows)
    if waiting and incarnations.release_due(member, now) and incarnations.release_in_group(group_id, now):
        rows = member_rows(member)
    must_release = any(
        owner_id == member.pk and target_id != member.pk and target_gen <= generation
        for _t, _n, owner_id, target_id, target_gen in rows
    )
    if must_release or member.acked_generation < generation <= member.group.generation:
        acknowledge(group_id, member_id, generation, member_epoch)
        member = GroupMember.objects.select_related("group").filter(group_id=group_id, member_id=member_id).first()
        if member is None:
            raise MemberNotFound(no_member(group_id, member_id))
        rows = member_rows(member)
    return replace(assignment_of(member.group, member, rows), session_expires_at=lease_store.from_ms(renewed))


def acknowledge(group_id: str, member_id: str, generation: int, member_epoch: int | None = None) -> int:
    """Incarnation ``member_epoch`` confirms ``generation``: hand over what it was revoking up to that
    generation. Another incarnation's epoch is refused (FencedMemberEpoch).

    A generation ahead of the group's is not applied. Returns how many partitions changed hands.
    """
    with transaction.atomic():
        group = lock_group(group_id)
        member = group.members.filter(member_id=member_id).first() if group else None
        if member is not None:
            incarnations.check_epoch(member, member_epoch)
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
