"""Websocket streams of consumer groups: the whole group's assignment, and one member's (with acks)."""

from __future__ import annotations

from typing import Any

from channels.db import database_sync_to_async
from django.utils import timezone

from registry.consumers import PushConsumer
from registry.ws_auth import FORBIDDEN, NOT_FOUND

from . import events, membership
from .assignments import assignment_of
from .models import ServiceGroup
from .serializers import MAX_GENERATION


class GroupConsumer(PushConsumer):
    """/ws/groups/{group_id}/: `group.assignment`, on connect and after every change."""

    missing = "no such group"

    def stream_name(self) -> str:
        return events.group_stream(self.scope["url_route"]["kwargs"]["group_id"])

    def current_state(self) -> dict[str, Any] | None:
        group = (
            ServiceGroup.objects.prefetch_related("members")
            .filter(pk=self.scope["url_route"]["kwargs"]["group_id"])
            .first()
        )
        return events.group_message(group) if group else None


class MemberConsumer(PushConsumer):
    """/ws/groups/{group_id}/members/{member_id}/: `member.assignment`; `{"type": "ack", "generation": N}`
    confirms a generation exactly like a member heartbeat."""

    missing = "no such member in this group; join first"

    def stream_name(self) -> str:
        kwargs = self.scope["url_route"]["kwargs"]
        return events.member_stream(kwargs["group_id"], kwargs["member_id"])

    def current_state(self) -> dict[str, Any] | None:
        kwargs = self.scope["url_route"]["kwargs"]
        group = ServiceGroup.objects.filter(pk=kwargs["group_id"]).first()
        member = group.members.filter(member_id=kwargs["member_id"]).first() if group else None
        return events.member_message(assignment_of(group, member)) if member else None

    async def receive_json(self, content: dict[str, Any], **kwargs: Any) -> None:
        if content.get("type") != "ack":
            await super().receive_json(content)
            return
        generation = content.get("generation")
        if not isinstance(generation, int) or isinstance(generation, bool) or not 0 <= generation <= MAX_GENERATION:
            detail = f"ack needs an integer generation 0..{MAX_GENERATION}"
            await self.send_json({"type": "error", "field": "generation", "detail": detail})
            return
        kw = self.scope["url_route"]["kwargs"]
        try:
            assignment = await database_sync_to_async(membership.heartbeat)(
                kw["group_id"], kw["member_id"], generation, self.scope["token"], timezone.now()
            )
        except membership.MemberNotFound as exc:
            await self.send_json({"type": "error", "detail": str(exc)})
            await self.close(code=NOT_FOUND)
            return
        except membership.NotOwner as exc:
            await self.send_json({"type": "error", "detail": str(exc)})
            await self.close(code=FORBIDDEN)
            return
        await self.forward(events.member_message(assignment))
