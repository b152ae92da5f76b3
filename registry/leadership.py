"""Leadership: a Redlock over independent Redis masters, and fencing tokens kept in the database.

``Redlock`` follows the algorithm as its authors specify it: SET NX PX on every master in
parallel with a per-node timeout far below the TTL; the lock is held when a majority granted it
and validity = TTL - elapsed - drift (measured on a monotonic clock) is still positive; extend and
release are compare-and-pexpire / compare-and-delete scripts on a majority; failures back off
randomly. A master that restarted without persistence may have forgotten a lock it granted, so
each master refuses to vote for one TTL after it (re)starts (the spec's "delayed restart").

Redlock alone cannot stop a holder that was paused past its validity. ``Leadership`` turns each
won lock into a new term (``LeaderTerm.term`` + 1 in a transaction): the fencing token. A
leader job writes only inside ``fenced(term)``, which locks the term row and commits only if the
term is still the current one and the lock still valid; a stale write is rolled back, logged and
counted in /metrics.
"""

from __future__ import annotations

import logging
import os
import random
import secrets
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import redis
from django.conf import settings
from django.db import transaction
from django.utils import timezone
from redis.backoff import NoBackoff
from redis.retry import Retry

from . import lease_store, outage
from .models import LeaderJobRun, LeaderTerm, LeaderTermHistory
from .redis_client import get_redis

log = logging.getLogger(__name__)

# KEYS: lock, boot marker. ARGV: token, ttl_ms. The boot marker is named after the master's run_id
# (new at every start) and holds the time this run was first asked for a vote; the master votes
# only once one TTL has passed since then. A run_id-named marker also covers a master that
# reloaded an old snapshot: it may have lost a lock granted after the snapshot.
ACQUIRE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local boot = redis.call('GET', KEYS[2])
if not boot then
  redis.call('SET', KEYS[2], now, 'PX', 86400000)
  boot = now
end
if now - tonumber(boot) < tonumber(ARGV[2]) then return 'QUARANTINE' end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 'OK' end
return 'TAKEN'
"""
EXTEND_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

LEADERSHIP = "periodic-jobs"
CLOCK_DRIFT_FACTOR = 0.01


class NotLeader(Exception):
    """This process does not hold leadership (or its lock validity ran out)."""


class StaleTerm(NotLeader):
    """A newer term exists: this holder was superseded and its write was rejected."""


@dataclass(frozen=True)
class Lock:
    token: str
    valid_until: float  # on time.monotonic()

    def remaining(self) -> float:
        return self.valid_until - time.monotonic()


class Redlock:
    def __init__(self, urls: list[str], key: str, ttl_ms: int, node_timeout_ms: int = 100) -> None:
        if not urls:
            raise ValueError("Redlock needs at least one Redis URL (REDLOCK_URLS)")
        self.key = key
        self.boot_key = f"{key}:boot"
        self.ttl_ms = ttl_ms
        self.quorum = len(urls) // 2 + 1
        timeout = node_timeout_ms / 1000
        self.nodes = [
            redis.Redis.from_url(
                url, socket_timeout=timeout, socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0)
            )
            for url in urls
        ]
        self._pool = ThreadPoolExecutor(max_workers=len(urls), thread_name_prefix="redlock")

    def _on_all(self, call: Callable[[redis.Redis], object]) -> list[object]:
        """Run ``call`` on every node in parallel; a node that fails or times out answers its exception."""

        def safe(node: redis.Redis) -> object:
            try:
                return call(node)
            except redis.RedisError as exc:
                return exc

        return list(self._pool.map(safe, self.nodes))

    def _validity(self, started: float) -> float:
        drift = self.ttl_ms * CLOCK_DRIFT_FACTOR + 2
        return (self.ttl_ms - (time.monotonic() - started) * 1000 - drift) / 1000

    def acquire(self) -> Lock | None:
        token = secrets.token_hex(16)
        started = time.monotonic()

        def vote(node: redis.Redis) -> object:
            boot_key = f"{self.boot_key}:{node.info('server')['run_id']}"
            return node.eval(ACQUIRE_LUA, 2, self.key, boot_key, token, self.ttl_ms)

        answers = self._on_all(vote)
        granted = sum(1 for a in answers if a == b"OK")
        validity = self._validity(started)
        if granted >= self.quorum and validity > 0:
            return Lock(token, started + validity)
        self._release_token(token)  # undo partial grants at once rather than waiting for the TTL
        return None

    def extend(self, lock: Lock) -> Lock | None:
        """Push the lock's expiry a full TTL ahead on a majority; None if that failed or it had lapsed."""
        if lock.remaining() <= 0:
            return None
        started = time.monotonic()
        answers = self._on_all(lambda n: n.eval(EXTEND_LUA, 1, self.key, lock.token, self.ttl_ms))
        extended = sum(1 for a in answers if a == 1)
        validity = self._validity(started)
        if extended >= self.quorum and validity > 0:
            return Lock(lock.token, started + validity)
        return None

    def release(self, lock: Lock) -> None:
        self._release_token(lock.token)

    def _release_token(self, token: str) -> None:
        self._on_all(lambda n: n.eval(RELEASE_LUA, 1, self.key, token))

    def backoff(self) -> float:
        """A random pause before trying again, so rivals do not retry in lockstep."""
        return random.uniform(0, self.ttl_ms / 1000 / 10)

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        for node in self.nodes:
            node.close()


