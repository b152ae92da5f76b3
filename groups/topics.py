"""Topics: created, grown (never shrunk) and deleted only through here, so the groups that read a topic
rebalance onto its partitions and no partition vanishes under its owner. Creating is open to every
token (the creator owns the topic); growing and deleting are for its owner, granted tokens and staff."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from django.conf import settings
from django.db import connection, transaction

from registry.errors import Forbidden
from registry.models import ApiToken

from . import quotas
from .models import RebalanceReason, ServiceGroup, Topic
from .rebalance import add_partitions, lock_group, rebalance, yield_to_writers

MAX_PARTITIONS = 10_000  # the hard ceiling; REGISTRY_MAX_PARTITIONS_PER_TOPIC may set a lower quota


class TopicShrink(Exception):
    """Topics can grow, never shrink: consumers' offsets are per partition."""


class TopicInUse(Exception):
    """A topic some group reads cannot be deleted: its partitions would vanish under their owners."""

    def __init__(self, message: str, readers: list[str]) -> None:
        super().__init__(message)
        self.readers = readers


class TopicNotYours(Forbidden):
    """Only the topic's owner, tokens an operator granted, and staff may grow or delete it."""


def _not_yours(name: str, what: str) -> TopicNotYours:
    return TopicNotYours(
        f"topic {name!r} belongs to another token: only its owner, tokens an operator granted it to, "
        f"and staff tokens may {what} it"
    )


def put_topic(name: str, partitions: int, now: datetime, actor: ApiToken | None = None) -> tuple[Topic, bool]:
    """Create a topic (owned by ``actor``) or grow it; shrinking raises TopicShrink. Groups reading it
    rebalance. ``actor`` None is an operator (already authorised); else growing needs ``Topic.allows``."""
    quotas.check_partitions(partitions)
    with transaction.atomic():
        topic, created = Topic.objects.select_for_update().get_or_create(
            name=name, defaults={"partitions": partitions, "owner": actor}
        )
        if not created and actor is not None and topic.partitions != partitions and not topic.allows(actor):
            raise _not_yours(name, "grow")
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


def delete_topic(name: str, actor: ApiToken | None = None) -> bool:
    """Delete a topic no group reads (TopicInUse otherwise: the admin and the API refuse it); False if
    there is no such topic. ``actor`` None is an operator; else it needs ``Topic.allows``."""
    with transaction.atomic():
        topic = Topic.objects.select_for_update().filter(pk=name).first()
        if topic is None:
            return False
        if actor is not None and not topic.allows(actor):
            raise _not_yours(name, "delete")
        readers = groups_reading(name)
        if readers:
            raise TopicInUse(
                f"topic {name!r} is read by group(s) {', '.join(readers)}; they must stop reading it first",
                readers,
            )
        topic.delete()
    return True


def groups_reading(topic: str) -> list[str]:
    return [g for g, topics in ServiceGroup.objects.values_list("group_id", "topics") if topic in topics]


def ensure_topics(names: Iterable[str], owner: ApiToken | None = None) -> None:
    """Create the topics that do not exist yet, with the default partition count, owned by ``owner``, and
    share-lock them until the caller's transaction ends.

    The lock is what makes ``delete_topic`` safe beside a join: a delete that checked "no group reads
    it" cannot remove a topic a join is subscribing a group to, and a join never subscribes to a topic
    deleted under it (it creates the topic again). Shared, so joins do not wait for one another.
    """
    names = sorted(set(names))
    default = settings.REGISTRY_DEFAULT_PARTITIONS
    for _attempt in range(3):
        Topic.objects.bulk_create(
            [Topic(name=n, partitions=default, owner=owner) for n in names], ignore_conflicts=True
        )
        if _share_lock(names) == len(names):
            return
        # a concurrent delete_topic committed between the insert and the lock: create it again
    raise RuntimeError(f"topics {names} kept disappearing while a join subscribed to them")


def _share_lock(names: list[str]) -> int:
    """FOR SHARE on the named topic rows (PostgreSQL; SQLite runs one writing transaction at a time, so
    the insert above already excludes a delete); returns how many rows exist."""
    if connection.vendor != "postgresql":
        return Topic.objects.filter(name__in=names).count()
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT name FROM {connection.ops.quote_name(Topic._meta.db_table)} "
            "WHERE name = ANY(%s) ORDER BY name FOR SHARE",
            [names],
        )
        return len(cursor.fetchall())
