"""Lease state in Redis: deadlines, removal deadlines, lease settings and reported health per service,
consumer-group member sessions (leases of their own), the token cache the heartbeat fast path
authenticates against, and the registry's shared counters.

Redis is the authority for *when* a lease expires (a heartbeat is one Lua call here and no
database write); the database is the authority for *what* is registered. Every service row
has an entry here, written under the row lock by ``registry.leases``; when Redis has lost its
state (no ``built`` marker), ``registry.leases.rebuild_lease_state`` restores it from the database.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import redis
import redis.asyncio as aredis
from django.conf import settings

from .redis_client import Lua

# Heartbeats: authenticate, authorise, renew and compare reported health, for a batch of heartbeats in
# one round trip (the fast path sends those that arrive together; a lone one is a batch of one).
# Reply: one entry per heartbeat, in order:
#   {"OK", deadline_ms, lease_ms} | {"HEALTH_CHANGED", deadline_ms, lease_ms} | {"TOKEN_MISS"} | {"NOT_FOUND"}
#   | {"FORBIDDEN"} | {"ERROR", message} (that heartbeat failed in Redis; the others of the batch stand)
# KEYS: deadline, removal, conf, health, heartbeat counter, member sessions, member timeouts, expiry claims,
#       recoveries, recovered.
# ARGV: claim_valid_ms, the token keys' prefix, the member groups keys' prefix; then one argument per
#       heartbeat, "<token hash> <now_ms> <health> <service id>" (see Beat.packed).
# The script names each heartbeat's token and member-groups keys from those prefixes rather than taking
# them in KEYS: a batch's arguments stay one per heartbeat, which is most of what a batch costs to send
# and to parse. (The registry runs on one Redis server, not a cluster: its keys already span slots.)
# A renewal of a lapsed lease counts a recovery (registry.revisions) and queues it for the cleanup
# job's announcement.
# A member session of the same id is renewed only if the token that joined it owns the service
# (the owner id is kept with the session's timeout, see session_value); an ownerless service renews none,
# and neither is a session the expiry job has claimed (see CLAIM_SESSIONS_LUA).
HEARTBEAT_LUA = """
local claim_valid = tonumber(ARGV[1])
local tokens = {}
local function beat(key_hash, id, now, health)
  local token = tokens[key_hash]
  if token == nil then
    token = redis.call('GET', ARGV[2] .. key_hash)
    tokens[key_hash] = token
  end
  if not token then return {'TOKEN_MISS'} end
  local conf = redis.call('HGET', KEYS[3], id)
  if not conf then return {'NOT_FOUND'} end
  local lease_ms, dereg_ms, owner = string.match(conf, '^(%d+):(%d+):(.*)$')
  local token_id, staff = string.match(token, '^(.*):(%d)$')
  if staff ~= '1' and token_id ~= owner then return {'FORBIDDEN'} end
  local deadline = now + tonumber(lease_ms)
  local before = redis.call('ZSCORE', KEYS[1], id)
  -- GT: a heartbeat delayed behind a later one of the same service never moves its deadline back
  redis.call('ZADD', KEYS[1], 'GT', deadline, id)
  redis.call('ZADD', KEYS[2], 'GT', deadline + tonumber(dereg_ms), id)
  if before and tonumber(before) > deadline then deadline = tonumber(before) end
  if before and tonumber(before) <= now then
    redis.call('HINCRBY', KEYS[9], id, 1)
    redis.call('SADD', KEYS[10], id)
  end
  -- a service that is also a group member keeps its memberships with the same heartbeat, where the
  -- same token joined them
  if owner ~= '' then
    for _, group in ipairs(redis.call('SMEMBERS', ARGV[3] .. id)) do
      local session = group .. '/' .. id
      local entry = redis.call('HGET', KEYS[7], session)
      local timeout, member_owner
      if entry then timeout, member_owner = string.match(entry, '^(%d+):(%d*)$') end
      local claimed = tonumber(redis.call('HGET', KEYS[8], session) or '-1')
      if member_owner == owner and claimed < now - claim_valid then
        redis.call('ZADD', KEYS[6], 'XX', 'GT', now + tonumber(timeout), session)
      end
    end
  end
  if redis.call('HGET', KEYS[4], id) ~= health then
    return {'HEALTH_CHANGED', tostring(deadline), lease_ms}
  end
  return {'OK', tostring(deadline), lease_ms}
