"""Celery tasks of the groups app. Each does one bounded batch by calling ``groups.rebalance``, and only on the
leader, with every write fenced by its term."""

from __future__ import annotations

from celery import shared_task
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from registry import outage
from registry.leadership import guard_for, run_as_leader
from registry.leases import Guard

from . import expiry, incarnations


def expire_once(guard: Guard = transaction.atomic) -> list[tuple[str, str]]:
    """One expiry run: grace after any Redis outage or restart, remove one batch of expired members, then
    hand over the partitions whose fenced incarnation's session has ended."""
    now = timezone.now()
    outage.ensure_continuity(now, guard)
    removed = expiry.expire_members(now, settings.REGISTRY_CLEANUP_BATCH, guard)
    incarnations.release_lapsed_holds(now, settings.REGISTRY_CLEANUP_BATCH, guard)
    return removed


@shared_task(name="groups.expire_members", ignore_result=True)
def expire_members() -> int | None:
    """Remove members whose session ran out and rebalance their groups; how many, or None if not leader."""
    return run_as_leader("member-expiry", lambda term: len(expire_once(guard_for(term, "member-expiry"))))


@shared_task(name="groups.reconcile_sessions", ignore_result=True)
def reconcile_sessions() -> int | None:
    """Make Redis's member sessions agree with the member rows (leader only); how many changed."""
    return run_as_leader(
        "session-reconcile",
        lambda term: expiry.reconcile_sessions(timezone.now(), guard=guard_for(term, "session-reconcile")),
    )
