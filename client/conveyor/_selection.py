"""Local selection, with no I/O: the instances of one service name a local balancer may choose from, built from
a watch's view, and the choice itself made by ``conveyor.strategies`` (the module the server's select endpoint
uses too), so local and remote selection follow one rule.

A lease that has run out makes its instance ineligible at once, before the registry's event says so. Records
carry the lease deadline of the moment they were read, but heartbeats move deadlines without any event, so the
balancer also refreshes the deadlines (one list request every few seconds, not one per selection) and a lease
counts as lapsed when the newest deadline known for it has passed.

While the registry cannot be reached the deadlines cannot be refreshed, and judging them against the clock
would soon make every instance look lapsed and stop all traffic because the registry is down. So lapses are
judged at ``min(now, last_contact + stale_after)``: fresh knowledge is applied at once, and during an outage
the pool stays as it was ``stale_after`` seconds after the last contact ("fail static", as Envoy does) until
the registry answers again.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from datetime import datetime
from typing import Any

from . import errors, strategies
from ._flows import RegistryLike
from ._watch_state import WatchBase
from .records import Service


def matches(labels: Mapping[str, str], selector: Mapping[str, str] | None) -> bool:
    return not selector or all(labels.get(k) == v for k, v in selector.items())


def parse_selector(selector: Mapping[str, str] | str | None) -> dict[str, str] | None:
    """``k=v,k2=v2`` or a dict, as a dict (None: no selector)."""
    if selector is None:
        return None
    if isinstance(selector, str):
        pairs = [part.split("=", 1) for part in selector.split(",") if part]
        if any(len(pair) != 2 for pair in pairs):
            raise errors.InvalidRequest(f"selector: expected k=v,k2=v2, got {selector!r}")
        return {k: v for k, v in pairs}
    return dict(selector)


def check_strategy(strategy: str) -> str:
    if strategy not in strategies.STRATEGIES:
        raise errors.InvalidRequest(
            f"strategy: unknown strategy {strategy!r}; expected one of {', '.join(strategies.STRATEGIES)}"
        )
    return strategy


def _epoch(moment: datetime | None) -> float | None:
    return None if moment is None else moment.timestamp()


class LocalPool:
    """Not thread-safe: the sync balancer calls it under its lock, the asyncio one from its loop."""

    def __init__(
        self,
        name: str,
        strategy: str,
        selector: Mapping[str, str] | None = None,
        stale_after: float = 15.0,
    ) -> None:
        self.name = name
        self.strategy = check_strategy(strategy)
        self.selector = dict(selector) if selector else None
        self.stale_after = stale_after
        # The rotation state of round robin and smooth weighted round robin. strategies.LoadBalancer keeps one
        # per distinct pool, which would grow with every add, drain and lapse a long-lived balancer follows:
        # here one rotation simply carries on over the changed pool.
        self._cursor = 0
        self._current: dict[str, int] = {}
        self.named = 0  # instances of the name, whatever the selector (none at all: ServiceNotFound)
        self.records: dict[str, Service] = {}
        self.deadlines: dict[str, float] = {}  # id -> newest lease deadline known (epoch seconds)
        self.last_contact: float | None = None
        self.shortest_lease: float | None = None
        self._pool: Sequence[strategies.Instance] | None = None  # eligible instances, sorted by id
        self._none_eligible: strategies.NoHealthyInstance | None = None
        self._valid_until = math.inf  # the pool must be rebuilt when a lease in it runs out

    def set_view(self, view: Mapping[str, Service]) -> None:
        named = [r for r in view.values() if r.name == self.name]
        self.named = len(named)
        self.records = {r.id: r for r in named if matches(r.labels, self.selector)}
        self._pool = None

    def set_deadlines(self, services: list[Service], at: float) -> None:
        """Deadlines from a fresh read of the registry (``at``: when it was made)."""
        for service in services:
            deadline = _epoch(service.lease_expires_at)
            if deadline is not None and deadline > self.deadlines.get(service.id, -math.inf):
                self.deadlines[service.id] = deadline
        for gone in set(self.deadlines) - {s.id for s in services}:
            del self.deadlines[gone]
        leases = [s.lease_duration for s in services if s.lease_duration]
        self.shortest_lease = float(min(leases)) if leases else None
        self.contact(at)

    def contact(self, at: float) -> None:
        self.last_contact = at if self.last_contact is None else max(self.last_contact, at)
        self._pool = None

    def refresh_period(self) -> float:
        """How often deadlines should be read: well within the margin a heartbeating service keeps (about
        two thirds of its lease), between 0.5 and 5 seconds."""
        if self.shortest_lease is None:
            return 2.0
        return min(5.0, max(0.5, self.shortest_lease / 4))

    def judged_at(self, now: float) -> float:
        return now if self.last_contact is None else min(now, self.last_contact + self.stale_after)

    def _rebuild(self, at: float) -> Sequence[strategies.Instance]:
        pool = []
        valid_until = math.inf
        for record in self.records.values():
            deadline = max(_epoch(record.lease_expires_at) or -math.inf, self.deadlines.get(record.id, -math.inf))
            health = record.health
            if deadline != -math.inf:
                if deadline <= at:
                    health = "unhealthy"  # lapsed: the registry reads it so too, said or not
                else:
                    valid_until = min(valid_until, deadline)
            pool.append(strategies.Instance(record.id, record.endpoint, record.weight, health))
        # Filtered and ordered once per change rather than once per selection: eligible() returns an
        # Eligible pool, which the strategies take as it is.
        try:
            self._pool, self._none_eligible = strategies.eligible(pool), None
        except strategies.NoHealthyInstance as exc:
            self._pool, self._none_eligible = [], exc
        self._valid_until = valid_until
        return self._pool

    def select(self, now: float, key: str | None = None) -> Service:
        at = self.judged_at(now)
        pool = self._pool
        if pool is None or at >= self._valid_until:
            pool = self._rebuild(at)
        if not self.named:
            raise errors.ServiceNotFound(f"no service is registered under the name {self.name!r}", status=404)
        if self.strategy == "hash" and key is None:
            raise errors.InvalidRequest("key: the hash strategy needs a key", status=400)
        if self._none_eligible is not None:
            raise errors.NoInstanceAvailable(f"{self.name}: {self._none_eligible}", body={"name": self.name})
        if self.strategy == "round_robin":
            chosen = strategies.round_robin(pool, self._cursor)
            self._cursor += 1
        elif self.strategy == "weighted":
            chosen = strategies.smooth_weighted(pool, self._current)
        elif self.strategy == "random":
            chosen = strategies.random_weighted(pool)
        else:
            assert key is not None
            chosen = strategies.rendezvous(pool, key)
        return self.records[chosen.id]


class BalancerBase:
    """What both balancer drivers share: their arguments, and in local mode the pool, taking the watch's view
    into it when it changed, and choosing. ``_guard`` serialises the pool (a lock for the sync balancer, whose
    watch and lease refresh run on threads of their own); ``_setup()`` adds the driver's machinery, the
    watch (``_watch``) included."""

    _guard: AbstractContextManager[Any]
    _watch: WatchBase

    def __init__(
        self,
        registry: RegistryLike,
        name: str,
        strategy: str = "round_robin",
        selector: Mapping[str, str] | str | None = None,
        local: bool = False,
        *,
        stale_after: float = 15.0,
    ) -> None:
        self.name = name
        self.strategy = check_strategy(strategy)
        self.selector = parse_selector(selector)
        self.local = local
        self._registry = registry
        self._error: errors.ConveyorError | None = None  # why the local mode cannot choose any more
        if local:
            self._pool = LocalPool(name, strategy, self.selector, stale_after)
            self._version = -1  # of the watch's view the pool was built from
        self._setup()

    def _setup(self) -> None:
        raise NotImplementedError

    def instances(self) -> list[Service]:
        """The instances a local balancer currently knows of (its name and selector), eligible or not."""
        if not self.local:
            raise RuntimeError("instances() is for local=True balancers")
        with self._guard:
            self._follow_view()
            return list(self._pool.records.values())

    def _choose(self, key: str | None) -> Service:
        if self._error is not None:
            raise self._error
        with self._guard:
            self._follow_view()
            return self._pool.select(time.time(), key)

    def _follow_view(self) -> None:
        version, view = self._watch.view_if_changed(self._version)
        if view is not None:
            self._pool.set_view(view)
            self._version = version

    def _not_synced(self) -> errors.ConveyorError:
        return self._watch.error or self._error or errors.Unavailable(f"no snapshot of {self.name!r} yet")

    def _deadlines(self, found: list[Service], read_at: float) -> float:
        """Take the lease deadlines of a refresh; returns when to refresh next."""
        with self._guard:
            self._pool.set_deadlines(found, read_at)
            return self._pool.refresh_period()
