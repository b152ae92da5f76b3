"""What an operator's rebalance or member removal would do, computed before it is done: the same inputs
``groups.rebalance.rebalance`` reads, given to the pure assignor, changing nothing. The group may change
between the preview and the action; the confirmation page says so."""

from __future__ import annotations

from dataclasses import dataclass

from . import assignor
from .assignments import by_topic
from .models import ServiceGroup, Topic


@dataclass(frozen=True)
class Move:
    """One partition whose target member changes: ``source`` None was unassigned, ``destination`` None
    becomes unassigned (nobody subscribes to its topic any more)."""

    topic: str
    number: int
    source: str | None
    destination: str | None


@dataclass(frozen=True)
class Plan:
    """A previewed rebalance: the generation it will produce and the partitions that move."""

    generation: int
    moves: list[Move]
    revoked: dict[str, list[int]]  # for a removal: what the departing member owns now (revoked from it)

    def moves_by_pair(self) -> list[tuple[str | None, str | None, dict[str, list[int]]]]:
        """Moves grouped by (from, to), partitions by topic: what a confirmation page lists."""
        pairs: dict[tuple[str | None, str | None], list[tuple[str, int]]] = {}
        for move in self.moves:
            pairs.setdefault((move.source, move.destination), []).append((move.topic, move.number))
        return [
            (source, destination, by_topic(parts))
            for (source, destination), parts in sorted(
                pairs.items(), key=lambda item: (item[0][0] or "", item[0][1] or "")
            )
        ]


def plan(group: ServiceGroup, without: str | None = None) -> Plan:
    """The rebalance the group would go through now (``without``: as if that member had left)."""
    members = {m.pk: m for m in group.members.all()}
    staying = {m.member_id: m.topics for m in members.values() if m.member_id != without}
    subscribed = sorted({t for topics in staying.values() for t in topics})
    sizes = dict(Topic.objects.filter(name__in=subscribed).values_list("name", "partitions"))
    rows = list(group.partitions.values_list("topic", "number", "owner_id", "target_id"))
    current = {(t, n): members[target].member_id for t, n, _o, target in rows if target in members}
    target = assignor.assign(staying, sizes, {k: m for k, m in current.items() if m != without})
    moves = []
    for key in sorted(set(current) | set(target)):
        before, after = current.get(key), target.get(key)
        if before != after:
            moves.append(Move(key[0], key[1], before, after))
    revoked = (
        by_topic((t, n) for t, n, owner, _target in rows if owner in members and members[owner].member_id == without)
        if without
        else {}
    )
    return Plan(group.generation + 1, moves, revoked)
