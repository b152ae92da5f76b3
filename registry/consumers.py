"""Websocket consumers: the common push stream, and /ws/services/?name=N, a watch of service.registered,
service.health and service.deregistered events.

On connect, every current service of that name (all services without ``name``) is sent as a
``service.registered`` event; every event carries the service's ``revision`` (``registry.revisions``).

Pushes take the fast path when they can: the layer calls ``deliver`` for each local socket in one loop, and
a socket with nothing of its own in flight is written the push's frame (encoded once per process) straight
to its transport, with no task and no ASGI send per socket (``DirectSend``). Everything else (a socket
answering one of its own messages, a socket whose transport is paused by backpressure, a push that closes
the socket or reads the database) goes through one task per socket that sends through the ASGI server, in
arrival order. A socket that falls more than PUSH_BACKLOG_LIMIT pushes behind is closed with 1013 (its
pushes dropped; under uvicorn its connection is aborted, as its buffer may never drain): it holds no
unbounded memory, delays no other socket, and gets the current state again when it reconnects.

Bad input never drops a socket without a word: a bad identifier in the path or query is an ``error``
message naming the field and close code 4400, an unknown path 4404, a message over
REGISTRY_MAX_WS_MESSAGE_BYTES 1009, and malformed JSON (too deeply nested included) an ``error`` message.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any, ClassVar
from urllib.parse import parse_qs

from channels.db import database_sync_to_async
from channels.exceptions import StopConsumer
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from channels.layers import get_channel_layer
from django.core.exceptions import ImproperlyConfigured
from websockets.frames import Frame, Opcode
from websockets.protocol import OPEN

try:
    from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
except ImportError:  # pragma: no cover - another ASGI server: every push goes through its send
    WebSocketsSansIOProtocol = None

from registry_project import limits

from . import events
from .leases import attach_live_leases
from .models import Service
from .validators import is_identifier, shown
from .ws_auth import NOT_FOUND, UNAUTHENTICATED

log = logging.getLogger(__name__)

BAD_REQUEST = 4400
MESSAGE_TOO_BIG = 1009  # RFC 6455
TRY_AGAIN_LATER = 1013  # RFC 6455: a socket too far behind its pushes
PUSH_BACKLOG_LIMIT = 1000  # pushes a socket may have waiting before it is closed


class DirectSend:
    """Writes a text frame straight to the transport of uvicorn's websockets (sans-I/O) protocol, as its
    ``websocket.send`` would, when that send would not wait: the connection is open and not closing, no
    extension (compression) is negotiated, nothing else is queued, and the transport is not paused by
    backpressure. ``write`` returns False, and writes nothing, otherwise."""

    __slots__ = ("conn", "protocol", "transport", "writable")

    def __init__(self, protocol: Any) -> None:
        self.protocol = protocol
        # Fixed for the connection's life (the transport is set before the application is called).
        self.conn = protocol.conn
        self.transport = protocol.transport
        self.writable = protocol.writable

    @classmethod
    def of(cls, send: Any) -> DirectSend | None:
        """For the ASGI ``send`` a consumer was given, or None when it is not uvicorn's sans-I/O protocol's
        (another server, a test communicator): wrappers that pass ``websocket.send`` through unchanged
        name the send they wrap as ``__wrapped__``."""
        for _ in range(8):
            protocol = getattr(send, "__self__", None)
            if (
                WebSocketsSansIOProtocol is not None
                and isinstance(protocol, WebSocketsSansIOProtocol)
                and getattr(send, "__func__", None) is WebSocketsSansIOProtocol.send
            ):
                try:
                    return cls(protocol)
                except AttributeError:  # not connected yet, or another version of the protocol
                    return None
            send = getattr(send, "__wrapped__", None)
            if send is None:
                break
        return None

    def write(self, frame: bytes) -> bool:
        protocol, conn, transport = self.protocol, self.conn, self.transport
        if (
            self.writable.is_set()
            and conn.state is OPEN
            and not protocol.close_sent
            and not protocol.disconnected
            and protocol.handshake_complete
            and protocol.initial_response is None
            and not conn.writes
            and not conn.extensions
            and not conn.expect_continuation_frame
            and not transport.is_closing()
        ):
            transport.write(frame)
            return True
        return False


_last_frame: tuple[Any, bytes] = (None, b"")


def push_frame(event: dict[str, Any]) -> bytes:
    """The unmasked text frame of a push's JSON, encoded once for all the sockets it is handed to."""
    global _last_frame
    if _last_frame[0] is not event:
        frame = Frame(Opcode.TEXT, event["text"].encode()).serialize(mask=False, extensions=[])
        _last_frame = (event, frame)
    return _last_frame[1]


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

    ``news`` and ``sent`` hold the rules ``forward`` applies to a push, for the fast path (see the module
    docstring); a subclass that changes ``forward``, ``push`` or ``send_payload`` without them keeps every
    push on the task path.
    """

    direct_pushes: ClassVar[bool] = True

    last_order: tuple[int, int] = (-1, -1)  # (generation, version) of the newest message sent
    missing = "not found"
    stream: str | None = None
    closed = False
    pushing: asyncio.Task[None] | None = None
    socket: DirectSend | None = None
    direct: DirectSend | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.scope = scope
        self.channel_layer = get_channel_layer(self.channel_layer_alias)
        self.base_send = send
        self.turn = asyncio.Lock()  # one handler at a time: the socket's messages and pushes, in order
        self.backlog: deque[dict[str, Any]] | None = None  # pushes waiting for the running push task
        self.socket = DirectSend.of(send)  # uvicorn's connection, when it is one
        self.direct = self.socket if self.direct_pushes else None  # pushes written straight to it
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

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)

        def owner(name: str) -> type:
            return next(k for k in cls.__mro__ if name in k.__dict__)

        rules = owner("news")
        cls.direct_pushes = all(issubclass(rules, owner(name)) for name in ("forward", "push", "send_payload"))

    def deliver(self, event: dict[str, Any]) -> None:
        """Called by the layer for each push (shared with every other socket: read, never changed)."""
        if self.closed:
            return
        if self.backlog is not None:  # a push task is running: it takes this one next
            if len(self.backlog) >= PUSH_BACKLOG_LIMIT:
                self.fall_behind()
                return
            self.backlog.append(event)
            return
        if self.direct is not None and not self.turn.locked() and self.push_now(event):
            return
        self.backlog = deque()
        self.pushing = asyncio.get_running_loop().create_task(self.push_in_turn(event))  # held: not collected

    def push_now(self, event: dict[str, Any]) -> bool:
        """Send (or drop, when not news) a push at once, without a task: False when it must take the task
        path (``news`` cannot tell, the push has no encoded text, or the socket would make a send wait)."""
        assert self.direct is not None
        payload, text = event["payload"], event.get("text")
        verdict = self.news(payload)
        if verdict is None or text is None:
            return False
        if not verdict:
            return True
        if not self.direct.write(push_frame(event)):
            return False
        self.sent(payload)
        return True

    def fall_behind(self) -> None:
        """Close a socket that is PUSH_BACKLOG_LIMIT pushes behind and drop what it was waiting for: the
        client reconnects and is sent the current state."""
        log.info("websocket closed: more than %d pushes behind", PUSH_BACKLOG_LIMIT)
        self.closed = True
        self.backlog = deque()
        if self.socket is not None:
            self.socket.transport.abort()
        elif self.pushing is not None:
            self.pushing.cancel()
            self.pushing = asyncio.get_running_loop().create_task(self.close(code=TRY_AGAIN_LATER))

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

    def news(self, payload: dict[str, Any]) -> bool | None:
        """Whether ``forward`` sends ``payload`` (True) or drops it (False: the subscriber already has
        something newer); None when only ``forward`` can tell."""
        return (payload.get("generation", 0), payload.get("version") or 0) >= self.last_order

    def sent(self, payload: dict[str, Any]) -> None:
        """Note that ``payload``, which ``news`` said to send, is being sent."""
        self.last_order = (payload.get("generation", 0), payload.get("version") or 0)

    async def forward(self, payload: dict[str, Any], text: str | None = None) -> None:
        if not self.news(payload):
            return  # out of order: the subscriber already has something newer
        self.sent(payload)
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

    def news(self, payload: dict[str, Any]) -> bool | None:
        if payload.get("type") == "snapshot":
            return None  # read from the database by forward
        return payload.get("revision", 0) > self.revisions.get(payload.get("service_id", ""), -1)

    def sent(self, payload: dict[str, Any]) -> None:
        self.revisions[payload.get("service_id", "")] = payload.get("revision", 0)

    async def send_once(self, payload: dict[str, Any], text: str | None = None) -> None:
        if not self.news(payload):
            return  # this subscriber has that state of the service, or a newer one
        self.sent(payload)
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
