"""Celery tasks of the registry. Each does one bounded batch by calling ``registry.leases``, and only on the
leader, with every write fenced by its term (``registry.leadership``)."""

from __future__ import annotations

from celery import shared_task
from django.db import transaction
from django.utils import timezone

from . import leases, lifecycle, outage
from .leadership import Term, guard_for, prune_job_runs, run_as_leader
from .leases import Guard


def cleanup_once(guard: Guard = transaction.atomic) -> list[str]:
    """One cleanup run: grace after any Redis outage or restart, expire one batch, announce lapses."""
    now = timezone.now()
    outage.ensure_continuity(now, guard)
    removed = leases.expire_lapsed(now, guard=guard)
    leases.announce_lapses(now, guard=guard)
    return removed


@shared_task(name="registry.cleanup_expired_leases", ignore_result=True)
def cleanup_expired_leases() -> int | None:
    """Remove services whose lease lapsed more than ``deregister_after`` ago; how many, or None if not leader."""
    return run_as_leader("cleanup", lambda term: len(cleanup_once(guard_for(term, "cleanup"))))


def _reconcile(term: Term) -> int:
    result = leases.reconcile(timezone.now(), guard=guard_for(term, "reconcile"))
    prune_job_runs(timezone.now(), guard_for(term, "prune"))
    return result["restored"] + result["dropped"]


@shared_task(name="registry.reconcile_leases", ignore_result=True)
def reconcile_leases() -> int | None:
    """Repair any disagreement between the database and the Redis lease store (leader only)."""
    return run_as_leader("reconcile", _reconcile)


# Batches one prune run deletes at most; a backlog beyond that is left to the next run (hourly).
PRUNE_BATCHES_PER_RUN = 20


def prune_history_once(guard: Guard = transaction.atomic, batches: int = PRUNE_BATCHES_PER_RUN) -> int:
    """Forget lifecycle rows older than REGISTRY_HISTORY_DAYS, a batch per fenced transaction; how many."""
    now = timezone.now()
    total = 0
    for _ in range(batches):
        with guard() as run:
            deleted = lifecycle.prune(now)
            if run is not None:
                run.items = deleted
        total += deleted
        if not deleted:
            break
    return total


@shared_task(name="registry.prune_history", ignore_result=True)
def prune_history() -> int | None:
    """Delete service lifecycle rows older than REGISTRY_HISTORY_DAYS (leader only); how many, or None."""
    return run_as_leader("prune_history", lambda term: prune_history_once(guard_for(term, "prune_history")))
