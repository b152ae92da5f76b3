"""Choosing one instance of a service for the select endpoint, with the rotation state in Redis.

Round robin is a Redis INCR per (name, selector) and smooth weighted round robin a Lua script over a
hash of current weights, so every server process shares one rotation and one weighted schedule.
"""

from __future__ import annotations

import hashlib
import random
from datetime import datetime

from django.conf import settings
from django.db.models import QuerySet

from registry.errors import NotFound
from registry.leases import lapsed_ids
from registry.models import Health, Service
from registry.redis_client import get_redis

from .strategies import Instance, NoHealthyInstance, random_weighted, rendezvous

# KEYS[1]: hash id -> current weight. ARGV: id1, weight1, id2, weight2, ... (eligible, sorted by id).
# The same algorithm as strategies.smooth_weighted, atomically: ties go to the first id.
SMOOTH_WEIGHTED_LUA = """
local ids, weights = {}, {}
for i = 1, #ARGV, 2 do
  table.insert(ids, ARGV[i])
  table.insert(weights, tonumber(ARGV[i + 1]))
end
local current = redis.call('HMGET', KEYS[1], unpack(ids))
local total, best, best_weight = 0, nil, nil
local keep = {}
for i, id in ipairs(ids) do
  local value = tonumber(current[i] or '0') + weights[i]
  current[i] = value
  total = total + weights[i]
  keep[id] = true
  if best == nil or value > best_weight then best, best_weight = i, value end
end
current[best] = current[best] - total
local pairs_ = {}
for i, id in ipairs(ids) do
  table.insert(pairs_, id)
  table.insert(pairs_, current[i])
end
redis.call('HSET', KEYS[1], unpack(pairs_))
for _, id in ipairs(redis.call('HKEYS', KEYS[1])) do
  if not keep[id] then redis.call('HDEL', KEYS[1], id) end
end
return ids[best]
"""


class NameNotFound(NotFound):
    """No service has ever been registered under this name (or none is registered now)."""


def _state_key(kind: str, name: str, selector: dict[str, str] | None) -> str:
    canonical = ",".join(f"{k}={v}" for k, v in sorted((selector or {}).items()))
    digest = hashlib.sha1(f"{name}\0{canonical}".encode()).hexdigest()[:20]
    return f"{settings.REGISTRY_REDIS_PREFIX}balancer:{kind}:{digest}"


def eligible_queryset(name: str, selector: dict[str, str] | None, now: datetime) -> QuerySet[Service]:
    """The eligible instances of ``name`` as a query, ordered by id: the rule of strategies.eligible
    (weight above 0; healthy, or else degraded; a lapsed lease is unhealthy) applied in SQL, so a
    round-robin pick reads one row, not every instance."""
    qs = Service.objects.filter(service_name=name, weight__gt=0).exclude(pk__in=lapsed_ids(now)).order_by("pk")
    if selector:
        qs = qs.matching(selector)
    for health in (Health.HEALTHY, Health.DEGRADED):
        chosen = qs.filter(health=health)
        if chosen.exists():
            return chosen
    if not Service.objects.filter(service_name=name).exists():
        raise NameNotFound(f"no service is registered under the name {name!r}")
    raise NoHealthyInstance("no healthy or degraded instance with a weight above 0")


def select(
    name: str, strategy: str, now: datetime, selector: dict[str, str] | None = None, key: str | None = None
) -> Service:
    """One instance of ``name``; NameNotFound if none is registered, NoHealthyInstance if none is eligible."""
    qs = eligible_queryset(name, selector, now)
    if strategy == "round_robin":
        cursor = get_redis().incr(_state_key("rr", name, selector)) - 1
        count = qs.count()
        chosen = qs.values_list("pk", flat=True)[cursor % count] if count else None
        if chosen is None:
            raise NoHealthyInstance("the last eligible instance went away")
        return Service.objects.get(pk=chosen)
    pool = [Instance(pk, "", weight) for pk, weight in qs.values_list("pk", "weight")]
    if strategy == "weighted":
        args: list[str | int] = []
        for inst in pool:
            args += [inst.id, inst.weight]
        chosen = get_redis().eval(SMOOTH_WEIGHTED_LUA, 1, _state_key("swrr", name, selector), *args).decode()
    elif strategy == "random":
        chosen = random_weighted(pool, random.SystemRandom()).id
    elif strategy == "hash":
        assert key is not None
        chosen = rendezvous(pool, key).id
    else:
        raise ValueError(strategy)
    return Service.objects.get(pk=chosen)
