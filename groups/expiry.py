"""Member sessions that ran out: the leader's expiry job removes those members (one rebalance per group),
and ``reconcile_sessions`` makes Redis's sessions agree with the member rows."""

from __future__ import annotations

import contextlib
from datetime import datetime

import redis
from django.db import transaction

from registry import lease_store
from registry.leases import Guard
from registry.redis_client import get_redis

from . import events
from .models import GroupMember, RebalanceReason
from .rebalance import lock_group, members_of, rebalance


def expire_members(now: datetime, limit: int = 500, guard: Guard = transaction.atomic) -> list[tuple[str, str]]:
    """Remove up to ``limit`` members whose session ran out, one rebalance per group touched.

    ``guard`` makes each group's transaction; a leader passes one fenced with its term. Under the
    group lock the job claims, atomically in Redis, the sessions still lapsed (a heartbeat since the
    selection wins). From then on no heartbeat renews them: one that arrives takes the group lock
    and finds the row gone (404) or, if the transaction did not commit, writes the session again.
    So a member is never told its session is kept while the job hands its partitions on. The
    sessions are removed from Redis only after the transaction committed, so a job whose fence
    fails at the last moment leaves members, sessions and partitions as they were (and drops its
    claims) and the next run expires them. Sessions with no member row (a run that failed after its
    commit) go too.
    """
    r = get_redis()
    now_ms = lease_store.to_ms(now)
    candidates = lease_store.expired_sessions(r, now_ms, limit)
    by_group: dict[str, list[str]] = {}
    for group_id, member_id in candidates:
        by_group.setdefault(group_id, []).append(member_id)
    removed: list[tuple[str, str]] = []
    for group_id, member_ids in sorted(by_group.items()):
        claimed: list[tuple[str, str]] = []
        try:
            with guard() as run:
                group = lock_group(group_id)
                claimed = lease_store.claim_expired_sessions(r, [(group_id, m) for m in member_ids], now_ms)
                lapsed = sorted(m for _g, m in claimed)
                before = members_of(group) if group is not None else []
                gone_ids = [m for m in lapsed if m in before]
                if group is not None and gone_ids:
                    deleted, _ = group.members.filter(member_id__in=gone_ids).delete()
                    event = rebalance(group, RebalanceReason.EXPIRY, now, members_before=before)
                    for member_id in gone_ids:
                        events.member_removed(
                            group_id, member_id, event.generation, group.version, RebalanceReason.EXPIRY
                        )
                    if run is not None:
                        run.items = deleted
        except BaseException:
            # Not committed: the members stay, and their heartbeats must renew again at once.
            with contextlib.suppress(redis.RedisError):
                lease_store.release_claims(r, claimed)
            raise
        # Committed: the rows are gone, so are their sessions (only those still lapsed: a member
        # that joined again meanwhile keeps its new session).
        lease_store.remove_expired_sessions(r, [(group_id, m) for m in lapsed], now_ms)
        removed += [(group_id, m) for m in gone_ids]
    return removed


def reconcile_sessions(now: datetime, grace: bool = False, guard: Guard = transaction.atomic) -> int:
    """Make Redis's member sessions agree with the member rows; returns how many changed.

    Run on a schedule by the leader (``groups.tasks.reconcile_sessions``) and after a Redis outage.
    A member row without a session (lost by Redis, or removed by a job that failed) gets one back
    with one session timeout from ``now``: a live member keeps it with its heartbeats, a dead one
    is expired by the next expiry after it, so its partitions are not left revoking for good.
    ``grace`` is kept for the outage path, which gives every session the same timeout.
    A session with no member row is dropped: decided in ``guard``'s transaction (a leader's fenced
    one), applied after it committed.
    """
    r = get_redis()
    now_ms = lease_store.to_ms(now)
    changed = 0
    members = list(GroupMember.objects.values_list("group_id", "member_id", "session_timeout", "owner"))
    present = lease_store.session_deadlines(r, [(g, m) for g, m, _t, _o in members])
    for group_id, member_id, timeout, owner_id in members:
        if (group_id, member_id) not in present:
            # Only where Redis has none: idempotent, and true whatever the fence decides.
            lease_store.put_session(
                r,
                group_id,
                member_id,
                timeout_seconds=timeout,
                deadline_ms=now_ms + timeout * 1000,
                owner_id=owner_id,
                only_if_absent=True,
            )
            changed += 1
    known = {(g, m) for g, m, _t, _o in members}
    suspects = [s for s in lease_store.all_sessions(r) if s not in known]
    if suspects:
        with guard() as run:
            # Read again: a member that joined since the first read is not an orphan.
            still = {
                (g, m)
                for g, m in GroupMember.objects.filter(member_id__in=[m for _g, m in suspects]).values_list(
                    "group_id", "member_id"
                )
            }
            orphans = [s for s in suspects if s not in still]
            if run is not None:
                run.items = len(orphans)
        for session in orphans:
            lease_store.remove_session(r, *session)
        changed += len(orphans)
    lease_store.mark_sessions_built(r)
    return changed
