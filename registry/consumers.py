"""Websocket consumers: the common push stream, and /ws/services/?name=N, a watch of service.registered,
service.health and service.deregistered events.

On connect, every current service of that name (all services without ``name``) is sent as a
``service.registered`` event; every event carries the registry ``revision``.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qs

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer

from . import events
from .leases import attach_live_leases
from .models import Service
from .validators import IDENTIFIER_RE
from .ws_auth import NOT_FOUND, UNAUTHENTICATED


class PushConsumer(AsyncJsonWebsocketConsumer):
    """Common part: authenticate, subscribe to one stream, send the current state, then pushes in order."""

    last_order: tuple[int, int] = (-1, -1)  # (generation, version) of the newest message sent
    missing = "not found"

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
        order = (payload.get("generation", 0), payload.get("version") or 0)
        if order < self.last_order:
            return  # out of order: the subscriber already has something newer
        self.last_order = order
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


class ServicesConsumer(PushConsumer):
    last_revision = -1  # registry revision of the newest event this subscriber has

    def watched_name(self) -> str | None:
        names = parse_qs(self.scope.get("query_string", b"").decode("latin-1")).get("name")
        return names[0] if names else None

    def stream_name(self) -> str:
        return events.watch_groups(self.watched_name())[0]

    async def connect(self) -> None:
        name = self.watched_name()
        if name is not None and not IDENTIFIER_RE.match(name):
            await self.accept()
            await self.send_json({"type": "error", "detail": f"name: expected 1..128 of [A-Za-z0-9._:-], got {name!r}"})
            await self.close(code=4400)
            return
        await super().connect()

    def current_state(self) -> dict[str, Any] | None:
        return {"type": "snapshot"}  # sent service by service in forward_snapshot

    async def forward(self, payload: dict[str, Any]) -> None:
        if payload.get("type") == "snapshot":
            revision, services = await database_sync_to_async(self.snapshot)()
            for service in services:
                await self.send_json({"type": "service.registered", "revision": revision, **service})
            self.last_revision = revision
            return
        revision = payload.get("revision", 0)
        if revision <= self.last_revision:
            return  # already reflected in what this subscriber has
        self.last_revision = revision
        await self.send_json(payload)

    def snapshot(self) -> tuple[int, list[dict[str, Any]]]:
        revision = events.current_revision()
        qs = Service.objects.all()
        name = self.watched_name()
        if name is not None:
            qs = qs.filter(service_name=name)
        return revision, [events.service_payload(s) for s in attach_live_leases(qs[:10_000])]
