"""Websocket consumers: the common push stream, and /ws/services/?name=N, a watch of service.registered,
service.health and service.deregistered events.

On connect, every current service of that name (all services without ``name``) is sent as a
``service.registered`` event; every event carries the service's ``revision`` (``registry.revisions``).

Bad input never drops a socket without a word: a bad identifier in the path or query is an ``error``
message naming the field and close code 4400, an unknown path 4404, a message over
REGISTRY_MAX_WS_MESSAGE_BYTES 1009, and malformed JSON (too deeply nested included) an ``error`` message.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any
from urllib.parse import parse_qs

from channels.db import database_sync_to_async
from channels.exceptions import StopConsumer
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from channels.layers import get_channel_layer
from django.core.exceptions import ImproperlyConfigured

from registry_project import limits

from . import events
from .leases import attach_live_leases
from .models import Service
from .validators import is_identifier, shown
from .ws_auth import NOT_FOUND, UNAUTHENTICATED

log = logging.getLogger(__name__)

BAD_REQUEST = 4400
MESSAGE_TOO_BIG = 1009  # RFC 6455


def identifier_problem(field: str, value: str) -> dict[str, Any] | None:
    """The ``error`` message for a path or query value that is not an identifier, or None."""
    if is_identifier(value):
        return None
    detail = f"{field}: expected 1..128 of [A-Za-z0-9._:-], got {shown(value)}"
    return {"type": "error", "field": field, "detail": detail}


class PushConsumer(AsyncJsonWebsocketConsumer):
    """Common part: authenticate, subscribe to one stream, send the current state, then pushes in order.

    The consumer holds no channel of its own: it subscribes a callback to its stream through the layer's
    ``group_subscribe`` (registry_project.layer), which decodes each push once per process and hands it to
    every local socket. Pushes and the socket's own messages (connect, acks) are handled one at a time, in
    the order they arrived, as Channels' own dispatch loop would: a push that arrives while an ack is
    answered waits for the answer, so the answer decides whether the push is still news.
    """

    last_order: tuple[int, int] = (-1, -1)  # (generation, version) of the newest message sent
    missing = "not found"
    stream: str | None = None
    closed = False
    pushing: asyncio.Task[None] | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.scope = scope
        self.channel_layer = get_channel_layer(self.channel_layer_alias)
        self.base_send = send
        self.turn = asyncio.Lock()  # one handler at a time: the socket's messages and pushes, in order
        self.backlog: deque[dict[str, Any]] | None = None  # pushes waiting for the running push task
        try:
            while True:
                message = await receive()
                async with self.turn:
                    await self.dispatch(message)
        except StopConsumer:
            pass
        finally:
            self.closed = True
            await self.unsubscribe()

    async def connect(self) -> None:
        await self.accept()
        problem = self.input_problem()
        if problem is not None:
            await self.send_json(problem)
            await self.close(code=BAD_REQUEST)
            return
        if self.scope.get("token") is None:
            await self.close(code=UNAUTHENTICATED)
            return
        stream = self.stream_name()
        subscribe = getattr(self.channel_layer, "group_subscribe", None)
        if subscribe is None:
            raise ImproperlyConfigured("CHANNEL_LAYERS must use registry_project.layer.FanoutChannelLayer")
        self.stream = stream
        await subscribe(stream, self.deliver)
        # Subscribed first, then the state read: a change in between arrives as a push and is
        # ordered by its generation, so nothing is missed.
        state = await database_sync_to_async(self.current_state)()
        if state is None:
            await self.send_json({"type": "error", "detail": self.missing})
            await self.close(code=NOT_FOUND)
            return
        await self.forward(state)

    async def disconnect(self, code: int) -> None:
        await self.unsubscribe()

    async def unsubscribe(self) -> None:
        if self.stream is not None:
            stream, self.stream = self.stream, None
            await self.channel_layer.group_unsubscribe(stream, self.deliver)

    def deliver(self, event: dict[str, Any]) -> None:
        """Called by the layer for each push (shared with every other socket: read, never changed)."""
        if self.closed:
            return
        if self.backlog is not None:  # a push task is running: it takes this one next
            self.backlog.append(event)
            return
        self.backlog = deque()
        self.pushing = asyncio.get_running_loop().create_task(self.push_in_turn(event))  # held: not collected

    async def push_in_turn(self, event: dict[str, Any]) -> None:
        try:
            async with self.turn:
                await self.push(event)
                while self.backlog:
                    await self.push(self.backlog.popleft())
        except Exception:
            log.debug("push to a websocket failed", exc_info=True)
        finally:
            self.backlog = None

    async def push(self, event: dict[str, Any]) -> None:
        if not self.closed:
            await self.forward(event["payload"], event.get("text"))

    async def forward(self, payload: dict[str, Any], text: str | None = None) -> None:
        order = (payload.get("generation", 0), payload.get("version") or 0)
        if order < self.last_order:
            return  # out of order: the subscriber already has something newer
        self.last_order = order
        await self.send_payload(payload, text)

    async def send_payload(self, payload: dict[str, Any], text: str | None = None) -> None:
        """Send ``payload``; ``text`` is its JSON, encoded once for every socket by the publisher."""
        await self.send(text_data=text if text is not None else await self.encode_json(payload))

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None, **kwargs: Any) -> None:
        raw = text_data.encode("utf-8", "surrogatepass") if text_data is not None else bytes_data or b""
        limit = limits.max_ws_message_bytes()
        if len(raw) > limit:
            detail = f"message is larger than {limit} bytes (REGISTRY_MAX_WS_MESSAGE_BYTES)"
            await self.send_json({"type": "error", "detail": detail, "limit": limit})
            await self.close(code=MESSAGE_TOO_BIG)
            return
        try:
            content = limits.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            await self.send_json({"type": "error", "detail": f"malformed JSON: {exc}"})
            return
        if not isinstance(content, dict):
            await self.send_json({"type": "error", "detail": "expected a JSON object with a 'type'"})
            return
        await self.receive_json(content)

    async def receive_json(self, content: dict[str, Any], **kwargs: Any) -> None:
        await self.send_json({"type": "error", "detail": f"unknown message type {content.get('type')!r}"})

    def input_problem(self) -> dict[str, Any] | None:
        """An ``error`` message naming the first path segment that is not an identifier, or None."""
        for field, value in self.scope["url_route"]["kwargs"].items():
            problem = identifier_problem(field, value)
            if problem is not None:
                return problem
        return None

    def stream_name(self) -> str:
        raise NotImplementedError

    def current_state(self) -> dict[str, Any] | None:
        raise NotImplementedError


class ServicesConsumer(PushConsumer):
    """/ws/services/?name=N: the current services as ``service.registered`` (each with its revision), then
    every later event; per service, only what is newer than what this subscriber was sent."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.revisions: dict[str, int] = {}  # service id -> revision of the newest state sent

    def watched_name(self) -> str | None:
        names = parse_qs(self.scope.get("query_string", b"").decode("latin-1")).get("name")
        return names[0] if names else None

    def stream_name(self) -> str:
        return events.watch_groups(self.watched_name())[0]

    def input_problem(self) -> dict[str, Any] | None:
        name = self.watched_name()
        return None if name is None else identifier_problem("name", name)

    def current_state(self) -> dict[str, Any] | None:
        return {"type": "snapshot"}  # sent service by service in forward_snapshot

    async def forward(self, payload: dict[str, Any], text: str | None = None) -> None:
        if payload.get("type") == "snapshot":
            for service in await database_sync_to_async(self.snapshot)():
                await self.send_once({"type": "service.registered", **service})
            return
        await self.send_once(payload, text)

    async def send_once(self, payload: dict[str, Any], text: str | None = None) -> None:
        service_id, revision = payload.get("service_id", ""), payload.get("revision", 0)
        if revision <= self.revisions.get(service_id, -1):
            return  # this subscriber has that state of the service, or a newer one
        self.revisions[service_id] = revision
        await self.send_payload(payload, text)

    def snapshot(self) -> list[dict[str, Any]]:
        qs = Service.objects.all()
        name = self.watched_name()
        if name is not None:
            qs = qs.filter(service_name=name)
        return [events.service_payload(s) for s in attach_live_leases(qs[:10_000])]


class UnknownPathConsumer(AsyncJsonWebsocketConsumer):
    """Every websocket path that names no stream: an ``error`` message, then close code 4404."""

    async def connect(self) -> None:
        await self.accept()
        streams = "/ws/groups/{group_id}/, /ws/groups/{group_id}/members/{member_id}/, /ws/services/ or /ws/admin/"
        detail = f"no websocket stream at {shown(self.scope['path'])}: expected {streams}"
        await self.send_json({"type": "error", "detail": detail})
        await self.close(code=NOT_FOUND)
