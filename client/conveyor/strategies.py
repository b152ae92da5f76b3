"""Load-balancing strategies over plain instance records: standard library only, shared by the server
(`balancer.strategies`) and the client's local balancer.

- round robin: each eligible instance in turn;
- smooth weighted round robin (nginx's algorithm): over any window of total-weight picks each instance
  is chosen exactly ``weight`` times, and picks interleave rather than burst;
- random weighted;
- hash: weighted rendezvous (highest random weight) hashing of a key, so removing an instance remaps
  only the keys it held.

Eligibility is the same for all: weight 0 never; healthy instances first, degraded ones only when no
instance is healthy; unhealthy and unknown never.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

HEALTHY, DEGRADED = "healthy", "degraded"
STRATEGIES = ("round_robin", "weighted", "random", "hash")


class NoHealthyInstance(Exception):
    """No instance can be chosen: none is healthy or degraded with a weight above 0."""


@dataclass(frozen=True)
class Instance:
    id: str
    endpoint: str = ""
    weight: int = 100
    health: str = HEALTHY


class Eligible(tuple[Instance, ...]):
    """A pool ``eligible`` already chose: passed back to a strategy, it is used as it is. A caller that
    selects many times from one pool (a client's local balancer) filters and sorts once per change, not
    once per pick."""


def eligible(instances: Iterable[Instance]) -> Eligible:
    """Healthy instances with weight > 0, or else degraded ones, sorted by id; NoHealthyInstance if none."""
    if isinstance(instances, Eligible):
        return instances
    pool = [i for i in instances if i.weight > 0]
    for health in (HEALTHY, DEGRADED):
        chosen = sorted((i for i in pool if i.health == health), key=lambda i: i.id)
        if chosen:
            return Eligible(chosen)
    raise NoHealthyInstance("no healthy or degraded instance with a weight above 0")


def round_robin(instances: Sequence[Instance], cursor: int) -> Instance:
    """The instance at ``cursor`` (0, 1, 2, ...) of the eligible ones."""
    pool = eligible(instances)
    return pool[cursor % len(pool)]


def smooth_weighted(instances: Sequence[Instance], current: dict[str, int]) -> Instance:
    """One nginx smooth weighted round-robin pick; ``current`` (id -> current weight) is updated in place."""
    pool = eligible(instances)
    total = 0
    best: Instance | None = None
    for inst in pool:
        current[inst.id] = current.get(inst.id, 0) + inst.weight
        total += inst.weight
        if best is None or current[inst.id] > current[best.id]:
            best = inst
    assert best is not None
    current[best.id] -= total
    for gone in set(current) - {i.id for i in pool}:
        del current[gone]
    return best


def random_weighted(instances: Sequence[Instance], rng: random.Random | None = None) -> Instance:
    pool = eligible(instances)
    return (rng or random).choices(pool, weights=[i.weight for i in pool], k=1)[0]


def _unit_hash(key: str, instance_id: str) -> float:
    digest = hashlib.blake2b(f"{key}\0{instance_id}".encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "big") + 1) / (2**64 + 1)  # in (0, 1)


def rendezvous(instances: Sequence[Instance], key: str) -> Instance:
    """Weighted highest-random-weight: score = -weight / ln(h(key, id)); the highest score wins."""
    pool = eligible(instances)
    return max(pool, key=lambda i: (-i.weight / math.log(_unit_hash(key, i.id)), i.id))


@dataclass
class LoadBalancer:
    """In-process balancer with its own rotation state (the HTTP endpoint keeps its state in Redis)."""

    _cursors: dict[frozenset[str], int] = field(default_factory=dict)
    _weights: dict[frozenset[str], dict[str, int]] = field(default_factory=dict)

    def select(self, services: Sequence[Instance], strategy: str = "round_robin", key: str | None = None) -> Instance:
        if strategy == "round_robin":
            pool_key = frozenset(i.id for i in eligible(services))
            cursor = self._cursors.get(pool_key, 0)
            self._cursors[pool_key] = cursor + 1
            return round_robin(services, cursor)
        if strategy == "weighted":
            return self.select_weighted(services)
        if strategy == "random":
            return random_weighted(services)
        if strategy == "hash":
            if key is None:
                raise ValueError("the hash strategy needs a key")
            return rendezvous(services, key)
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")

    def select_weighted(self, services: Sequence[Instance]) -> Instance:
        pool_key = frozenset(i.id for i in eligible(services))
        return smooth_weighted(services, self._weights.setdefault(pool_key, {}))
