"""Choosing one instance of a service for the select endpoint: the selection core that the DRF view and the
ASGI fast path (balancer.fastpath) both drive.

Each process keeps the selectable instances of a (name, selector) in memory, tagged with the name's change
counter (``registry.events.name_version_key``), which every committed change of a service of that name bumps.
A select is one Redis script call (``SELECT_LUA``) that, atomically: checks the caller's token in the token
cache (fast path only), compares the name's counter with the cached list's, reads the lease deadlines of the
cached instances whose lease may have lapsed since we last looked, and advances the shared rotation. A
counter that moved means reloading the list from the database and asking again; so a drained, deregistered,
re-weighted or sick instance is never chosen once its change has committed, and a lapsed lease (which no
event announces: heartbeats move deadlines in Redis alone) is checked at the moment of the pick.

Deadlines only move forward except through a change that bumps the counter (a re-registration, a removal)
or a loss of Redis's data (which loses the counter too), so a deadline read once is a lower bound: only the
instances whose known deadline has passed are read again, a handful per select in a steady state.

Rotations are shared by every process: round robin is a Redis counter over the eligible instances sorted by
id; smooth weighted round robin a counter per eligible pool addressing nginx's sequence for that pool
(``balancer.schedule``), started again from the sequence's beginning when the pool changes, as nginx does
when its upstreams change.

The flow is written once as a generator of steps (``Script``, ``Deadline``, ``Blocking``) that a sync driver
(the DRF view) or an async one (the fast path) runs, as ``registry.leases.heartbeat_flow`` is.
"""

from __future__ import annotations

import hashlib
import random
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import redis
from django.conf import settings
from rest_framework import serializers

from registry import lease_store
from registry.events import name_version_key
from registry.leases import cache_token
from registry.models import Health, Service
from registry.redis_client import Lua, get_redis

from .hashing import RendezvousPool
from .schedule import SmoothWeightedSchedule
from .strategies import Eligible, Instance, NoHealthyInstance

# KEYS: token, name's change counter, rotation state, lease deadlines, the pool's order list.
# ARGV: check token (1/0), now_ms, cached version, mode (rr | swrr | none), pool fingerprint, the id the
#       pick will be if no lease lapsed ('' if unknown), the order list's length (0: none), then id,
#       fallback deadline (ms) for each instance whose lease may have lapsed.
# Replies: {'TOKEN_MISS'} | {'STALE', version} | {'OK', version, step, {deadline, ...}, id, deadline}.
# With no lapse, the pick is the guessed id or the order list's entry at the step, and its deadline comes
# back with the rest (nil: not known here; the list is missing, or some lease lapsed).
# A name whose counter was never set reads as '-': no key is made for names nobody registered.
SELECT_LUA = """
if ARGV[1] == '1' and not redis.call('GET', KEYS[1]) then return {'TOKEN_MISS'} end
local version = redis.call('GET', KEYS[2]) or '-'
if version ~= ARGV[3] then return {'STALE', version} end
local now = tonumber(ARGV[2])
local deadlines, lapsed = {}, {}
for i = 8, #ARGV, 2 do
  local d = redis.call('ZSCORE', KEYS[4], ARGV[i]) or ARGV[i + 1]
  table.insert(deadlines, d)
  if tonumber(d) <= now then table.insert(lapsed, ARGV[i]) end
end
local step = 0
if ARGV[4] == 'rr' then
  step = redis.call('INCR', KEYS[3]) - 1
elseif ARGV[4] == 'swrr' then
  local pool = redis.sha1hex(ARGV[5] .. '|' .. table.concat(lapsed, ','))
  if redis.call('HGET', KEYS[3], 'pool') ~= pool then redis.call('HSET', KEYS[3], 'pool', pool, 'n', 0) end
  step = redis.call('HINCRBY', KEYS[3], 'n', 1) - 1
end
local chosen, chosen_deadline = false, false
if #lapsed == 0 then
  chosen = ARGV[6]
  if tonumber(ARGV[7]) > 0 then chosen = redis.call('LINDEX', KEYS[5], step % tonumber(ARGV[7])) end
  if chosen == '' then chosen = false end
  if chosen then chosen_deadline = redis.call('ZSCORE', KEYS[4], chosen) end
end
return {'OK', version, step, deadlines, chosen, chosen_deadline}
"""
SELECT = Lua(SELECT_LUA)

