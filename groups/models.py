"""Consumer-group records: topics, groups, members, per-partition ownership and rebalance history.

One ``Partition`` row per partition of a group's subscribed topics holds its single current
``owner`` and the ``target`` the assignor chose, so a partition can never be owned by two
members: while ``owner`` and ``target`` differ the partition is being revoked from its owner
(revoke before assign). A member's session deadline lives in Redis, like a service lease.

Groups and topics belong to tokens: a group to the token whose join created it, a topic to the token
that created it (by PUT or by a join naming it); an operator may grant other tokens the same rights
in the admin, and staff tokens have them everywhere. A group or topic without an owner (from before
ownership was recorded, or whose owner token was deleted) is open to staff and granted tokens only.
"""

from __future__ import annotations

from django.db import models

from registry.models import ApiToken


class GroupState(models.TextChoices):
    EMPTY = "empty", "empty"
    RECONCILING = "reconciling", "reconciling"
    STABLE = "stable", "stable"


class RebalanceReason(models.TextChoices):
    JOIN = "join", "join"
    LEAVE = "leave", "leave"
    EXPIRY = "expiry", "expiry"
    TOPIC_CHANGE = "topic_change", "topic change"
    MANUAL = "manual", "manual"
    REMOVED = "removed", "removed by operator"


class Owned(models.Model):
    """An owner token and the tokens an operator granted the same rights; staff tokens have them too."""

    owner = models.ForeignKey(
        ApiToken,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
        help_text="The token that created it. Empty: only staff and granted tokens may change it.",
    )
    grants = models.ManyToManyField(
        ApiToken, blank=True, related_name="+", help_text="Tokens an operator allowed to act as its owner."
    )

    class Meta:
        abstract = True

    def allows(self, token: ApiToken) -> bool:
        """May ``token`` act as the owner (join the group; grow or delete the topic)?"""
        if token.is_staff or (self.owner_id is not None and self.owner_id == token.pk):
            return True
        return self.pk is not None and self.grants.filter(pk=token.pk).exists()


class Topic(Owned):
    name = models.CharField(max_length=128, primary_key=True)
    partitions = models.PositiveIntegerField(help_text="1..10000; topics can grow, never shrink.")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class ServiceGroup(Owned):
    group_id = models.CharField(max_length=128, primary_key=True)
    generation = models.PositiveBigIntegerField(default=0)
    version = models.PositiveBigIntegerField(
        default=0, help_text="Bumped on every change of ownership, within a generation too (hand-overs)."
    )
    state = models.CharField(max_length=16, choices=GroupState.choices, default=GroupState.EMPTY)
    topics = models.JSONField(default=list, blank=True, help_text="Topics some member subscribes to.")
    member_epochs = models.PositiveBigIntegerField(
        default=0, help_text="The last member epoch handed out in this group: each join takes the next one."
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["group_id"]
        verbose_name = "consumer group"

    def __str__(self) -> str:
        return self.group_id


class RetiredGroup(models.Model):
    """The last member epoch of a deleted group. A group created again under the same id continues from
    it, so no incarnation of the old group (a zombie still heartbeating) can carry an epoch of the new."""

    group_id = models.CharField(max_length=128, primary_key=True)
    member_epochs = models.PositiveBigIntegerField()
    retired_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return self.group_id


class GroupMember(models.Model):
    group = models.ForeignKey(ServiceGroup, on_delete=models.CASCADE, related_name="members")
    member_id = models.CharField(max_length=128)
    service_name = models.CharField(max_length=128)
    topics = models.JSONField(default=list)
    session_timeout = models.PositiveIntegerField(default=30, help_text="Seconds a member heartbeat keeps it.")
    joined_at = models.DateTimeField()
    acked_generation = models.PositiveBigIntegerField(default=0, help_text="Latest generation the member confirmed.")
    member_epoch = models.PositiveBigIntegerField(
        default=0, help_text="The current incarnation (Kafka's KIP-848 member epoch): every join takes a new one."
    )
    static = models.BooleanField(
        default=False, help_text="Joined as a static member: a join with its id fences the live incarnation."
    )
    owner = models.ForeignKey(ApiToken, null=True, blank=True, on_delete=models.SET_NULL, related_name="memberships")

    class Meta:
        ordering = ["group_id", "member_id"]
        constraints = [models.UniqueConstraint(fields=["group", "member_id"], name="unique_member_per_group")]
        indexes = [models.Index(fields=["member_id"], name="member_id_idx")]

    def __str__(self) -> str:
        return f"{self.group_id}/{self.member_id}"


class Partition(models.Model):
    group = models.ForeignKey(ServiceGroup, on_delete=models.CASCADE, related_name="partitions")
    topic = models.CharField(max_length=128)
    number = models.PositiveIntegerField()
    owner = models.ForeignKey(GroupMember, null=True, on_delete=models.SET_NULL, related_name="owned")
    target = models.ForeignKey(GroupMember, null=True, on_delete=models.SET_NULL, related_name="targeted")
    target_generation = models.PositiveBigIntegerField(
        default=0, help_text="Generation that chose the target; the owner releases on confirming it."
    )
    held_until = models.DateTimeField(
        null=True,
        blank=True,
        help_text="A fenced incarnation may consume it until then: owned by nobody, handed to its target after.",
    )

    class Meta:
        ordering = ["group_id", "topic", "number"]
        constraints = [
            models.UniqueConstraint(fields=["group", "topic", "number"], name="unique_partition_per_group"),
        ]
        indexes = [models.Index(fields=["held_until"], name="partition_held_until_idx")]


class RebalanceEvent(models.Model):
    group = models.ForeignKey(ServiceGroup, on_delete=models.CASCADE, related_name="history")
    generation = models.PositiveBigIntegerField()
    reason = models.CharField(max_length=16, choices=RebalanceReason.choices)
    detail = models.CharField(
        max_length=255, blank=True, default="", help_text="Who or what caused it, e.g. 'removed by operator alice'."
    )
    members_before = models.JSONField(default=list)
    members_after = models.JSONField(default=list)
    partitions_moved = models.PositiveIntegerField(default=0)
    duration_ms = models.FloatField(default=0)
    created_at = models.DateTimeField()

    class Meta:
        ordering = ["group_id", "-generation"]
        constraints = [
            # a generation is never repeated; the group row lock makes them sequential
            models.UniqueConstraint(fields=["group", "generation"], name="unique_generation_per_group"),
        ]

    def __str__(self) -> str:
        return f"{self.group_id} generation {self.generation} ({self.get_reason_display()})"
