"""Member sessions that ran out: the leader's expiry job removes those members (one rebalance per group),
and ``reconcile_sessions`` makes Redis's sessions agree with the member rows."""

from __future__ import annotations

from datetime import datetime

from django.db import transaction

from registry import lease_store
from registry.leases import Guard
from registry.redis_client import get_redis

from . import events
from .models import GroupMember, RebalanceReason
from .rebalance import lock_group, members_of, rebalance


def expire_members(now: datetime, limit: int = 500, guard: Guard = transaction.atomic) -> list[tuple[str, str]]:
    """Remove up to ``limit`` members whose session ran out, one rebalance per group touched.

    ``guard`` makes each group's transaction; a leader passes one fenced with its term."""
    r = get_redis()
    now_ms = lease_store.to_ms(now)
    candidates = lease_store.expired_sessions(r, now_ms, limit)
    by_group: dict[str, list[str]] = {}
    for group_id, member_id in candidates:
        by_group.setdefault(group_id, []).append(member_id)
    removed: list[tuple[str, str]] = []
    for group_id, member_ids in sorted(by_group.items()):
        with guard() as run:
            group = lock_group(group_id)
            gone = lease_store.remove_expired_sessions(r, [(group_id, m) for m in member_ids], now_ms)
            gone_ids = [m for _g, m in gone]
            if group is None or not gone_ids:
                continue
            before = members_of(group)
            deleted, _ = group.members.filter(member_id__in=gone_ids).delete()
            if deleted:
                event = rebalance(group, RebalanceReason.EXPIRY, now, members_before=before)
                for member_id in gone_ids:
                    events.member_removed(group_id, member_id, event.generation, group.version, RebalanceReason.EXPIRY)
                removed += [(group_id, m) for m in sorted(gone_ids) if m in before]
                if run is not None:
                    run.items = deleted
    return removed


def reconcile_sessions(now: datetime, grace: bool = False) -> int:
    """Restore missing Redis sessions of members in the database (one session timeout of grace
    when Redis lost its state); drop sessions whose member is gone. Returns how many changed."""
    r = get_redis()
    now_ms = lease_store.to_ms(now)
    changed = 0
    members = list(GroupMember.objects.values_list("group_id", "member_id", "session_timeout", "owner"))
    present = lease_store.session_deadlines(r, [(g, m) for g, m, _t, _o in members])
    for group_id, member_id, timeout, owner_id in members:
        if (group_id, member_id) not in present:
            deadline = now_ms + timeout * 1000 if grace else now_ms
            lease_store.put_session(
                r,
                group_id,
                member_id,
                timeout_seconds=timeout,
                deadline_ms=deadline,
                owner_id=owner_id,
                only_if_absent=True,
            )
            changed += 1
    known = {(g, m) for g, m, _t, _o in members}
    for session in list(lease_store.all_sessions(r)):
        if session not in known:
            lease_store.remove_session(r, *session)
            changed += 1
    lease_store.mark_sessions_built(r)
    return changed