# A cached list is reloaded at least this often even if no change was announced: the bound on staleness if
# a change's after-commit bump of the counter failed (Redis unreachable at that instant).
MAX_AGE_SECONDS = 30.0
MAX_POOLS = 512  # (name, selector) lists kept per process
MAX_HASHED_KEYS = 8192  # hash-strategy answers remembered per list
MAX_ORDER = 50_000  # longest rotation order kept in Redis (a weighted schedule's period can be longer)

NO_INSTANCE = "no healthy or degraded instance with a weight above 0"
_DATETIME = serializers.DateTimeField()


class NameNotFound(Exception):
    """No service is registered under this name."""


# --- steps ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Script:
    """Step: run SELECT_LUA with these keys and arguments; the reply is sent back."""

    keys: list[str]
    args: list[str | int]


@dataclass(frozen=True)
class Deadline:
    """Step: the live lease deadline (ms) of one service, or None if Redis has no entry for it."""

    service_id: str


@dataclass(frozen=True)
class Store:
    """Step: replace the Redis list ``key`` with ``ids`` (kept a day)."""

    key: str
    ids: list[str]


@dataclass(frozen=True)
class Blocking:
    """Step: run this blocking (database) function; its return value is sent back."""

    fn: Callable[..., Any]
    args: tuple[Any, ...]


Step = Script | Deadline | Store | Blocking


@dataclass(frozen=True)
class Outcome:
    status: int
    body: dict[str, Any]


# --- the cached lists ---------------------------------------------------------------------------------------


@dataclass
class Candidate:
    """One selectable instance as loaded, with what is known of its live lease deadline."""

    service: Service
    instance: Instance
    fallback_ms: int  # the row's deadline, for a service Redis has no entry for
    known_ms: int  # a lower bound of the live deadline
    body: dict[str, Any] | None = None
    stamps: tuple[int, str, str] | None = None  # a deadline (ms), its last_heartbeat and lease_expires_at


@dataclass
class Pool:
    """The instances of one (name, selector) with weight above 0 and reported healthy or degraded."""

    version: str
    registered: bool  # some service has this name (else 404)
    healthy: list[Candidate]
    degraded: list[Candidate]
    fingerprint: str
    loaded_at: float
    next_check_ms: int = 0
    _eligible: dict[frozenset[str], tuple[list[Candidate], Eligible]] = field(default_factory=dict)
    _schedules: dict[frozenset[str], SmoothWeightedSchedule] = field(default_factory=dict)
    _rendezvous: dict[frozenset[str], RendezvousPool] = field(default_factory=dict)
    _orders: dict[str, tuple[str, list[str]] | None] = field(default_factory=dict)
    _hashed: dict[tuple[frozenset[str], str], int] = field(default_factory=dict)

    def candidates(self) -> list[Candidate]:
        return self.healthy + self.degraded

    def uncertain(self, now_ms: int) -> list[Candidate]:
        """The instances whose known deadline has passed: their lease may have lapsed, or been renewed."""
        if now_ms < self.next_check_ms:
            return []
        return [c for c in self.candidates() if c.known_ms <= now_ms]

    def learned(self) -> None:
        """Deadlines were read: the next instant some known deadline passes."""
        self.next_check_ms = min((c.known_ms for c in self.candidates()), default=2**62)

    def eligible(self, lapsed: frozenset[str]) -> tuple[list[Candidate], Eligible]:
        """Healthy instances whose lease holds, else degraded ones; NoHealthyInstance if none."""
        found = self._eligible.get(lapsed)
        if found is None:
            for group in (self.healthy, self.degraded):
                chosen = [c for c in group if c.instance.id not in lapsed]
                if chosen:
                    break
            else:
                raise NoHealthyInstance(NO_INSTANCE)
            found = (chosen, Eligible(c.instance for c in chosen))
            if len(self._eligible) > 64:
                self._eligible.clear()
            self._eligible[lapsed] = found
        return found

    def order(self, strategy: str) -> tuple[str, list[str]] | None:
        """For the rotations: the ids in the order the shared step walks them while no lease has lapsed (the
        eligible ids, or one period of the weighted schedule), named by content; None if too long."""
        found = self._orders.get(strategy)
        if found is None and strategy in ("round_robin", "weighted") and (self.healthy or self.degraded):
            chosen, pool = self.eligible(frozenset())
            group = "h" if self.healthy else "d"
            if strategy == "round_robin":
                ids = [c.instance.id for c in chosen]
            else:
                schedule = self._schedule(frozenset(), pool)
                if schedule.period > MAX_ORDER:
                    return None
                ids = [pool[schedule.index_at(p)].id for p in range(schedule.period)]
            prefix = settings.REGISTRY_REDIS_PREFIX
            found = self._orders[strategy] = (f"{prefix}balancer:order:{self.fingerprint}:{strategy}:{group}", ids)
        return found

    def _schedule(self, lapsed: frozenset[str], pool: Eligible) -> SmoothWeightedSchedule:
        schedule = self._schedules.get(lapsed)
        if schedule is None:
            if len(self._schedules) > 64:
                self._schedules.clear()
            schedule = self._schedules[lapsed] = SmoothWeightedSchedule(pool)
        return schedule

    def pick(self, strategy: str, lapsed: frozenset[str], step: int, key: str | None) -> Candidate:
        chosen, pool = self.eligible(lapsed)
        if strategy == "round_robin":
            return chosen[step % len(chosen)]
        if strategy == "weighted":
            return chosen[self._schedule(lapsed, pool).index_at(step)]
        if strategy == "random":
            return chosen[_rng.choices(range(len(pool)), weights=[i.weight for i in pool], k=1)[0]]
        if strategy == "hash":
            assert key is not None
            # The winner depends on the eligible pool and the key alone: remembered for both.
            remembered = self._hashed.get((lapsed, key))
            if remembered is None:
                hashing = self._rendezvous.get(lapsed)
                if hashing is None:
                    if len(self._rendezvous) > 64:
                        self._rendezvous.clear()
                    hashing = self._rendezvous[lapsed] = RendezvousPool(pool)
                remembered = hashing.index(key)
                if len(self._hashed) >= MAX_HASHED_KEYS:
                    self._hashed.clear()
                self._hashed[(lapsed, key)] = remembered
            return chosen[remembered]
        raise ValueError(strategy)


