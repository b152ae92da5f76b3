"""Reactions of the groups app to registry events: a service that goes away leaves its groups."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django.dispatch import receiver

from registry.signals import services_removed

from . import rebalance
from .models import RebalanceReason


@receiver(services_removed)
def remove_memberships(sender: Any, service_ids: list[str], reason: str, now: datetime, **kwargs: Any) -> None:
    why = RebalanceReason.EXPIRY if reason == "expired" else RebalanceReason.LEAVE
    rebalance.remove_members(service_ids, why, now)
