"""Websocket streams of consumer groups: the whole group's assignment, and one member's (with acks)."""

from __future__ import annotations

import json
from typing import Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.utils import timezone

from registry.ws_auth import FORBIDDEN, NOT_FOUND, UNAUTHENTICATED

from . import events, rebalance
from .models import ServiceGroup


class PushConsumer(AsyncJsonWebsocketConsumer):
    """Common part: authenticate, subscribe to one stream, send the current state, then pushes in order."""

    last_generation = -1

    async def connect(self) -> None:
        await self.accept()
        if self.scope.get("token") is None:
            await self.close(code=UNAUTHENTICATED)
            return
        self.stream = self.stream_name()
        await self.channel_layer.group_add(self.stream, self.channel_name)
        # Subscribed first, then the state read: a change in between arrives as a push and is
        # ordered by its generation, so nothing is missed.
        state = await database_sync_to_async(self.current_state)()
        if state is None:
            await self.send_json({"type": "error", "detail": self.missing})
            await self.close(code=NOT_FOUND)
            return
        await self.forward(state)

    async def disconnect(self, code: int) -> None:
        if hasattr(self, "stream"):
            await self.channel_layer.group_discard(self.stream, self.channel_name)

    async def push(self, event: dict[str, Any]) -> None:
        await self.forward(event["payload"])

    async def forward(self, payload: dict[str, Any]) -> None:
        generation = payload.get("generation", 0)
        if generation < self.last_generation:
            return  # out of order: the subscriber already has something newer
        self.last_generation = generation
        await self.send_json(payload)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None, **kwargs: Any) -> None:
        try:
            content = json.loads(text_data or (bytes_data or b"").decode())
        except (ValueError, UnicodeDecodeError) as exc:
            await self.send_json({"type": "error", "detail": f"malformed JSON: {exc}"})
            return
        if not isinstance(content, dict):
            await self.send_json({"type": "error", "detail": "expected a JSON object with a 'type'"})
            return
        await self.receive_json(content)

    async def receive_json(self, content: dict[str, Any], **kwargs: Any) -> None:
        await self.send_json({"type": "error", "detail": f"unknown message type {content.get('type')!r}"})

    def stream_name(self) -> str:
        raise NotImplementedError

    def current_state(self) -> dict[str, Any] | None:
        raise NotImplementedError


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
        return events.member_message(rebalance.assignment_of(group, member)) if member else None

    async def receive_json(self, content: dict[str, Any], **kwargs: Any) -> None:
        if content.get("type") != "ack":
            await super().receive_json(content)
            return
        generation = content.get("generation")
        if not isinstance(generation, int) or isinstance(generation, bool) or generation < 0:
            await self.send_json({"type": "error", "detail": "ack needs an integer generation >= 0"})
            return
        kw = self.scope["url_route"]["kwargs"]
        try:
            assignment = await database_sync_to_async(rebalance.heartbeat)(
                kw["group_id"], kw["member_id"], generation, self.scope["token"], timezone.now()
            )
        except rebalance.MemberNotFound:
            await self.send_json({"type": "error", "detail": self.missing})
            await self.close(code=NOT_FOUND)
            return
        except rebalance.NotOwner:
            await self.send_json({"type": "error", "detail": "this member was joined by another token"})
            await self.close(code=FORBIDDEN)
            return
        await self.forward(events.member_message(assignment))
