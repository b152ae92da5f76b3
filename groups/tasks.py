"""Celery tasks of the groups app. Each does one bounded batch by calling ``groups.rebalance``."""

from __future__ import annotations

from celery import shared_task
from django.conf import settings
from django.utils import timezone

from registry import lease_store
from registry.redis_client import get_redis

from . import rebalance


def expire_once() -> list[tuple[str, str]]:
    """One expiry run: restore sessions if Redis lost them, then remove one batch of expired members."""
    now = timezone.now()
    if not get_redis().exists(lease_store.keys().sessions_built):
        rebalance.reconcile_sessions(now, grace=True)
    return rebalance.expire_members(now, settings.REGISTRY_CLEANUP_BATCH)


@shared_task(name="groups.expire_members", ignore_result=True)
def expire_members() -> int:
    """Remove members whose session ran out and rebalance their groups; returns how many."""
    return len(expire_once())
