"""The unchanged re-registration: what lets a service that registers again with exactly what it registered
before renew its lease like a heartbeat (one Redis script call) instead of writing the database.

For every service the registry keeps in Redis, next to its lease entry:

- ``reg:seq``: the revision of the service's last persisted change (any: registration, health change,
  operator's drain or weight), set by that change under the row lock, in the same script that takes the
  revision (``take_revision``); a removal drops it.
- ``reg:snap``: the digest of the last registration's request, the owner, and the response it got
  (``remember``). A persisted change deletes it in the same script, and ``remember`` writes it only if
  ``reg:seq`` is still the revision of the registration it describes: a snapshot is never older than
  the row it describes, whatever order concurrent changes commit in.

``RENEW_UNCHANGED_LUA`` then renews the lease only if the token may change the service, the request's
digest equals the snapshot's, the reported health is the one registered, and the lease is live (a lapsed
one re-registers through the database, so its recovery is written and announced as a registration). Any
doubt answers "slow", and the request is registered as usual.

Token changes (renamed, deactivated, deleted) drop every snapshot, since a response names its owner.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from datetime import datetime, timedelta
from typing import Any

import redis
from django.conf import settings
from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver
from rest_framework import ISO_8601, serializers
from rest_framework.settings import api_settings

from . import lease_store
from .models import ApiToken
from .redis_client import Lua, get_redis

# Set by registry.fast_register in the ASGI scope of a request it checked and passed on to Django.
CHECKED = "registry.unchanged_checked"

# The request fields a registration is made of (RegisterSerializer's).
FIELDS = (
    "service_id",
    "service_name",
    "service_type",
    "endpoint",
    "labels",
    "group_id",
    "lease_duration",
    "deregister_after",
    "weight",
    "health",
)


def seq_key() -> str:
    return f"{settings.REGISTRY_REDIS_PREFIX}reg:seq"


def snap_key() -> str:
    return f"{settings.REGISTRY_REDIS_PREFIX}reg:snap"


def digest(data: dict[str, Any]) -> str:
    """The digest of a registration request's fields as given (absent fields stay absent), with the
    defaults that fill them in. Equal digests: equal JSON values, so equal validation and equal effect."""
    given = {name: data[name] for name in FIELDS if name in data}
    canonical = json.dumps(given, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    defaults = f"|{settings.REGISTRY_DEFAULT_LEASE}|{settings.REGISTRY_DEREGISTER_AFTER}"
    return hashlib.sha1((canonical + defaults).encode()).hexdigest()


# A revision for a persisted change of one service (registry.revisions): the next value of the registry
# counter, raised above the service's current revision base if the counter is behind it (the counter
# then follows, so a later registration of the id is above it too), returned with the recovery count it
# includes. It also becomes the service's ``reg:seq`` and drops its snapshot; with ARGV[4] = "remove",
# both are dropped instead (a removal).
# KEYS: revision counter, recoveries, reg:seq, reg:snap. ARGV: id, stored revision, recoveries seen, mode.
TAKE_REVISION_LUA = """
local recoveries = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
local base = tonumber(ARGV[2]) + math.max(0, recoveries - tonumber(ARGV[3]))
local taken = redis.call('INCR', KEYS[1])
if taken <= base then
  taken = base + 1
  redis.call('SET', KEYS[1], taken)
end
if ARGV[4] == 'remove' then
  redis.call('HDEL', KEYS[3], ARGV[1])
else
  redis.call('HSET', KEYS[3], ARGV[1], taken)
