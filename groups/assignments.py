"""What each member of a group sees: its PartitionAssignment (owned, revoking, pending), read from the
group's partition rows. Read-only projections; every module that answers a member uses them."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.db.models import Q

from .models import GroupMember, Partition, ServiceGroup


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
    member_epoch: int = 0  # the member's current incarnation (groups.incarnations)
    # The session's deadline after the heartbeat or ack this view answers (None in other views).
    session_expires_at: datetime | None = None

    def as_dict(self) -> dict[str, Any]:
        view = {
            "group_id": self.group_id,
            "member_id": self.member_id,
            "generation": self.generation,
            "assigned_partitions": self.assigned_partitions,
            "revoking": self.revoking,
            "pending": self.pending,
            "version": self.version,
            "member_epoch": self.member_epoch,
        }
        if self.session_expires_at is not None:
            view["session_expires_at"] = self.session_expires_at.isoformat().replace("+00:00", "Z")
        return view


def no_member(group_id: str, member_id: str) -> str:
    return f"no member {member_id!r} in group {group_id!r}; join again"


def by_topic(pairs: Iterable[tuple[str, int]]) -> dict[str, list[int]]:
    result: dict[str, list[int]] = {}
    for topic, number in sorted(pairs):
        result.setdefault(topic, []).append(number)
    return result


def member_views(group: ServiceGroup) -> dict[str, PartitionAssignment]:
    """Every member's PartitionAssignment, from one read of the group's partitions."""
    rows = list(group.members.all())
    members = {m.pk: m.member_id for m in rows}
    epochs = {m.member_id: m.member_epoch for m in rows}
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
            by_topic(owned[m]),
            by_topic(revoking[m]),
            by_topic(pending[m]),
            group.version,
            epochs[m],
        )
        for m in members.values()
    }


def member_rows(member: GroupMember) -> list[tuple[str, int, int | None, int | None, int]]:
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
    for topic, number, owner_id, target_id, _gen in member_rows(member) if rows is None else rows:
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
        by_topic(owned),
        by_topic(revoking),
        by_topic(pending),
        group.version,
        member.member_epoch,
    )