end
local replies = {}
local renewed = 0
for i = 4, #ARGV do
  local key_hash, now, health, id = string.match(ARGV[i], '^(%x+) (%d+) (%a+) (.+)$')
  local ok, reply = pcall(beat, key_hash, id, tonumber(now), health)
  if not ok then
    reply = {'ERROR', type(reply) == 'table' and tostring(reply.err) or tostring(reply)}
  elseif #reply > 1 then
    renewed = renewed + 1
  end
  replies[i - 3] = reply
end
if renewed > 0 then redis.call('INCRBY', KEYS[5], renewed) end
return replies
"""

HEARTBEAT = Lua(HEARTBEAT_LUA)


@dataclass(frozen=True)
class Beat:
    """One heartbeat for HEARTBEAT_LUA: the token's hash, the service, the moment and the reported health."""

    key_hash: str
    service_id: str
    now_ms: int
    health: str

    @property
    def packed(self) -> str:
        # The id goes last: HEARTBEAT_LUA takes the rest of the argument as it is.
        return f"{self.key_hash} {self.now_ms} {self.health} {self.service_id}"


def heartbeat_call(beats: Sequence[Beat]) -> tuple[list[str], list[str | int]]:
    """KEYS and ARGV of one HEARTBEAT_LUA call for ``beats``."""
    k = keys()
    return k.heartbeat_keys, [claim_valid_ms(), k.token(""), k.member_groups(""), *(beat.packed for beat in beats)]


def _decoded(reply: list[list[bytes | str]]) -> list[list[str] | redis.ResponseError]:
    """Each entry as strings; an ERROR entry as the ResponseError that heartbeat alone would have raised."""
    entries: list[list[str] | redis.ResponseError] = []
    for entry in reply:
        parts = [part.decode() if isinstance(part, bytes) else str(part) for part in entry]
        entries.append(redis.ResponseError(f"heartbeat script: {parts[1]}") if parts[0] == "ERROR" else parts)
    return entries


def heartbeat_many(r: redis.Redis, beats: Sequence[Beat]) -> list[list[str] | redis.ResponseError]:
    """Run ``beats`` in one HEARTBEAT_LUA call; one reply entry per beat, in order (see HEARTBEAT_LUA), or the
    error of that beat. A failure of the call itself (Redis unreachable) is raised."""
    call_keys, args = heartbeat_call(beats)
    return _decoded(HEARTBEAT.run(r, call_keys, *args))


def heartbeat_one(r: redis.Redis, beat: Beat) -> list[str]:
    """``heartbeat_many`` of one beat: its reply entry, or its error raised."""
    entry = heartbeat_many(r, [beat])[0]
    if isinstance(entry, redis.ResponseError):
        raise entry
    return entry


async def heartbeat_many_async(r: aredis.Redis, beats: Sequence[Beat]) -> list[list[str] | redis.ResponseError]:
    """``heartbeat_many`` on an asyncio client."""
    call_keys, args = heartbeat_call(beats)
    return _decoded(await HEARTBEAT.run_async(r, call_keys, *args))


# One service's whole lease entry, removed; the removal scripts below share it.
# KEYS: deadline, removal, conf, health, recoveries.
_REMOVE_ENTRY_LUA = """
local removed = {}
local function remove(id)
  redis.call('ZREM', KEYS[1], id)
  redis.call('ZREM', KEYS[2], id)
  redis.call('HDEL', KEYS[3], id)
  redis.call('HDEL', KEYS[4], id)
  redis.call('HDEL', KEYS[5], id)
  table.insert(removed, id)
end
"""

