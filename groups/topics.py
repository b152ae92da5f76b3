"""Topics: created, grown (never shrunk) and deleted only through here, so the groups that read a topic
rebalance onto its partitions and no partition vanishes under its owner."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from django.conf import settings
from django.db import transaction

from .models import RebalanceReason, ServiceGroup, Topic
from .rebalance import add_partitions, lock_group, rebalance, yield_to_writers

MAX_PARTITIONS = 10_000


class TopicShrink(Exception):
    """Topics can grow, never shrink: consumers' offsets are per partition."""


class TopicInUse(Exception):
    """A topic some group reads cannot be deleted: its partitions would vanish under their owners."""


def put_topic(name: str, partitions: int, now: datetime) -> tuple[Topic, bool]:
    """Create a topic or grow it; shrinking raises TopicShrink. Groups reading it rebalance."""
    with transaction.atomic():
        topic, created = Topic.objects.select_for_update().get_or_create(name=name, defaults={"partitions": partitions})
        if not created:
            if topic.partitions == partitions:
                return topic, created
            if partitions < topic.partitions:
                raise TopicShrink(f"{name} has {topic.partitions} partitions; topics can grow but never shrink")
            topic.partitions = partitions
            topic.save(update_fields=["partitions", "updated_at"])
    # A created topic may already be subscribed to (its groups waited for it): they rebalance too.
    # The new rows are written first, in short batches without the group lock, so that the
    # rebalance under the lock only reads them and assigns them in a few bulk updates.
    for group_id in groups_reading(name):
        add_partitions(group_id, name, partitions)
        with transaction.atomic():
            group = lock_group(group_id)
            if group is not None:
                rebalance(group, RebalanceReason.TOPIC_CHANGE, now)
        yield_to_writers()
    return topic, created


def delete_topic(name: str) -> None:
    """Delete a topic no group reads; TopicInUse otherwise (the admin and the API refuse it)."""
    with transaction.atomic():
        topic = Topic.objects.select_for_update().filter(pk=name).first()
        if topic is None:
            return
        readers = groups_reading(name)
        if readers:
            raise TopicInUse(
                f"topic {name!r} is read by group(s) {', '.join(readers)}; they must stop reading it first"
            )
        topic.delete()


def groups_reading(topic: str) -> list[str]:
    return [g for g, topics in ServiceGroup.objects.values_list("group_id", "topics") if topic in topics]


def ensure_topics(names: Iterable[str]) -> None:
    default = settings.REGISTRY_DEFAULT_PARTITIONS
    Topic.objects.bulk_create([Topic(name=n, partitions=default) for n in names], ignore_conflicts=True)
