"""Member incarnations, as Kafka's KIP-848 member epoch: every join starts a new ``member_epoch``, and
only the current incarnation may heartbeat, ack, follow its socket or leave. A join with the id of a
live incarnation is refused (dynamic member) or fences it (static member), and the partitions the
fenced incarnation owned are held, owned by nobody, until it can no longer be consuming.

Rules:

- Epochs come from a per-group counter (``ServiceGroup.member_epochs``) taken under the group lock,
  so an epoch is never handed out twice in a group, even to a member id that left and came back.
- Redis records each session's epoch; a renewal carrying another epoch renews nothing
  (``lease_store.renew_session``), and a join reads and replaces the previous session in one step
  (``lease_store.take_session``), so no renewal of the old incarnation can slip in after the
  deadline the join read.
- A fenced incarnation may still be consuming until its session deadline (its last confirmed
  heartbeat + session timeout; a correct client stops when it cannot confirm its session in time).
  Its partitions are held until that deadline (``Partition.held_until``), then handed to their
  target: the same id's new incarnation, unless a rebalance moved them meanwhile.
"""

from __future__ import annotations

from datetime import datetime

from django.db import transaction
from django.db.models import F

from registry import lease_store
from registry.errors import Conflict
from registry.leases import Guard
from registry.redis_client import get_redis

from . import events
from .models import GroupMember, Partition, ServiceGroup
from .rebalance import lock_group, update_state


class FencedMemberEpoch(Conflict):
    """The request carries a member epoch that is not the member's current incarnation."""

    code = "fenced_member_epoch"


class MemberIdInUse(Conflict):
    """A dynamic join named a member id whose current incarnation is still live."""

    code = "member_id_in_use"


def next_epoch(group: ServiceGroup) -> int:
    """The group's next member epoch. The caller holds the group lock."""
    group.member_epochs += 1
    group.save(update_fields=["member_epochs", "updated_at"])
    return group.member_epochs


def check_epoch(member: GroupMember, member_epoch: int | None) -> None:
    """FencedMemberEpoch unless ``member_epoch`` is the member's current one (None: not checked)."""
    if member_epoch is not None and member_epoch != member.member_epoch:
        raise fenced(member, member_epoch)


def fenced(member: GroupMember, member_epoch: int) -> FencedMemberEpoch:
    return FencedMemberEpoch(
        f"member_epoch {member_epoch} is not the current incarnation of member {member.member_id!r} "
        f"in group {member.group_id!r}: it was fenced by a later join. Stop consuming and join again.",
        member_epoch=member.member_epoch,
    )


def fenced_message(member: GroupMember, member_epoch: int) -> dict[str, object]:
    """The websocket form of a fenced refusal: an ``error`` message with the same code and body."""
    return {"type": "error", **fenced(member, member_epoch).body()}


def start_session(member: GroupMember, now_ms: int, mode: str, previous_timeout: int = 0) -> int | None:
    """Start the session of the member's (new) incarnation in Redis; returns the previous incarnation's
    deadline (ms) for a member that had one. ``mode``: 'new' (no previous incarnation), 'dynamic'
    (MemberIdInUse while the previous one is live, nothing changed) or 'static' (fences it).
    ``previous_timeout``: the previous incarnation's session timeout (seconds)."""
    taken, previous = lease_store.take_session(
        get_redis(),
        member.group_id,
        member.member_id,
        now_ms=now_ms,
        timeout_seconds=member.session_timeout,
        member_epoch=member.member_epoch,
        mode=mode,
        # a row without a session (Redis lost it): its incarnation may have heartbeated just now
        unknown_deadline_ms=now_ms + previous_timeout * 1000,
        owner_id=member.owner_id,  # couples the session to that token's service of the same id
    )
    if not taken:
        assert previous is not None
        raise MemberIdInUse(
            f"member {member.member_id!r} of group {member.group_id!r} is live (its session runs until "
            f"{lease_store.from_ms(previous).isoformat()}): join with another member_id, wait until its "
            "session ends, leave first, or join with static: true to fence it",
            session_expires_at=lease_store.from_ms(previous).isoformat().replace("+00:00", "Z"),
        )
    return previous


def hold(member: GroupMember, until: datetime) -> int:
    """The fenced incarnation may consume what the member owns until ``until``: no owner until then."""
    return Partition.objects.filter(group_id=member.group_id, owner=member).update(owner=None, held_until=until)


def release(group: ServiceGroup, now: datetime) -> int:
    """Hand partitions whose hold ended (strictly before ``now``) to their target. The caller holds the
    group lock. Returns how many were released."""
    lapsed = Partition.objects.filter(group=group, held_until__lt=now)
    released = lapsed.update(owner=F("target"), held_until=None)
    if released:
        # rows kept only for their hold (no member reads the topic any more) are gone now
        Partition.objects.filter(group=group, owner=None, target=None).exclude(topic__in=group.topics).delete()
        group.version += 1
        group.save(update_fields=["version", "updated_at"])
        update_state(group)
        events.group_changed(group.group_id)
    return released


def release_due(member: GroupMember, now: datetime) -> bool:
    """Whether a partition waiting for ``member`` is held by a hold that has ended."""
    return Partition.objects.filter(group_id=member.group_id, target=member, owner=None, held_until__lt=now).exists()


def release_in_group(group_id: str, now: datetime, guard: Guard = transaction.atomic) -> int:
    """``release`` in one group, under its lock (``guard`` makes the transaction: fenced for a leader)."""
    with guard() as run:
        group = lock_group(group_id)
        if group is None:
            return 0
        released = release(group, now)
        if run is not None and released:
            run.items = released
        return released


def release_lapsed_holds(now: datetime, limit: int = 500, guard: Guard = transaction.atomic) -> int:
    """The expiry job's part: release the holds that ended, in up to ``limit`` groups."""
    group_ids = list(
        Partition.objects.filter(held_until__lt=now).order_by("group_id").values_list("group_id", flat=True).distinct()
    )[:limit]
    return sum(release_in_group(group_id, now, guard) for group_id in group_ids)