# Remove the given services whose removal deadline is before now; returns the ids removed. Leader
# jobs run it only after their fenced commit deleted the rows, so a rejected job changes nothing
# here, and an entry renewed or re-registered since the decision stays.
REMOVE_LAPSED_LUA = (
    _REMOVE_ENTRY_LUA
    + """
for i, id in ipairs(ARGV) do
  if i > 1 then
    local score = redis.call('ZSCORE', KEYS[2], id)
    if (not score) or tonumber(score) < tonumber(ARGV[1]) then
      remove(id)
    end
  end
end
return removed
"""
)


@dataclass(frozen=True)
class Keys:
    deadline: str
    removal: str
    conf: str
    health: str
    tokens: str
    built: str
    counters: str
    recoveries: str  # hash: id -> renewals after a lapse (registry.revisions)
    recovered: str  # set: ids renewed after a lapse, not yet announced to watchers
    lapse_announced: str  # set: ids whose lapse watchers were told of, not yet their recovery

    sessions: str
    timeouts: str
    epochs: str
    claims: str
    member_prefix: str
    sessions_built: str

    @functools.cached_property
    def heartbeat_keys(self) -> list[str]:
        """The keys every HEARTBEAT_LUA call names first (see there)."""
        return [
            self.deadline,
            self.removal,
            self.conf,
            self.health,
            self.counter("heartbeats"),
            self.sessions,
            self.timeouts,
            self.claims,
            self.recoveries,
            self.recovered,
        ]

    def member_groups(self, member_id: str) -> str:
        return f"{self.member_prefix}{member_id}"

    def token(self, key_hash: str) -> str:
        return f"{self.tokens}:{key_hash}"

    def counter(self, name: str) -> str:
        return f"{self.counters}:{name}"


def keys() -> Keys:
    return _keys(settings.REGISTRY_REDIS_PREFIX)


@functools.cache
def _keys(p: str) -> Keys:
    return Keys(
        deadline=f"{p}lease:deadline",
        removal=f"{p}lease:removal",
        conf=f"{p}lease:conf",
        health=f"{p}lease:health",
        tokens=f"{p}tokens",
        built=f"{p}lease:built",
        counters=f"{p}counter",
        recoveries=f"{p}lease:recoveries",
        recovered=f"{p}lease:recovered",
        lapse_announced=f"{p}lease:deadline:lapse-announced",
        sessions=f"{p}member:session",
        timeouts=f"{p}member:timeout",
        epochs=f"{p}member:epoch",
        claims=f"{p}member:claim",
        member_prefix=f"{p}member:groups:",
        sessions_built=f"{p}member:built",
    )


def to_ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def from_ms(ms: int | float) -> datetime:
    return datetime.fromtimestamp(int(ms) / 1000, tz=UTC)


def conf_value(lease_seconds: int, deregister_after: int, owner_id: int | None) -> str:
    return f"{lease_seconds * 1000}:{deregister_after * 1000}:{owner_id or ''}"


def token_value(token_id: int, is_staff: bool) -> str:
    return f"{token_id}:{1 if is_staff else 0}"


def put(
    r: redis.Redis,
    service_id: str,
    *,
    deadline_ms: int,
    lease_seconds: int,
    deregister_after: int,
    owner_id: int | None,
    health: str,
    only_if_absent: bool = False,
    restored_recoveries: int | None = None,
) -> None:
    """Write a service's whole lease entry atomically (MULTI/EXEC). ``restored_recoveries``: the entry is
    recreated from the database, with this recovery count if it has none (registry.revisions), and its
    state is queued for the cleanup job's announcement."""
    k = keys()
    pipe = r.pipeline(transaction=True)
    if restored_recoveries is not None:
        pipe.hsetnx(k.recoveries, service_id, restored_recoveries)
        pipe.sadd(k.recovered, service_id)
    pipe.zadd(k.deadline, {service_id: deadline_ms}, nx=only_if_absent)
    pipe.zadd(k.removal, {service_id: deadline_ms + deregister_after * 1000}, nx=only_if_absent)
    conf = conf_value(lease_seconds, deregister_after, owner_id)
    if only_if_absent:
        pipe.hsetnx(k.conf, service_id, conf)
        pipe.hsetnx(k.health, service_id, health)
    else:
        pipe.hset(k.conf, service_id, conf)
        pipe.hset(k.health, service_id, health)
    pipe.execute()


