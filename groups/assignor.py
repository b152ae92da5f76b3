"""The partition assignor: a pure function from members, topics and current ownership to a target assignment.

No Django here, so property tests and benchmarks drive it directly. The result:

- assigns every partition of every subscribed topic to exactly one member subscribed to it;
- is balanced: members with identical subscriptions differ by at most one partition, and with
  different subscriptions no chain of moves between eligible members could make the counts
  more even (the max-min gap cannot shrink);
- is sticky: a partition keeps its current member unless balance requires a move, and a single
  join or leave moves the minimum number of partitions;
- is deterministic: the same input gives the same output, whatever the input's order.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Iterable, Mapping

Partition = tuple[str, int]


def all_partitions(topics: Mapping[str, int], subscribed: Iterable[str]) -> list[Partition]:
    return [(t, p) for t in sorted(set(subscribed)) if t in topics for p in range(topics[t])]


def assign(
    members: Mapping[str, Iterable[str]],
    topics: Mapping[str, int],
    current: Mapping[Partition, str],
) -> dict[Partition, str]:
    """Target owner of every partition that some member subscribes to.

    ``members`` maps member id to subscribed topic names; ``topics`` maps topic name to its
    partition count (subscriptions to unknown topics are ignored); ``current`` maps partitions
    to their member now (entries for gone members, unsubscribed topics or removed partitions
    are ignored).
    """
    subs = {m: frozenset(t for t in ts if t in topics) for m, ts in members.items()}
    subs = {m: ts for m, ts in subs.items() if ts}
    if not subs:
        return {}
    if len(set(subs.values())) == 1:
        return _assign_uniform(sorted(subs), all_partitions(topics, next(iter(subs.values()))), current)
    return _assign_general(subs, topics, current)


def _assign_uniform(
    members: list[str], partitions: list[Partition], current: Mapping[Partition, str]
) -> dict[Partition, str]:
    """Every member subscribes to the same topics: quotas of floor or ceil of P/M."""
    member_set = set(members)
    kept: dict[str, list[Partition]] = {m: [] for m in members}
    for partition in partitions:
        owner = current.get(partition)
        if owner in member_set:
            kept[owner].append(partition)
    base, extra = divmod(len(partitions), len(members))
    # The ceil quotas go to the members holding most now, so the fewest partitions move.
    by_holding = sorted(members, key=lambda m: (-len(kept[m]), m))
    quota = {m: base + (1 if i < extra else 0) for i, m in enumerate(by_holding)}

    target: dict[Partition, str] = {}
    for m in members:
        for partition in kept[m][: quota[m]]:
            target[partition] = m
    free = iter([p for p in partitions if p not in target])
    for m in members:
        for _ in range(quota[m] - min(len(kept[m]), quota[m])):
            target[next(free)] = m
    return target


def _assign_general(
    subs: Mapping[str, frozenset[str]], topics: Mapping[str, int], current: Mapping[Partition, str]
) -> dict[Partition, str]:
    """Different subscriptions: keep what is valid, place the rest, then even out along move chains."""
    members = sorted(subs)
    eligible: dict[str, list[str]] = defaultdict(list)
    for m in members:
        for t in subs[m]:
            eligible[t].append(m)
    partitions = all_partitions(topics, eligible)
    owned: dict[str, set[Partition]] = {m: set() for m in members}
    target: dict[Partition, str] = {}
    unplaced: list[Partition] = []
    for partition in partitions:
        owner = current.get(partition)
        if owner in owned and partition[0] in subs[owner]:
            target[partition] = owner
            owned[owner].add(partition)
        else:
            unplaced.append(partition)

    # Place the rest on the least loaded eligible member, most constrained topics first.
    unplaced.sort(key=lambda p: (len(eligible[p[0]]), p))
    for partition in unplaced:
        m = min(eligible[partition[0]], key=lambda c: (len(owned[c]), c))
        target[partition] = m
        owned[m].add(partition)

    _even_out(members, subs, owned, target)
    return target


def _even_out(
    members: list[str],
    subs: Mapping[str, frozenset[str]],
    owned: dict[str, set[Partition]],
    target: dict[Partition, str],
) -> None:
    """Shift partitions along chains giver -> ... -> taker while a taker has 2+ fewer than the giver.

    Each shift moves one partition per link and changes only the two ends' counts, so the
    number of moves is what balance requires; ends are chosen deterministically.
    """
    while True:
        moved = False
        for giver in sorted(members, key=lambda m: (-len(owned[m]), m)):
            path = _chain_to_lighter(giver, members, subs, owned)
            if path:
                for partition, taker in path:
                    owned[target[partition]].discard(partition)
                    owned[taker].add(partition)
                    target[partition] = taker
                moved = True
                break
        if not moved:
            return


def _chain_to_lighter(
    giver: str, members: list[str], subs: Mapping[str, frozenset[str]], owned: dict[str, set[Partition]]
) -> list[tuple[Partition, str]] | None:
    """Breadth-first search for the shortest chain of (partition, next member) hand-overs from
    ``giver`` to a member holding at least two fewer partitions."""
    limit = len(owned[giver]) - 2
    parent: dict[str, tuple[str, Partition] | None] = {giver: None}
    queue = deque([giver])
    while queue:
        m = queue.popleft()
        # the lowest partition of each topic m holds, one hand-over per neighbour and topic
        firsts: dict[str, Partition] = {}
        for partition in sorted(owned[m]):
            firsts.setdefault(partition[0], partition)
        for topic, partition in sorted(firsts.items()):
            for other in members:
                if other in parent or topic not in subs[other]:
                    continue
                parent[other] = (m, partition)
                if len(owned[other]) <= limit:
                    path: list[tuple[Partition, str]] = []
                    node = other
                    while parent[node] is not None:
                        prev, handed = parent[node]  # type: ignore[misc]
                        path.append((handed, node))
                        node = prev
                    path.reverse()
                    return path
                queue.append(other)
    return None


def moves(before: Mapping[Partition, str], after: Mapping[Partition, str]) -> int:
    """Partitions that had a member before and have a different one after."""
    return sum(1 for partition, owner in before.items() if partition in after and after[partition] != owner)


def counts(target: Mapping[Partition, str], members: Iterable[str]) -> dict[str, int]:
    result = dict.fromkeys(members, 0)
    for owner in target.values():
        result[owner] = result.get(owner, 0) + 1
    return result


__all__ = ["Partition", "all_partitions", "assign", "counts", "moves"]
