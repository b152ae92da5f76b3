"""HTTP views for topics and consumer groups: parse, call ``groups.rebalance``, shape the response."""

from __future__ import annotations

from django.utils import timezone
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import exceptions, mixins, serializers, status, viewsets
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from registry import lease_store
from registry.redis_client import get_redis
from registry.schema import UNAUTHORIZED, bad_request, error
from registry.serializers import identifier_field

from . import membership, topics
from .assignments import assignment_of, member_views, no_member
from .models import ServiceGroup, Topic
from .serializers import (
    ConflictSerializer,
    GroupSerializer,
    JoinSerializer,
    LeaveSerializer,
    MemberHeartbeatReplySerializer,
    MemberHeartbeatSerializer,
    PartitionAssignmentSerializer,
    TopicPutSerializer,
    TopicSerializer,
    group_body,
)

IDENTIFIER = "[A-Za-z0-9._:-]{1,128}"
_ERRORS = {
    400: bad_request(),
    401: UNAUTHORIZED,
    403: error("The token did not create this member (or group) and is not staff."),
    404: error("No such group or member (rejoin)."),
}
FENCED = OpenApiResponse(
    ConflictSerializer,
    description="code fenced_member_epoch: member_epoch is not the member's current incarnation (a later join "
    "fenced it). Nothing was changed; stop consuming and join again.",
)


class TopicInUseSerializer(serializers.Serializer):
    """409 body of a topic delete refused because groups read the topic."""

    detail = serializers.CharField()
    code = serializers.CharField(help_text='Always "topic_in_use".')
    groups = serializers.ListField(child=serializers.CharField(), help_text="The groups that read the topic.")


class TopicViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    queryset = Topic.objects.all()
    serializer_class = TopicSerializer
    lookup_value_regex = IDENTIFIER
    methods_without_lease_store = ("GET",)  # topics are read from the database only: no 503

    @extend_schema(summary="List topics")
    def list(self, request: Request, *args: object, **kwargs: object) -> Response:
        return super().list(request, *args, **kwargs)

    @extend_schema(summary="One topic", responses={200: TopicSerializer, 404: error("No such topic.")})
    def retrieve(self, request: Request, *args: object, **kwargs: object) -> Response:
        return super().retrieve(request, *args, **kwargs)

    @extend_schema(
        summary="Create or grow a topic",
        description="Any token may create a topic, and owns it. Growing it is for its owner, the tokens an "
        "operator granted it to, and staff; a PUT of the current count changes nothing and is open to all. "
        "Partitions: at most REGISTRY_MAX_PARTITIONS_PER_TOPIC (default 10000); shrinking is refused.",
        request=TopicPutSerializer,
        responses={
            201: TopicSerializer,
            200: TopicSerializer,
            400: bad_request("Bad input, a shrink, or more partitions than REGISTRY_MAX_PARTITIONS_PER_TOPIC."),
            401: _ERRORS[401],
            403: error("The topic belongs to another token (growing it is for its owner, granted tokens, staff)."),
        },
    )
    def update(self, request: Request, pk: str) -> Response:
        incoming = TopicPutSerializer(data=request.data)
        incoming.is_valid(raise_exception=True)
        try:
            topic, created = topics.put_topic(pk, incoming.validated_data["partitions"], timezone.now(), request.user)
        except topics.TopicShrink as exc:
            raise exceptions.ValidationError({"partitions": [str(exc)]}) from None
        return Response(TopicSerializer(topic).data, status=status.HTTP_201_CREATED if created else status.HTTP_200_OK)

    @extend_schema(
        summary="Delete a topic",
        description="For the topic's owner, the tokens an operator granted it to, and staff. A topic that a "
        "group reads is not deleted (409, code topic_in_use, naming the groups): its partitions would vanish "
        "under their owners.",
        responses={
            204: None,
            401: _ERRORS[401],
            403: error("The topic belongs to another token."),
            404: error("No such topic."),
            409: TopicInUseSerializer,
        },
    )
    def destroy(self, request: Request, pk: str) -> Response:
        try:
            deleted = topics.delete_topic(pk, request.user)
        except topics.TopicInUse as exc:
            body = {"detail": str(exc), "code": "topic_in_use", "groups": exc.readers}
            return Response(body, status=status.HTTP_409_CONFLICT)
        if not deleted:
            raise exceptions.NotFound(f"no topic {pk!r}")
        return Response(status=status.HTTP_204_NO_CONTENT)


def _sessions(groups: list[ServiceGroup]) -> dict[tuple[str, str], object]:
    keys = [(g.group_id, m.member_id) for g in groups for m in g.members.all()]
    return {k: lease_store.from_ms(ms) for k, ms in lease_store.session_deadlines(get_redis(), keys).items()}


class GroupViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    queryset = ServiceGroup.objects.prefetch_related("members")
    serializer_class = GroupSerializer
    lookup_value_regex = IDENTIFIER

    def _body(self, groups: list[ServiceGroup]) -> list[dict]:
        sessions = _sessions(groups)
        return [group_body(g, member_views(g), sessions) for g in groups]

    @extend_schema(summary="List consumer groups", responses={200: GroupSerializer(many=True), 401: _ERRORS[401]})
    def list(self, request: Request) -> Response:
        page = self.paginate_queryset(self.get_queryset())
        return self.get_paginated_response(self._body(list(page)))

    @extend_schema(
        summary="One consumer group",
        description="Open to every token, like the list: who reads what is not secret; joining is (403).",
        responses={200: GroupSerializer, 401: _ERRORS[401], 404: _ERRORS[404]},
    )
    def retrieve(self, request: Request, pk: str) -> Response:
        return Response(self._body([self.get_object()])[0])


class GroupMembersView(APIView):
    """POST /groups/{group_id}/members/: join."""

    @extend_schema(
        summary="Join a group",
        request=JoinSerializer,
        responses={
            201: PartitionAssignmentSerializer,
            200: PartitionAssignmentSerializer,
            400: bad_request(
                "Bad input, or a quota: more topics than REGISTRY_MAX_TOPICS_PER_JOIN (field topics), a group "
                "at REGISTRY_MAX_MEMBERS_PER_GROUP members (field member_id)."
            ),
            403: error(
                "The group belongs to another token (only its owner, tokens an operator granted it to, and "
                "staff may join it), or member_id was joined by another token."
            ),
            409: OpenApiResponse(
                ConflictSerializer,
                description="code member_id_in_use: member_id is live under another incarnation and the join is "
                "not static. Nothing was changed.",
            ),
        },
    )
    def post(self, request: Request, group_id: str) -> Response:
        _check_identifier("group_id", group_id)
        incoming = JoinSerializer(data=request.data)
        incoming.is_valid(raise_exception=True)
        data = incoming.validated_data
        assignment, created = membership.join(
            group_id,
            data["member_id"],
            data["service_name"],
            data["topics"],
            request.user,
            timezone.now(),
            session_timeout=data["session_timeout"],
            static=data["static"],
        )
        return Response(assignment.as_dict(), status=status.HTTP_201_CREATED if created else status.HTTP_200_OK)


class GroupMemberView(APIView):
    """GET and DELETE /groups/{group_id}/members/{member_id}/."""

    @extend_schema(
        summary="A member's current assignment",
        responses={200: PartitionAssignmentSerializer, 401: _ERRORS[401], 404: _ERRORS[404]},
    )
    def get(self, request: Request, group_id: str, member_id: str) -> Response:
        group = ServiceGroup.objects.filter(pk=group_id).first()
        member = group.members.filter(member_id=member_id).first() if group else None
        if member is None:
            raise membership.MemberNotFound(no_member(group_id, member_id))
        return Response(assignment_of(group, member).as_dict())

    @extend_schema(
        summary="Leave a group",
        description="The incarnation ?member_epoch=N leaves (required, except for staff tokens, which remove "
        "whichever incarnation is current: an operator's removal).",
        parameters=[
            OpenApiParameter(
                "member_epoch",
                int,
                OpenApiParameter.QUERY,
                description="The member_epoch the join answered. Required unless the token is staff.",
            )
        ],
        responses={
            204: None,
            400: bad_request("member_epoch is missing (not staff) or not an integer 1..2^63-1."),
            401: _ERRORS[401],
            403: _ERRORS[403],
            404: _ERRORS[404],
            409: FENCED,
        },
    )
    def delete(self, request: Request, group_id: str, member_id: str) -> Response:
        incoming = LeaveSerializer(data=request.query_params)
        incoming.is_valid(raise_exception=True)
        member_epoch = incoming.validated_data.get("member_epoch")
        if member_epoch is None and not request.user.is_staff:
            raise exceptions.ValidationError(
                {"member_epoch": ["This query parameter is required: the member_epoch your join answered."]}
            )
        membership.leave(group_id, member_id, request.user, timezone.now(), member_epoch=member_epoch)
        return Response(status=status.HTTP_204_NO_CONTENT)


class GroupMemberHeartbeatView(APIView):
    """POST /groups/{group_id}/members/{member_id}/heartbeat/."""

    @extend_schema(
        summary="Member heartbeat",
        description="Keeps the session of the incarnation member_epoch and confirms the generation it has "
        "finished revoking for (handing over what it was revoking). Answers with the current assignment and "
        "the session's new deadline (session_expires_at); 409 for another incarnation's member_epoch; 404 once "
        "the member is gone (join again).",
        request=MemberHeartbeatSerializer,
        responses={200: MemberHeartbeatReplySerializer, **_ERRORS, 409: FENCED},
    )
    def post(self, request: Request, group_id: str, member_id: str) -> Response:
        incoming = MemberHeartbeatSerializer(data=request.data)
        incoming.is_valid(raise_exception=True)
        data = incoming.validated_data
        assignment = membership.heartbeat(
            group_id, member_id, data["generation"], data["member_epoch"], request.user, timezone.now()
        )
        return Response(assignment.as_dict())


def _check_identifier(field: str, value: str) -> None:
    """The path's identifier, checked by the same field rule as in request bodies."""
    try:
        identifier_field().run_validation(value)
    except exceptions.ValidationError as exc:
        raise exceptions.ValidationError({field: exc.detail}) from None