# Remove the given services whose removal deadline is still the one seen when the removal was
# decided (an orphan whose row was gone); one re-registered since has a new deadline and stays.
# KEYS: deadline, removal, conf, health, recoveries. ARGV: id, removal deadline, id, removal deadline...
REMOVE_UNCHANGED_LUA = (
    _REMOVE_ENTRY_LUA
    + """
for i = 1, #ARGV, 2 do
  local id = ARGV[i]
  local score = redis.call('ZSCORE', KEYS[2], id)
  if score and tonumber(score) == tonumber(ARGV[i + 1]) then
    remove(id)
  end
end
return removed
"""
)


def remove(r: redis.Redis, service_ids: Sequence[str]) -> None:
    if not service_ids:
        return
    k = keys()
    pipe = r.pipeline(transaction=True)
    pipe.zrem(k.deadline, *service_ids)
    pipe.zrem(k.removal, *service_ids)
    pipe.hdel(k.conf, *service_ids)
    pipe.hdel(k.health, *service_ids)
    pipe.hdel(k.recoveries, *service_ids)
    pipe.execute()


def set_health(r: redis.Redis, service_id: str, health: str) -> None:
    r.hset(keys().health, service_id, health)


def deadlines(r: redis.Redis, service_ids: Sequence[str]) -> dict[str, int]:
    if not service_ids:
        return {}
    scores = r.zmscore(keys().deadline, list(service_ids))
    return {sid: int(score) for sid, score in zip(service_ids, scores, strict=True) if score is not None}


def live_entries(r: redis.Redis, service_ids: Sequence[str]) -> dict[str, tuple[int | None, int | None]]:
    """Each service's lease deadline and recovery count (None where absent), read in one atomic step."""
    if not service_ids:
        return {}
    k = keys()
    pipe = r.pipeline(transaction=True)
    pipe.zmscore(k.deadline, list(service_ids))
    pipe.hmget(k.recoveries, list(service_ids))
    scores, counts = pipe.execute()
    return {
        sid: (int(score) if score is not None else None, int(count) if count is not None else None)
        for sid, score, count in zip(service_ids, scores, counts, strict=True)
    }


# KEYS: revision counter. ARGV: newest stored revision, jump.
RAISE_COUNTER_LUA = """
if tonumber(redis.call('GET', KEYS[1]) or '0') <= tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], tonumber(ARGV[1]) + tonumber(ARGV[2]))
end
"""


def raise_revision_counter(r: redis.Redis, newest_stored: int, jump: int) -> None:
    """After Redis lost data: a revision counter at or below the newest revision the database stores has
    lost increments (removals among them, whose revisions nothing stores), so it moves ``jump`` above it."""
    r.eval(RAISE_COUNTER_LUA, 1, keys().counter("revision"), newest_stored, jump)


def lapsed_ids(r: redis.Redis, now_ms: int) -> list[str]:
    """Ids whose lease deadline is at or before now."""
    return [raw.decode() for raw in r.zrangebyscore(keys().deadline, "-inf", now_ms)]


def removal_deadlines(r: redis.Redis, service_ids: Sequence[str]) -> dict[str, int]:
    """Removal deadlines (lease deadline + deregister_after) of the services that have an entry."""
    if not service_ids:
        return {}
    scores = r.zmscore(keys().removal, list(service_ids))
    return {sid: int(score) for sid, score in zip(service_ids, scores, strict=True) if score is not None}