@dataclass(frozen=True)
class Term:
    name: str
    number: int
    holder: str
    lock: Lock

    def valid(self) -> bool:
        return self.lock.remaining() > 0


def begin_term(name: str, holder: str, lock: Lock) -> int:
    """Record a won lock as a new term; the returned number is the fencing token."""
    now = timezone.now()
    with transaction.atomic():
        row, _ = LeaderTerm.objects.select_for_update().get_or_create(name=name)
        row.term += 1
        row.holder = holder
        row.expires_at = now + timedelta(seconds=max(lock.remaining(), 0))
        row.save()
        LeaderTermHistory.objects.create(name=name, term=row.term, holder=holder, started_at=now)
    log.info("%s: %s won term %d", name, holder, row.term)
    return row.term


def _reject(term: Term, why: str) -> None:
    log.warning("%s: rejected a write of term %d by %s: %s", term.name, term.number, term.holder, why)
    try:
        lease_store.incr(get_redis(), "fencing_rejections")
    except redis.RedisError:
        log.exception("could not count the rejected write")


@contextmanager
def fenced(term: Term, job: str = "write") -> Iterator[LeaderJobRun]:
    """A transaction that commits only if ``term`` is still current and its lock still valid.

    The term row stays locked until commit, so a rival cannot start a new term in between. It
    yields the LeaderJobRun that is committed with the write (set ``items`` on it).
    """
    if not term.valid():
        _reject(term, "lock validity ran out before the write")
        raise NotLeader(f"{term.holder}'s lock for {term.name} lapsed")
    with transaction.atomic():
        current = LeaderTerm.objects.select_for_update().filter(name=term.name).values_list("term", flat=True).first()
        if current != term.number:
            _reject(term, f"current term is {current}")
            raise StaleTerm(f"term {term.number} of {term.name} is stale; current is {current}")
        run = LeaderJobRun(name=term.name, term=term.number, holder=term.holder, job=job, at=timezone.now())
        yield run
        run.save()
        if not term.valid():
            _reject(term, "lock validity ran out during the write")
            raise NotLeader(f"{term.holder}'s lock for {term.name} lapsed during the write")


def prune_job_runs(now: datetime, guard: Callable[[], AbstractContextManager[Any]], keep_days: int = 1) -> int:
    """Forget leader job runs older than ``keep_days`` (the admin shows recent ones)."""
    with guard():
        deleted, _ = LeaderJobRun.objects.filter(at__lt=now - timedelta(days=keep_days)).delete()
    return deleted