end
redis.call('HDEL', KEYS[4], ARGV[1])
return {taken, recoveries}
"""


def take_revision(
    r: redis.Redis, service_id: str, stored: int, recoveries_seen: int, removal: bool = False
) -> tuple[int, int]:
    """A new stored revision for a change of ``service_id`` and the recovery count it includes
    (TAKE_REVISION_LUA); the service's snapshot is forgotten (under the caller's row lock)."""
    k = lease_store.keys()
    taken, recoveries = r.eval(
        TAKE_REVISION_LUA,
        4,
        k.counter("revision"),
        k.recoveries,
        seq_key(),
        snap_key(),
        service_id,
        stored,
        recoveries_seen,
        "remove" if removal else "change",
    )
    return int(taken), int(recoveries)


# TAKE_REVISION_LUA for several services in one step (a batch of registrations, rows locked).
# KEYS as TAKE_REVISION_LUA. ARGV: id, stored revision, recoveries seen; id, stored, seen; ...
TAKE_REVISIONS_LUA = """
local out = {}
for i = 1, #ARGV, 3 do
  local id = ARGV[i]
  local recoveries = tonumber(redis.call('HGET', KEYS[2], id) or '0')
  local base = tonumber(ARGV[i + 1]) + math.max(0, recoveries - tonumber(ARGV[i + 2]))
  local taken = redis.call('INCR', KEYS[1])
  if taken <= base then
    taken = base + 1
    redis.call('SET', KEYS[1], taken)
  end
  redis.call('HSET', KEYS[3], id, taken)
  redis.call('HDEL', KEYS[4], id)
  out[#out + 1] = taken
  out[#out + 1] = recoveries
end
return out
"""


def take_revisions(r: redis.Redis, changes: list[tuple[str, int, int]]) -> list[tuple[int, int]]:
    """``take_revision`` of several changed services (id, stored revision, recoveries seen) in one round trip."""
    if not changes:
        return []
    k = lease_store.keys()
    args = [value for change in changes for value in change]
    reply = r.eval(TAKE_REVISIONS_LUA, 4, k.counter("revision"), k.recoveries, seq_key(), snap_key(), *args)
    return [(int(reply[i]), int(reply[i + 1])) for i in range(0, len(reply), 2)]


# KEYS: reg:seq, reg:snap. ARGV: id, revision of the registration, snapshot value.
REMEMBER_LUA = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
  return 1
end
return 0
"""


def remember(
    r: redis.Redis, service_id: str, revision: int, request_digest: str, owner_id: int | None, body: Any
) -> bool:
    """After a registration committed: keep its digest and response, unless the service changed since."""
    value = f"{request_digest}|{owner_id or ''}|{json.dumps(body, separators=(',', ':'))}"
    return bool(r.eval(REMEMBER_LUA, 2, seq_key(), snap_key(), service_id, revision, value))


# REMEMBER_LUA for several registrations. KEYS as REMEMBER_LUA. ARGV: id, revision, value; id, ...
REMEMBER_MANY_LUA = """
for i = 1, #ARGV, 3 do
  if redis.call('HGET', KEYS[1], ARGV[i]) == ARGV[i + 1] then
    redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 2])
  end
end
"""


def remember_many_args(registered: list[tuple[str, int, str, int | None, Any]]) -> list[str]:
    """KEYS and ARGV of REMEMBER_MANY_LUA for committed registrations (id, revision, digest, owner id, body)."""
    args = [seq_key(), snap_key()]
    for service_id, revision, request_digest, owner_id, body in registered:
        value = f"{request_digest}|{owner_id or ''}|{json.dumps(body, separators=(',', ':'))}"
        args += [service_id, str(revision), value]
    return args


def forget(r: redis.Redis, service_ids: list[str]) -> None:
    """Drop the records of removed services (their rows are gone)."""
    if service_ids:
        pipe = r.pipeline(transaction=True)
        pipe.hdel(seq_key(), *service_ids)
        pipe.hdel(snap_key(), *service_ids)
        pipe.execute()


# The check and renewal of one request. Replies: {"OK", deadline_ms, snapshot body} | {"TOKEN_MISS"} | {"SLOW"}.
# KEYS[1..6]: conf, reg:snap, health, deadline, removal, reregistration counter (``renew_keys``).
_RENEW_FUNCTION = """
local function renew(token_key, id, request_digest, now_ms, health)
  local token = redis.call('GET', token_key)
  if not token then return {'TOKEN_MISS'} end
  local conf = redis.call('HGET', KEYS[1], id)
  local snap = redis.call('HGET', KEYS[2], id)
  if not conf or not snap then return {'SLOW'} end
  local lease_ms, dereg_ms, owner = string.match(conf, '^(%d+):(%d+):(.*)$')
  local token_id, staff = string.match(token, '^(.*):(%d)$')
  if staff ~= '1' and token_id ~= owner then return {'SLOW'} end
  local d, snap_owner, body = string.match(snap, '^(%x+)|(%d*)|(.*)$')
  if d ~= request_digest or snap_owner ~= owner then return {'SLOW'} end
  if redis.call('HGET', KEYS[3], id) ~= health then return {'SLOW'} end
  local now = tonumber(now_ms)
  local before = redis.call('ZSCORE', KEYS[4], id)
  if (not before) or tonumber(before) <= now then return {'SLOW'} end
  local deadline = now + tonumber(lease_ms)
  redis.call('ZADD', KEYS[4], deadline, id)
  redis.call('ZADD', KEYS[5], deadline + tonumber(dereg_ms), id)
  redis.call('INCR', KEYS[6])
  return {'OK', tostring(deadline), body}
end
"""

# One request: KEYS ``renew_keys`` + the token's key. ARGV: id, digest, now_ms, health.
RENEW_UNCHANGED_LUA = _RENEW_FUNCTION + "return renew(KEYS[7], ARGV[1], ARGV[2], ARGV[3], ARGV[4])\n"

# Several requests in one step (registry.fast_register batches those that arrive in one event-loop turn).
# KEYS: ``renew_keys``, then each request's token key. ARGV: now_ms, then id, digest, health per request.
# Reply: code, deadline_ms, body per request ("" where RENEW_UNCHANGED_LUA has none).
RENEW_UNCHANGED_MANY_LUA = (
    _RENEW_FUNCTION
    + """
local out = {}
for i = 1, #KEYS - 6 do
  local at = 2 + (i - 1) * 3
  local reply = renew(KEYS[6 + i], ARGV[at], ARGV[at + 1], ARGV[1], ARGV[at + 2])
  out[#out + 1] = reply[1]
  out[#out + 1] = reply[2] or ''
  out[#out + 1] = reply[3] or ''
end
return out
"""
)

RENEW_UNCHANGED_MANY = Lua(RENEW_UNCHANGED_MANY_LUA)


def unchanged_body(snapshot: bytes | str, deadline_ms: int) -> dict[str, Any]:
    """The answer to an unchanged re-registration: the remembered one, with the renewed lease."""
    body = json.loads(snapshot)
    expires = lease_store.from_ms(deadline_ms)
    expires_at = _datetime(expires)
    body["health"] = body["reported_health"]  # the lease is live: effective health is the reported one
    body["lease_expires_at"] = expires_at
    body["last_heartbeat"] = _datetime(expires - timedelta(seconds=body["lease_duration"]))
    body["lease"]["expires_at"] = expires_at
    return body


# As the view's serializers format a datetime (its format is read from the settings at each call).
_DATETIME = serializers.DateTimeField()


def _datetime(value: datetime) -> str:
    """``_DATETIME.to_representation(value)`` of a UTC datetime. With DRF's default ISO 8601 format and UTC
    as the time zone (the project's setting; nothing activates another) that is its isoformat with "Z"
    for "+00:00", written here directly: DRF looks the current time zone up anew for every value, which
    cost more than the rest of the answer."""
    if api_settings.DATETIME_FORMAT == ISO_8601 and settings.TIME_ZONE == "UTC" and settings.USE_TZ:
        text = value.isoformat()
        return text[:-6] + "Z" if text.endswith("+00:00") else text
    return _DATETIME.to_representation(value)


def renew_keys() -> list[str]:
    """The keys every renewal uses (KEYS[1..6] of the renewal scripts); a token's key follows them."""
    k = lease_store.keys()
    return [k.conf, snap_key(), k.health, k.deadline, k.removal, k.counter("reregistrations")]


def token_key(key_hash: str) -> str:
    return lease_store.keys().token(key_hash)


def renew_args(service_id: str, request_digest: str, now_ms: int, health: str) -> list[str | int]:
    return [service_id, request_digest, now_ms, health]


@receiver(post_save, sender=ApiToken)
@receiver(post_delete, sender=ApiToken)
def forget_snapshots_on_token_change(sender, instance: ApiToken, created: bool = False, **kwargs) -> None:  # type: ignore[no-untyped-def]
    """A response names its owner token: a token's change or removal (rare) drops every snapshot."""
    if created:
        return
    # Redis down: the snapshots may name the old token until the service's next persisted change.
    with contextlib.suppress(redis.RedisError):
        get_redis().delete(snap_key())