def remove_unchanged(r: redis.Redis, seen: dict[str, int]) -> list[str]:
    """Remove the entries whose removal deadline is still the one in ``seen``; returns the ids removed."""
    if not seen:
        return []
    k = keys()
    args = [x for sid, score in sorted(seen.items()) for x in (sid, score)]
    removed = r.eval(REMOVE_UNCHANGED_LUA, 5, k.deadline, k.removal, k.conf, k.health, k.recoveries, *args)
    return [raw.decode() for raw in removed]


def removal_candidates(r: redis.Redis, now_ms: int, limit: int) -> list[str]:
    return [raw.decode() for raw in r.zrangebyscore(keys().removal, "-inf", f"({now_ms}", start=0, num=limit)]


def remove_if_lapsed(r: redis.Redis, service_ids: Sequence[str], now_ms: int) -> list[str]:
    if not service_ids:
        return []
    k = keys()
    removed = r.eval(REMOVE_LAPSED_LUA, 5, k.deadline, k.removal, k.conf, k.health, k.recoveries, now_ms, *service_ids)
    return [raw.decode() for raw in removed]


# A cached token is re-checked against the database at least this often, so a revocation
# that could not reach Redis (Redis down at that moment) still takes effect.
TOKEN_CACHE_SECONDS = 300


def cache_token(r: redis.Redis, key_hash: str, token_id: int, is_staff: bool) -> None:
    r.set(keys().token(key_hash), token_value(token_id, is_staff), ex=TOKEN_CACHE_SECONDS)


def forget_token(r: redis.Redis, key_hash: str) -> None:
    r.delete(keys().token(key_hash))


def is_built(r: redis.Redis) -> bool:
    return bool(r.exists(keys().built))


def mark_built(r: redis.Redis) -> None:
    r.set(keys().built, "1")


# Grace after an outage: push every lease deadline (and removal deadline) to at least now + its
# lease. XX: never recreate an entry deregistered meanwhile; GT: never shorten a renewed one. A lapsed
# lease it revives counts a recovery, as a heartbeat's would (registry.revisions).
# KEYS: deadline, removal, conf, recoveries, recovered. ARGV: now_ms, ids...
GRACE_LEASES_LUA = """
local extended = 0
for i, id in ipairs(ARGV) do
  if i > 1 then
    local conf = redis.call('HGET', KEYS[3], id)
    if conf then
      local lease_ms, dereg_ms = string.match(conf, '^(%d+):(%d+):')
      local deadline = tonumber(ARGV[1]) + tonumber(lease_ms)
      local before = redis.call('ZSCORE', KEYS[1], id)
      if before and tonumber(before) <= tonumber(ARGV[1]) then
        redis.call('HINCRBY', KEYS[4], id, 1)
        redis.call('SADD', KEYS[5], id)
      end
      extended = extended + redis.call('ZADD', KEYS[1], 'XX', 'GT', 'CH', deadline, id)
      redis.call('ZADD', KEYS[2], 'XX', 'GT', deadline + tonumber(dereg_ms), id)
    end
  end
end
return extended
"""

# The same for member sessions. KEYS: sessions, timeouts. ARGV: now_ms, sessions...
GRACE_SESSIONS_LUA = """
local extended = 0
for i, session in ipairs(ARGV) do
  if i > 1 then
    local entry = redis.call('HGET', KEYS[2], session)
    if entry then
      local deadline = tonumber(ARGV[1]) + tonumber(string.match(entry, '^%d+'))
      extended = extended + redis.call('ZADD', KEYS[1], 'XX', 'GT', 'CH', deadline, session)
    end
  end
end
return extended
"""


def grant_grace(r: redis.Redis, now_ms: int, chunk: int = 1000) -> tuple[int, int]:
    """Give every lease and member session in Redis at least one full lease (session timeout) from
    ``now_ms``; returns how many leases and sessions were extended. Batched, so Redis is never
    blocked for long, and safe beside concurrent heartbeats and deregistrations."""
    k = keys()
    counts = []
    for hash_key, script, zkeys in (
        (k.conf, GRACE_LEASES_LUA, [k.deadline, k.removal, k.conf, k.recoveries, k.recovered]),
        (k.timeouts, GRACE_SESSIONS_LUA, [k.sessions, k.timeouts]),
    ):
        extended = cursor = 0
        while True:
            cursor, entries = r.hscan(hash_key, cursor, count=chunk)
            if entries:
                extended += int(r.eval(script, len(zkeys), *zkeys, now_ms, *entries))
            if cursor == 0:
                break
        counts.append(extended)
    return counts[0], counts[1]


