"""Celery tasks of the registry. Each does one bounded batch by calling ``registry.leases``."""

from __future__ import annotations

from celery import shared_task
from django.utils import timezone

from . import lease_store, leases
from .redis_client import get_redis


def cleanup_once() -> list[str]:
    """One cleanup run: restore the lease store if Redis lost it, then expire one batch."""
    now = timezone.now()
    if not lease_store.is_built(get_redis()):
        leases.reconcile(now, grace=True)
    return leases.expire_lapsed(now)


@shared_task(name="registry.cleanup_expired_leases", ignore_result=True)
def cleanup_expired_leases() -> int:
    """Remove services whose lease lapsed more than ``deregister_after`` ago; returns how many."""
    return len(cleanup_once())


@shared_task(name="registry.reconcile_leases", ignore_result=True)
def reconcile_leases() -> dict[str, int]:
    """Repair any disagreement between the database and the Redis lease store."""
    return leases.reconcile(timezone.now())