_rng = random.SystemRandom()
_pools: dict[tuple[str, str], Pool] = {}
_pools_lock = threading.Lock()
_load_lock = threading.Lock()


def canonical_selector(selector: dict[str, str] | None) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted((selector or {}).items()))


_FlowKeys = tuple[tuple[str, str], str, str, str, str]
_flow_keys_cache: dict[tuple[str, str, str, str], _FlowKeys] = {}


def _flow_keys(name: str, strategy: str, selector: dict[str, str] | None) -> _FlowKeys:
    """(cache key, script mode, the name's counter key, the rotation state key, the deadlines key) of a select:
    worked out once per (name, strategy, selector) and Redis prefix."""
    canonical = canonical_selector(selector)
    memo = (settings.REGISTRY_REDIS_PREFIX, name, strategy, canonical)
    found = _flow_keys_cache.get(memo)
    if found is None:
        mode = {"round_robin": "rr", "weighted": "swrr"}.get(strategy, "none")
        state = _state_key({"rr": "rr", "swrr": "swrr-seq"}.get(mode, "none"), name, selector)
        found = ((name, canonical), mode, name_version_key(name), state, lease_store.keys().deadline)
        if len(_flow_keys_cache) >= MAX_POOLS * 4:
            _flow_keys_cache.clear()
        _flow_keys_cache[memo] = found
    return found


def _state_key(kind: str, name: str, selector: dict[str, str] | None) -> str:
    digest = hashlib.sha1(f"{name}\0{canonical_selector(selector)}".encode()).hexdigest()[:20]
    return f"{settings.REGISTRY_REDIS_PREFIX}balancer:{kind}:{digest}"


def load_pool(name: str, selector: dict[str, str] | None, version: str) -> Pool:
    """The selectable instances of ``name`` as of ``version`` (read before this call): the cached list if it
    has that version already (the selects that found it stale together load it once), else read from the
    database; a list read again with the very same content keeps what was computed from it."""
    cache_key = (name, canonical_selector(selector))
    with _load_lock:
        current = _pools.get(cache_key)
        if current is not None and current.version == version and _fresh(current):
            return current
        loaded = _read_pool(name, selector, version)
        if current is not None and current.fingerprint == loaded.fingerprint:
            for old, new in zip(current.candidates(), loaded.candidates(), strict=True):
                old.known_ms = new.known_ms  # Redis may have lost (and rebuilt) deadlines since
            current.version, current.loaded_at = version, loaded.loaded_at
            loaded = current
        loaded.learned()
        _remember(cache_key, loaded)
        return loaded