def server_run_id(r: redis.Redis) -> str:
    """The Redis server's run_id: new at every start, so a change means it restarted (maybe from an old file)."""
    return str(r.info("server")["run_id"])


def sessions_built(r: redis.Redis) -> bool:
    return bool(r.exists(keys().sessions_built))


def mark_sessions_built(r: redis.Redis) -> None:
    r.set(keys().sessions_built, "1")


def incr(r: redis.Redis, name: str, amount: int = 1) -> None:
    if amount:
        r.incrby(keys().counter(name), amount)


def counters(r: redis.Redis, names: Iterable[str]) -> dict[str, int]:
    names = list(names)
    values = r.mget([keys().counter(n) for n in names])
    return {n: int(v or 0) for n, v in zip(names, values, strict=True)}


# --- member sessions ---------------------------------------------------------------------
# A session is keyed "<group_id>/<member_id>" ('/' never appears in an identifier). Its entry in the
# timeouts hash is "<timeout_ms>:<owner token id>" (owner empty if none): the heartbeat of a service
# with the member's id renews the session only for that owner. Scripts read the timeout as the
# leading digits, so an entry of the older form "<timeout_ms>" still works (and couples to nothing).

# Renew only the incarnation the session belongs to (groups.incarnations): a stale member epoch
# renews nothing. No session, no epoch recorded (a session restored by reconcile), or a session the
# expiry job has claimed: false, and the database decides under the group lock.
# KEYS: sessions, timeouts, epochs, claims. ARGV: session, now_ms, member_epoch, claim_valid_ms.
RENEW_SESSION_LUA = """
local entry = redis.call('HGET', KEYS[2], ARGV[1])
if not entry then return false end
local claimed = redis.call('HGET', KEYS[4], ARGV[1])
if claimed and tonumber(claimed) >= tonumber(ARGV[2]) - tonumber(ARGV[4]) then return false end
local epoch = redis.call('HGET', KEYS[3], ARGV[1])
if not epoch then return false end
if epoch ~= ARGV[3] then return 'FENCED' end
local deadline = tonumber(ARGV[2]) + tonumber(string.match(entry, '^%d+'))
-- GT: a heartbeat delayed behind a later one (a client that timed out and sent again) never moves the
-- deadline back, which would let the expiry job take a session its member was told it keeps
redis.call('ZADD', KEYS[1], 'GT', deadline, ARGV[1])
return redis.call('ZSCORE', KEYS[1], ARGV[1])
"""

# A join's session: a new member's, or a new incarnation of a member that has a row. For a row,
# the previous incarnation's deadline is read and replaced in one step, so no renewal can slip in
# between; a row without a session counts as live until ARGV[7] (one timeout from now). A dynamic
# join ('dynamic') of a member whose session has not run out changes nothing and answers LIVE.
# A join's session is never claimed by the expiry job (it clears any claim).
# KEYS: sessions, timeouts, epochs, the member's groups, claims. ARGV: session, now_ms, deadline_ms,
# the timeouts entry (session_value: timeout and owner), member_epoch, mode (new | dynamic | static),
# unknown_deadline_ms, group_id.
TAKE_SESSION_LUA = """
local old = false
if ARGV[6] ~= 'new' then
  old = redis.call('ZSCORE', KEYS[1], ARGV[1]) or ARGV[7]
  if ARGV[6] == 'dynamic' and tonumber(old) >= tonumber(ARGV[2]) then return {'LIVE', tostring(old)} end
end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[4])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[5])
redis.call('SADD', KEYS[4], ARGV[8])
redis.call('HDEL', KEYS[5], ARGV[1])
if old then return {'OK', tostring(old)} end
return {'OK', ''}
"""

