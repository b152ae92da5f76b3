"""``/ws/admin/``: the staff stream the live admin pages (``conveyor/live.js``) listen to.

It forwards to a logged-in staff user (session auth, not API tokens) every event already published for
``/ws/services/`` and ``/ws/groups/{g}/``, and adds one of its own: ``service.lapsed`` when a lease
deadline passes. Lapses are derived on read and no job announces them at the instant they happen, so
the stream looks at the lease store's deadlines four times a second and names the services whose lease
lapsed since its last look. Messages carry what happened; pages re-fetch themselves to show it.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from asgiref.sync import sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.utils import timezone

from groups.events import all_groups_stream

from . import events, lease_store
from .redis_client import get_redis
from .ws_auth import FORBIDDEN, UNAUTHENTICATED

LAPSE_POLL_SECONDS = 0.25  # a lapse shows on open pages well within a second


def lapsed_between(after_ms: int, until_ms: int) -> list[str]:
    """Ids of the services whose lease deadline lies in (``after_ms``, ``until_ms``]."""
    raw = get_redis().zrangebyscore(lease_store.keys().deadline, f"({after_ms}", until_ms)
    return [item.decode() for item in raw]


class AdminStreamConsumer(AsyncJsonWebsocketConsumer):
    """Staff only: 4401 without a session, 4403 for a user who is not staff."""

    streams: tuple[str, ...] = ()
    watcher: asyncio.Task[None] | None = None

    async def connect(self) -> None:
        await self.accept()
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=UNAUTHENTICATED)
            return
        if not (user.is_active and user.is_staff):
            await self.close(code=FORBIDDEN)
            return
        self.streams = (events.watch_groups(None)[0], all_groups_stream())
        for stream in self.streams:
            await self.channel_layer.group_add(stream, self.channel_name)
        await self.send_json({"type": "hello"})
        self.watcher = asyncio.create_task(self.watch_lapses())

    async def disconnect(self, code: int) -> None:
        if self.watcher is not None:
            self.watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.watcher
        for stream in self.streams:
            await self.channel_layer.group_discard(stream, self.channel_name)

    async def push(self, event: dict[str, Any]) -> None:
        await self.send_json(event["payload"])

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        pass  # a listen-only stream: anything sent is ignored

    async def watch_lapses(self) -> None:
        last = lease_store.to_ms(timezone.now())
        while True:
            await asyncio.sleep(LAPSE_POLL_SECONDS)
            now = lease_store.to_ms(timezone.now())
            try:
                lapsed = await sync_to_async(lapsed_between, thread_sensitive=False)(last, now)
            except Exception:  # noqa: BLE001 - Redis away: the next look covers the gap
                continue
            last = now
            if lapsed:
                await self.send_json({"type": "service.lapsed", "service_ids": lapsed[:100], "count": len(lapsed)})
