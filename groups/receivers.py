"""Reactions of the groups app to registry events: a service that goes away leaves the groups its own
token joined it to (a member of the same id joined by another token stays); after a Redis outage,
member sessions that Redis lost are restored; a deleted group leaves its last member epoch behind."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django.db.models.signals import pre_delete
from django.dispatch import receiver

from registry.leases import Guard
from registry.signals import lease_store_recovered, services_removed

from . import expiry, membership
from .models import RebalanceReason, RetiredGroup, ServiceGroup


@receiver(services_removed)
def remove_memberships(
    sender: Any, service_ids: list[str], owners: dict[str, int | None], reason: str, now: datetime, **kwargs: Any
) -> None:
    why = RebalanceReason.EXPIRY if reason == "expired" else RebalanceReason.LEAVE
    membership.remove_members(owners, why, now)


@receiver(lease_store_recovered)
def restore_sessions(sender: Any, now: datetime, guard: Guard, **kwargs: Any) -> None:
    expiry.reconcile_sessions(now, grace=True, guard=guard)  # the leader's fence, as for the leases


@receiver(pre_delete, sender=ServiceGroup)
def retire_epochs(sender: Any, instance: ServiceGroup, **kwargs: Any) -> None:
    """Keep the deleted group's epoch counter: ``rebalance.lock_group`` starts a re-created group from it."""
    RetiredGroup.objects.update_or_create(
        group_id=instance.group_id, defaults={"member_epochs": instance.member_epochs}
    )