# The expiry job, under the group lock, claims the sessions it is about to expire: only those still
# lapsed (or gone) at ARGV[1] are claimed, atomically, and returned. A claimed session is renewed by no
# heartbeat (RENEW_SESSION_LUA, HEARTBEAT_LUA): such a heartbeat waits for the group lock and the
# database decides (row deleted: 404; the job rolled back: the session is written again, claim cleared).
# A claim older than claim_valid_ms is ignored, so a job that died mid-way blocks nothing for long.
# KEYS: sessions, claims. ARGV: now_ms, sessions...
CLAIM_SESSIONS_LUA = """
local claimed = {}
for i, session in ipairs(ARGV) do
  if i > 1 then
    local score = redis.call('ZSCORE', KEYS[1], session)
    if (not score) or tonumber(score) < tonumber(ARGV[1]) then
      redis.call('HSET', KEYS[2], session, ARGV[1])
      table.insert(claimed, session)
    end
  end
end
return claimed
"""

# After the expiry committed: remove the sessions still lapsed (a join since clears the claim and
# starts a new one, which stays). KEYS: sessions, timeouts, member groups prefix, epochs, claims.
REMOVE_EXPIRED_SESSIONS_LUA = """
local removed = {}
for i, session in ipairs(ARGV) do
  if i > 1 then
    local score = redis.call('ZSCORE', KEYS[1], session)
    if (not score) or tonumber(score) < tonumber(ARGV[1]) then
      redis.call('ZREM', KEYS[1], session)
      redis.call('HDEL', KEYS[2], session)
      redis.call('HDEL', KEYS[4], session)
      redis.call('HDEL', KEYS[5], session)
      local group, member = string.match(session, '^(.*)/(.*)$')
      redis.call('SREM', KEYS[3] .. member, group)
      table.insert(removed, session)
    end
  end
end
return removed
"""


def session_key(group_id: str, member_id: str) -> str:
    return f"{group_id}/{member_id}"


def session_value(timeout_seconds: int, owner_id: int | None) -> str:
    return f"{timeout_seconds * 1000}:{owner_id if owner_id is not None else ''}"


def split_session(key: str) -> tuple[str, str]:
    group_id, _, member_id = key.partition("/")
    return group_id, member_id


def put_session(
    r: redis.Redis,
    group_id: str,
    member_id: str,
    *,
    timeout_seconds: int,
    deadline_ms: int,
    owner_id: int | None = None,
    only_if_absent: bool = False,
    member_epoch: int | None = None,
) -> None:
    """Write a member's session; ``owner_id`` is the token that joined it (see session_value)."""
    k = keys()
    key = session_key(group_id, member_id)
    pipe = r.pipeline(transaction=True)
    pipe.zadd(k.sessions, {key: deadline_ms}, nx=only_if_absent)
    pipe.hset(k.timeouts, key, session_value(timeout_seconds, owner_id))
    if member_epoch is not None:
        pipe.hset(k.epochs, key, member_epoch)
    pipe.sadd(k.member_groups(member_id), group_id)
    pipe.hdel(k.claims, key)
    pipe.execute()


def remove_session(r: redis.Redis, group_id: str, member_id: str) -> None:
    k = keys()
    key = session_key(group_id, member_id)
    pipe = r.pipeline(transaction=True)
    pipe.zrem(k.sessions, key)
    pipe.hdel(k.timeouts, key)
    pipe.hdel(k.epochs, key)
    pipe.hdel(k.claims, key)
    pipe.srem(k.member_groups(member_id), group_id)
    pipe.execute()


class StaleEpoch(Exception):
    """The session belongs to another incarnation (member epoch) of the member."""


