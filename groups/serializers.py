"""Request validation and response shapes for topics and consumer groups."""

from __future__ import annotations

from typing import Any

from rest_framework import serializers

from registry.serializers import identifier_field

from .models import Topic
from .topics import MAX_PARTITIONS

MAX_GENERATION = 2**63 - 1  # the generation column is a 64-bit integer


class TopicSerializer(serializers.ModelSerializer):
    class Meta:
        model = Topic
        fields = ["name", "partitions", "created_at", "updated_at"]
        read_only_fields = fields


class TopicPutSerializer(serializers.Serializer):
    partitions = serializers.IntegerField(min_value=1, max_value=MAX_PARTITIONS)


class JoinSerializer(serializers.Serializer):
    member_id = identifier_field()
    service_name = identifier_field()
    topics = serializers.ListField(child=identifier_field(), min_length=1, max_length=100)
    session_timeout = serializers.IntegerField(min_value=1, max_value=3600, required=False, default=30)
    static = serializers.BooleanField(
        required=False,
        default=False,
        help_text="A static member id (Kafka's group.instance.id): this join fences the id's live incarnation "
        "instead of being refused with 409 member_id_in_use; its partitions follow once the old session ends.",
    )


def member_epoch_field(**kwargs: Any) -> serializers.IntegerField:
    return serializers.IntegerField(
        min_value=1,
        max_value=MAX_GENERATION,
        help_text="The member_epoch the join answered: the incarnation this request is from.",
        **kwargs,
    )


class MemberHeartbeatSerializer(serializers.Serializer):
    generation = serializers.IntegerField(min_value=0, max_value=MAX_GENERATION)
    member_epoch = member_epoch_field()


class LeaveSerializer(serializers.Serializer):
    """The query of DELETE /groups/{g}/members/{m}/: ``member_epoch`` (required unless staff)."""

    member_epoch = member_epoch_field(required=False)


class ConflictSerializer(serializers.Serializer):
    """A 409: ``code`` says which conflict, for machines."""

    code = serializers.ChoiceField(
        choices=["fenced_member_epoch", "member_id_in_use"],
        help_text="fenced_member_epoch: the request's member_epoch is not the member's current incarnation (stop "
        "consuming, join again); member_id_in_use: a dynamic join named a member id that is live.",
    )
    detail = serializers.CharField()
    member_epoch = serializers.IntegerField(
        required=False, help_text="fenced_member_epoch: the current incarnation's epoch (for diagnosis only)."
    )
    session_expires_at = serializers.DateTimeField(
        required=False, help_text="member_id_in_use: when the live incarnation's session ends unless renewed."
    )


class PartitionMapField(serializers.DictField):
    child = serializers.ListField(child=serializers.IntegerField())


class PartitionAssignmentSerializer(serializers.Serializer):
    group_id = serializers.CharField()
    member_id = serializers.CharField()
    generation = serializers.IntegerField()
    assigned_partitions = PartitionMapField(help_text="What the member owns now: {topic: [partition, ...]}.")
    revoking = PartitionMapField(
        help_text="Owned partitions it must give up: confirm the generation to hand them over."
    )
    pending = PartitionMapField(help_text="Partitions it will own once their current owner gives them up.")
    version = serializers.IntegerField(
        help_text="The group's version: bumped on every change of ownership (hand-overs within a generation "
        "too). Order views by (generation, version); drop any at or below the newest you have."
    )
    member_epoch = serializers.IntegerField(
        help_text="The member's current incarnation: every heartbeat, ack, socket and leave must carry it."
    )


class MemberHeartbeatReplySerializer(PartitionAssignmentSerializer):
    """The answer to a member heartbeat (and, over the member websocket, to an ack)."""

    session_expires_at = serializers.DateTimeField(
        help_text="The session's deadline after this heartbeat: its arrival plus session_timeout (ISO 8601 UTC). "
        "Stop consuming if no later heartbeat is confirmed by then; measure from your own send time, "
        "not from this instant, if your clock may differ from the server's."
    )


class MemberSerializer(PartitionAssignmentSerializer):
    version = None  # the group's, given once at the group's level
    service_name = serializers.CharField()
    topics = serializers.ListField(child=serializers.CharField())
    joined_at = serializers.DateTimeField()
    session_timeout = serializers.IntegerField()
    session_expires_at = serializers.DateTimeField(allow_null=True)
    acked_generation = serializers.IntegerField()
    static = serializers.BooleanField()


class GroupSerializer(serializers.Serializer):
    group_id = serializers.CharField()
    generation = serializers.IntegerField()
    version = serializers.IntegerField(help_text="Bumped on every change of ownership; orders views of one generation.")
    state = serializers.CharField()
    topics = serializers.ListField(child=serializers.CharField())
    members = MemberSerializer(many=True)


def group_body(group: Any, views: dict[str, Any], sessions: dict[tuple[str, str], Any]) -> dict[str, Any]:
    members = []
    for member in group.members.all():
        view = views[member.member_id].as_dict()
        members.append(
            {
                **view,
                "service_name": member.service_name,
                "topics": member.topics,
                "joined_at": member.joined_at,
                "session_timeout": member.session_timeout,
                "session_expires_at": sessions.get((group.group_id, member.member_id)),
                "acked_generation": member.acked_generation,
                "static": member.static,
            }
        )
    return GroupSerializer(
        {
            "group_id": group.group_id,
            "generation": group.generation,
            "version": group.version,
            "state": group.state,
            "topics": group.topics,
            "members": members,
        }
    ).data