def _fresh(pool: Pool) -> bool:
    return time.monotonic() - pool.loaded_at <= MAX_AGE_SECONDS


def _read_pool(name: str, selector: dict[str, str] | None, version: str) -> Pool:
    qs = (
        Service.objects.filter(service_name=name, weight__gt=0, health__in=[Health.HEALTHY, Health.DEGRADED])
        .select_related("owner")
        .order_by("pk")
    )
    if selector:
        qs = qs.matching(selector)
    rows = list(qs)
    registered = bool(rows) or Service.objects.filter(service_name=name).exists()
    known = lease_store.deadlines(get_redis(), [s.service_id for s in rows])
    healthy: list[Candidate] = []
    degraded: list[Candidate] = []
    digest = hashlib.sha1()
    for s in rows:
        fallback = lease_store.to_ms(s.lease_expires_at)
        candidate = Candidate(
            s, Instance(s.service_id, s.endpoint, s.weight, s.health), fallback, known.get(s.service_id, fallback)
        )
        (healthy if s.health == Health.HEALTHY else degraded).append(candidate)
        # Everything a response shows but the lease: an equal digest means equal answers.
        shown = (s.service_id, s.weight, s.health, s.endpoint, s.labels, s.service_type, s.group_id, s.drained)
        more = (s.operator_weight, s.registered_at.isoformat(), s.lease_duration, s.deregister_after, s.owner_id)
        digest.update(repr((shown, more, s.owner.name if s.owner else None)).encode())
    return Pool(version, registered, healthy, degraded, digest.hexdigest(), time.monotonic())


def _remember(cache_key: tuple[str, str], pool: Pool) -> None:
    with _pools_lock:
        if len(_pools) >= MAX_POOLS and cache_key not in _pools:
            _pools.clear()
        _pools[cache_key] = pool


def forget_pools() -> None:
    """Drop every cached list (tests that swap the database or Redis under a running process)."""
    with _pools_lock:
        _pools.clear()


def body_of(candidate: Candidate, deadline_ms: int) -> dict[str, Any]:
    """The ServiceSerializer output for the chosen instance, its lease as Redis holds it now (a test holds
    the two equal). The fields that do not move with the lease are built once per loaded list."""
    service = candidate.service
    if candidate.body is None:
        candidate.body = {
            "service_id": service.service_id,
            "service_name": service.service_name,
            "service_type": service.service_type,
            "endpoint": service.endpoint,
            "labels": service.labels,
            # Never lapsed at the pick, so its effective health is what it reported.
            "health": service.health,
            "reported_health": service.health,
            "group_id": service.group_id,
            "weight": service.weight,
            "drained": service.drained,
            "operator_weight": service.operator_weight,
            "registered_at": _DATETIME.to_representation(service.registered_at),
            "last_heartbeat": None,
            "lease_duration": service.lease_duration,
            "deregister_after": service.deregister_after,
            "lease_expires_at": None,
            "owner": service.owner.name if service.owner is not None else None,
        }
    stamps = candidate.stamps
    if stamps is None or stamps[0] != deadline_ms:
        expires = lease_store.from_ms(deadline_ms)
        heartbeat = _DATETIME.to_representation(expires - timedelta(seconds=service.lease_duration))
        stamps = candidate.stamps = (deadline_ms, heartbeat, _DATETIME.to_representation(expires))
    body = dict(candidate.body)
    body["last_heartbeat"] = stamps[1]
    body["lease_expires_at"] = stamps[2]
    return body


# --- the flow -------------------------------------------------------------------------------------------