def renew_session(r: redis.Redis, group_id: str, member_id: str, now_ms: int, member_epoch: int) -> int | None:
    """Move the session's deadline to now + its timeout, never back, if ``member_epoch`` is the session's;
    None if there is no such session (or it records no epoch). StaleEpoch if it belongs to another
    incarnation. Returns the deadline the session has now."""
    k = keys()
    key = session_key(group_id, member_id)
    deadline = r.eval(
        RENEW_SESSION_LUA, 4, k.sessions, k.timeouts, k.epochs, k.claims, key, now_ms, member_epoch, claim_valid_ms()
    )
    if deadline == b"FENCED":
        raise StaleEpoch(key)
    return int(deadline) if deadline is not None else None


def take_session(
    r: redis.Redis,
    group_id: str,
    member_id: str,
    *,
    now_ms: int,
    timeout_seconds: int,
    member_epoch: int,
    mode: str,
    unknown_deadline_ms: int = 0,
    owner_id: int | None = None,
) -> tuple[bool, int | None]:
    """Start the session of a join's incarnation (TAKE_SESSION_LUA). Returns (taken, previous deadline):
    taken False (nothing changed) when ``mode`` is 'dynamic' and the previous session is still live."""
    k = keys()
    status, previous = r.eval(
        TAKE_SESSION_LUA,
        5,
        k.sessions,
        k.timeouts,
        k.epochs,
        k.member_groups(member_id),
        k.claims,
        session_key(group_id, member_id),
        now_ms,
        now_ms + timeout_seconds * 1000,
        session_value(timeout_seconds, owner_id),
        member_epoch,
        mode,
        unknown_deadline_ms,
        group_id,
    )
    return status == b"OK", int(float(previous)) if previous else None


def session_deadlines(r: redis.Redis, sessions: Sequence[tuple[str, str]]) -> dict[tuple[str, str], int]:
    if not sessions:
        return {}
    scores = r.zmscore(keys().sessions, [session_key(g, m) for g, m in sessions])
    return {s: int(score) for s, score in zip(sessions, scores, strict=True) if score is not None}


def expired_sessions(r: redis.Redis, now_ms: int, limit: int) -> list[tuple[str, str]]:
    raw = r.zrangebyscore(keys().sessions, "-inf", f"({now_ms}", start=0, num=limit)
    return [split_session(item.decode()) for item in raw]


def claim_valid_ms() -> int:
    """How long an expiry claim blocks renewals: longer than any expiry transaction may take."""
    return int(settings.REGISTRY_SESSION_CLAIM_SECONDS * 1000)


def claim_expired_sessions(r: redis.Redis, sessions: Sequence[tuple[str, str]], now_ms: int) -> list[tuple[str, str]]:
    """Claim, for the expiry job, those of ``sessions`` still lapsed at ``now_ms`` (CLAIM_SESSIONS_LUA)."""
    if not sessions:
        return []
    k = keys()
    claimed = r.eval(CLAIM_SESSIONS_LUA, 2, k.sessions, k.claims, now_ms, *[session_key(g, m) for g, m in sessions])
    return [split_session(item.decode()) for item in claimed]


def release_claims(r: redis.Redis, sessions: Sequence[tuple[str, str]]) -> None:
    """Drop the expiry job's claims (its transaction did not commit): renewals work again at once."""
    if sessions:
        r.hdel(keys().claims, *[session_key(g, m) for g, m in sessions])


def remove_expired_sessions(r: redis.Redis, sessions: Sequence[tuple[str, str]], now_ms: int) -> list[tuple[str, str]]:
    if not sessions:
        return []
    k = keys()
    removed = r.eval(
        REMOVE_EXPIRED_SESSIONS_LUA,
        5,
        k.sessions,
        k.timeouts,
        k.member_prefix,
        k.epochs,
        k.claims,
        now_ms,
        *[session_key(g, m) for g, m in sessions],
    )
    return [split_session(item.decode()) for item in removed]


def all_sessions(r: redis.Redis, chunk: int = 1000) -> Iterable[tuple[str, str]]:
    for raw in r.hscan_iter(keys().timeouts, count=chunk):
        yield split_session((raw[0] if isinstance(raw, tuple) else raw).decode())
