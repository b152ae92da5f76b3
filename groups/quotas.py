"""Quotas of the groups app: partitions per topic, topics per join, members per group. Each is a setting
(``REGISTRY_MAX_*``, read when checked); a request past one is refused with a 400 naming the field and
the setting, before anything is written (or inside the transaction it rolls back)."""

from __future__ import annotations

from collections.abc import Sequence

from django.conf import settings

from registry.errors import InvalidInput

from .models import ServiceGroup


class QuotaExceeded(InvalidInput):
    """A request past one of the quotas; ``field`` names what to make smaller."""


def max_partitions() -> int:
    return settings.REGISTRY_MAX_PARTITIONS_PER_TOPIC


def check_partitions(partitions: int, field: str = "partitions") -> None:
    limit = max_partitions()
    if partitions > limit:
        raise QuotaExceeded(
            field, f"at most {limit} partitions per topic (REGISTRY_MAX_PARTITIONS_PER_TOPIC), got {partitions}"
        )


def check_topics_per_join(topics: Sequence[str]) -> None:
    limit = settings.REGISTRY_MAX_TOPICS_PER_JOIN
    if len(topics) > limit:
        raise QuotaExceeded(
            "topics", f"at most {limit} topics per join (REGISTRY_MAX_TOPICS_PER_JOIN), got {len(topics)}"
        )


def check_room_for_member(group: ServiceGroup) -> None:
    """Before adding a member to ``group`` (whose row lock the caller holds, so the count holds too)."""
    limit = settings.REGISTRY_MAX_MEMBERS_PER_GROUP
    if group.members.count() >= limit:
        raise QuotaExceeded(
            "member_id",
            f"group {group.group_id!r} has {limit} members, the most REGISTRY_MAX_MEMBERS_PER_GROUP allows; "
            "a member must leave first",
        )