def select_flow(
    name: str,
    strategy: str,
    now: datetime,
    selector: dict[str, str] | None = None,
    key: str | None = None,
    token_hash: str | None = None,
) -> Generator[Step, Any, Outcome]:
    """Select one instance of ``name``. ``token_hash``: the caller's token, checked against the token cache
    (the fast path; the DRF view has authenticated already). Answers 200 with the service, 401 for an
    unknown token, 404 for an unknown name, 503 when no instance is eligible."""
    now_ms = lease_store.to_ms(now)
    cache_key, mode, version_key, state_key, deadline_key = _flow_keys(name, strategy, selector)
    keys = [lease_store.keys().token(token_hash or "-"), version_key, state_key, deadline_key, ""]
    for _attempt in range(5):
        pool = _pools.get(cache_key)
        if pool is not None and not _fresh(pool):
            pool = None
        uncertain = pool.uncertain(now_ms) if pool else []
        selectable = pool is not None and pool.registered and bool(pool.healthy or pool.degraded)
        # What the pick will be if no lease lapsed, so that its deadline comes back with the rest.
        guess: Candidate | None = None
        order = pool.order(strategy) if selectable and pool is not None else None
        if selectable and pool is not None and strategy in ("hash", "random"):
            guess = pool.pick(strategy, frozenset(), 0, key)
        keys[4] = order[0] if order else keys[1]
        args: list[str | int] = [
            "1" if token_hash else "0",
            now_ms,
            pool.version if pool else "",
            mode if selectable else "none",
            pool.fingerprint if pool else "",
            guess.instance.id if guess else "",
            len(order[1]) if order else 0,
        ]
        for c in uncertain:
            args += [c.instance.id, c.fallback_ms]
        reply = yield Script(keys, args)
        code = _text(reply[0])
        if code == "TOKEN_MISS":
            if not (yield Blocking(cache_token, (token_hash,))):
                return Outcome(401, {"detail": "Invalid token."})
            continue
        if code == "STALE":
            yield Blocking(load_pool, (name, selector, _text(reply[1])))
            continue
        assert pool is not None and code == "OK"
        step = int(reply[2])
        lapsed = set()
        for c, raw in zip(uncertain, reply[3], strict=True):
            deadline = int(float(raw))
            if deadline <= now_ms:
                lapsed.add(c.instance.id)
            elif deadline > c.known_ms:
                c.known_ms = deadline
        if uncertain:
            pool.learned()
        if not pool.registered:
            return Outcome(404, {"detail": f"no service is registered under the name {name!r}"})
        try:
            chosen = guess if guess is not None and not lapsed else pool.pick(strategy, frozenset(lapsed), step, key)
        except NoHealthyInstance as exc:
            return Outcome(503, {"detail": f"{name}: {exc}", "name": name})
        if not lapsed and reply[4] is not None and _text(reply[4]) == chosen.instance.id:
            live = reply[5]
        else:
            if order and not lapsed and reply[4] is None:
                yield Store(*order)  # the order list is gone (expired, or Redis lost it): put it back
            live = yield Deadline(chosen.instance.id)
        deadline_ms = int(float(live)) if live is not None else chosen.fallback_ms
        chosen.known_ms = max(chosen.known_ms, deadline_ms)
        return Outcome(200, body_of(chosen, deadline_ms))
    raise RuntimeError(f"select for {name!r} did not settle")


def store_pipeline(pipe: Any, step: Store) -> Any:
    """The commands of a Store step, queued on a (sync or async) transaction pipeline."""
    pipe.delete(step.key)
    pipe.rpush(step.key, *step.ids)
    pipe.expire(step.key, 86400)
    return pipe


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def run_flow(flow: Generator[Step, Any, Outcome], r: redis.Redis | None = None) -> Outcome:
    """Drive a select flow synchronously (the DRF view)."""
    r = r or get_redis()
    try:
        step = next(flow)
        while True:
            if isinstance(step, Script):
                reply = SELECT.run(r, step.keys, *step.args)
            elif isinstance(step, Deadline):
                reply = r.zscore(lease_store.keys().deadline, step.service_id)
            elif isinstance(step, Store):
                reply = store_pipeline(r.pipeline(transaction=True), step).execute()
            else:
                reply = step.fn(*step.args)
            step = flow.send(reply)
    except StopIteration as stop:
        return stop.value


def select(
    name: str,
    strategy: str,
    now: datetime,
    selector: dict[str, str] | None = None,
    key: str | None = None,
) -> Outcome:
    """One selection, driven synchronously."""
    return run_flow(select_flow(name, strategy, now, selector, key))
