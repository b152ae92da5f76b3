"""Continuity of the Redis lease store across outages.

Redis keeps the lease deadlines and member sessions. When it was unreachable (crashed, paused,
network), restarted from an old file, or lost its data, the deadlines it holds say nothing true
about the services that kept heartbeating and were refused. This module notices each of those
cases and, before any expiry runs, gives every lease and member session at least one full lease
of grace from now (as Consul resets TTLs after a leader change), so nothing is removed for a lapse
that happened while Redis could not take heartbeats.

Noticing: every path that answers 503 because of Redis calls ``note_unreachable`` (a throttled
write to the database, which outlives Redis); ``ensure_continuity`` compares Redis's run_id with
the one the database last saw (a new run_id means a restart, maybe from an old snapshot) and
checks the markers that an empty Redis lacks.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime

import redis
from django.db import DatabaseError, transaction
from django.db.models import Q
from django.utils import timezone

from . import lease_store, leases
from .leases import Guard
from .models import LeaseStoreState
from .redis_client import get_redis
from .signals import lease_store_recovered

log = logging.getLogger(__name__)

# One process notes an outage at most this often: during an outage every request fails, and
# the database must not take a write per failed heartbeat.
NOTE_EVERY_SECONDS = 1.0
_next_note_at = 0.0


def note_unreachable(now: datetime | None = None) -> None:
    """Record that this process found Redis unreachable. Never raises: it runs on error paths."""
    global _next_note_at
    mono = time.monotonic()
    if mono < _next_note_at:
        return
    _next_note_at = mono + NOTE_EVERY_SECONDS
    now = now or timezone.now()
    try:
        with transaction.atomic():
            noted = (
                LeaseStoreState.objects.filter(pk=1)
                .filter(Q(unreachable_at__isnull=True) | Q(unreachable_at__lt=now))
                .update(unreachable_at=now)
            )
            if not noted:
                LeaseStoreState.objects.get_or_create(pk=1, defaults={"unreachable_at": now})
    except DatabaseError:
        log.exception("could not record that Redis was unreachable")


def reset_note_throttle() -> None:
    """Let the next ``note_unreachable`` write at once (tests that simulate several outages)."""
    global _next_note_at
    _next_note_at = 0.0


def _reasons(r: redis.Redis, state: LeaseStoreState, run_id: str) -> list[str]:
    reasons = []
    if state.run_id and state.run_id != run_id:
        reasons.append(f"Redis restarted (run {run_id[:8]})")
    if not lease_store.is_built(r):
        reasons.append("lease entries missing")
    if not lease_store.sessions_built(r):
        reasons.append("member sessions missing")
    outage = state.unreachable_at
    if outage is not None and (state.graced_at is None or outage > state.graced_at):
        reasons.append(f"Redis was unreachable at {outage.isoformat()}")
    return reasons


def ensure_continuity(now: datetime, guard: Guard = transaction.atomic) -> list[str]:
    """Run before every expiry: if Redis restarted, lost data or was unreachable since the last check,
    restore what it lacks from the database and grant every lease and session one lease of grace
    from ``now``. Returns why it acted (empty when Redis was continuous and nothing was done).

    Restoring runs in ``guard``'s transactions (a leader's fenced ones); extending only ever
    lengthens deadlines, so a stale leader doing it again changes nothing that matters.
    """
    r = get_redis()
    run_id = lease_store.server_run_id(r)
    state = LeaseStoreState.objects.filter(pk=1).first() or LeaseStoreState(pk=1)
    reasons = _reasons(r, state, run_id)
    if not reasons:
        if state.run_id != run_id:  # the first check ever: nothing to protect, only remember this run
            LeaseStoreState.objects.update_or_create(pk=1, defaults={"run_id": run_id})
        return []
    restored = leases.reconcile(now, grace=True, guard=guard)
    lease_store_recovered.send(sender=LeaseStoreState, now=now, guard=guard)
    extended, sessions = lease_store.grant_grace(r, lease_store.to_ms(now))
    # Recorded only once the grace is in place: a run that fails before this point (Redis gone
    # again, leadership lost) leaves the outage unrecorded, and the next run grants it again.
    LeaseStoreState.objects.update_or_create(pk=1, defaults={"run_id": run_id, "graced_at": state.unreachable_at})
    log.warning(
        "lease store grace (%s): %d lease(s) restored, %d extended, %d session(s) extended, from %s",
        "; ".join(reasons),
        restored["restored"],
        extended,
        sessions,
        now.isoformat(),
    )
    return reasons