def guard_for(term: Term, job: str) -> Callable[[], AbstractContextManager[LeaderJobRun]]:
    """The transaction factory a leader job passes to domain functions in place of transaction.atomic."""
    return lambda: fenced(term, job)


class Leadership:
    """One process's (or stand-in worker's) claim to a leadership name."""

    def __init__(
        self,
        name: str = LEADERSHIP,
        *,
        urls: list[str] | None = None,
        ttl_ms: int | None = None,
        holder: str | None = None,
        node_timeout_ms: int | None = None,
    ) -> None:
        self.name = name
        self.ttl_ms = ttl_ms or settings.REGISTRY_LEADER_TTL_MS
        self.holder = holder or f"{socket.gethostname()}:{os.getpid()}"
        self.redlock = Redlock(
            urls or settings.REDLOCK_URLS,
            f"{settings.REGISTRY_REDIS_PREFIX}leader:{name}",
            self.ttl_ms,
            node_timeout_ms or settings.REGISTRY_LEADER_NODE_TIMEOUT_MS,
        )
        self.term: Term | None = None

    def ensure(self) -> Term | None:
        """The current term if this holder leads (renewing the lock once half of it is used), else None."""
        term = self.term
        if term is not None:
            if term.lock.remaining() > self.ttl_ms / 2000:
                return term
            lock = self.redlock.extend(term.lock)
            if lock is not None:
                self.term = Term(term.name, term.number, term.holder, lock)
                LeaderTerm.objects.filter(name=self.name, term=term.number).update(
                    expires_at=timezone.now() + timedelta(seconds=lock.remaining())
                )
                return self.term
            if term.valid():
                return term  # could not renew yet; still valid for a little while
            log.warning(
                "%s: %s lost leadership (term %d): lock could not be renewed", self.name, self.holder, term.number
            )
            self.term = None
        lock = self.redlock.acquire()
        if lock is None:
            return None
        number = begin_term(self.name, self.holder, lock)
        self.term = Term(self.name, number, self.holder, lock)
        return self.term if self.term.valid() else None

    def ensure_for_job(self) -> Term | None:
        """The current term if this holder leads with at least ``REGISTRY_LEADER_MIN_VALIDITY_PERCENT`` of
        the lock's validity left (renewing first if less is left), else None: a job started with
        almost no validity left would be rejected at its commit, or worse, outlive its lock."""
        term = self.ensure()
        if term is None:
            return None
        needed = self.ttl_ms / 1000 * settings.REGISTRY_LEADER_MIN_VALIDITY_PERCENT / 100
        if term.lock.remaining() >= needed:
            return term
        lock = self.redlock.extend(term.lock)
        if lock is not None:
            self.term = Term(term.name, term.number, term.holder, lock)
            if lock.remaining() >= needed:
                return self.term
        log.warning(
            "%s: %s skips a job: %.3f s of its lock left, %.3f s needed",
            self.name,
            self.holder,
            max((lock or term.lock).remaining(), 0),
            needed,
        )
        return None

    def step_down(self) -> None:
        if self.term is not None:
            self.redlock.release(self.term.lock)
            self.term = None

    def close(self) -> None:
        self.redlock.close()


_process_leadership: Leadership | None = None
_process_pid: int | None = None


def process_leadership() -> Leadership:
    """This process's Leadership for the periodic jobs (one per worker process, made after fork)."""
    global _process_leadership, _process_pid
    if _process_leadership is None or _process_pid != os.getpid():
        _process_leadership, _process_pid = Leadership(), os.getpid()
    return _process_leadership


def run_as_leader(job: str, work: Callable[[Term], int]) -> int | None:
    """Run ``work(term)`` if this process leads with enough of its lock's validity left (see
    ``Leadership.ensure_for_job``); None if it does not. ``work`` fences its own writes."""
    term = process_leadership().ensure_for_job()
    if term is None:
        return None
    try:
        return work(term)
    except NotLeader as exc:
        log.warning("%s: %s", job, exc)
        return None
    except redis.RedisError:
        outage.note_unreachable()
        raise
