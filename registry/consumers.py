"""/ws/services/?name=N: a watch of service.registered, service.health and service.deregistered events.

On connect, every current service of that name (all services without ``name``) is sent as a
``service.registered`` event; every event carries the registry ``revision``.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs

from channels.db import database_sync_to_async

from groups.consumers import PushConsumer

from . import events
from .leases import attach_live_leases
from .models import Service
from .validators import IDENTIFIER_RE


class ServicesConsumer(PushConsumer):
    missing = "unreachable"

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
            self.last_generation = revision
            return
        revision = payload.get("revision", 0)
        if revision <= self.last_generation:
            return  # already reflected in what this subscriber has
        self.last_generation = revision
        await self.send_json(payload)

    def snapshot(self) -> tuple[int, list[dict[str, Any]]]:
        revision = events.current_revision()
        qs = Service.objects.all()
        name = self.watched_name()
        if name is not None:
            qs = qs.filter(service_name=name)
        return revision, [events.service_payload(s) for s in attach_live_leases(qs[:10_000])]
