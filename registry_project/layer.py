"""The Channels layer for websocket pushes: Redis pub/sub, subscribed once per group per server process and
fanned out inside the process.

A ``group_send`` is one PUBLISH. Each server process holds one Redis connection for its subscriptions and one
SUBSCRIBE per group that any of its sockets follows (never one per socket), decodes each message once, and
hands the same decoded message to every local subscriber. Push consumers (``registry.consumers``) subscribe
a callback with ``group_subscribe`` and hold no channel of their own; generic Channels consumers (the admin
stream) get a process-local channel, reached from other processes through the one Redis channel of the
process that owns it.

Publishes from one process leave in the order they were made (one writer per event loop; those queued
together go in one script call), and ``publish_soon`` lets a request enqueue a push without waiting for
Redis. As with any pub/sub layer, a message published while a process is away from Redis is lost: every
stream sends its current state on (re)connect and every message carries a generation or revision to order
by.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import types
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

import msgpack
from channels.layers import BaseChannelLayer
from redis import asyncio as aioredis

from registry.redis_client import Lua

log = logging.getLogger(__name__)

Callback = Callable[[dict[str, Any]], None]
FANOUT_SLICE = 64  # local subscribers handed a message per event-loop turn
SUBSCRIBE_TIMEOUT = 10.0  # seconds for Redis to confirm a SUBSCRIBE (it is sent again after a reconnect)


def _cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


# Several PUBLISHes in one command, in order (cheaper for the client than a pipeline of them).
# ARGV: channel, message, channel, message, ...
PUBLISH_MANY_LUA = """
for i = 1, #ARGV, 2 do
  redis.call('PUBLISH', ARGV[i], ARGV[i + 1])
end
"""
PUBLISH_MANY = Lua(PUBLISH_MANY_LUA)


async def _publish_many(redis: aioredis.Redis, batch: list[tuple[str, bytes, Any]]) -> None:
    args = [part for key, data, _ in batch for part in (key, data)]
    await PUBLISH_MANY.run_async(redis, [], *args)


class FanoutChannelLayer(BaseChannelLayer):
    """Channel layer over one Redis server (``hosts``: a list with one ``{"address": url}``)."""

    extensions = ["groups", "flush"]

    def __init__(self, hosts: list[Any] | None = None, prefix: str = "asgi", **kwargs: Any) -> None:
        super().__init__(expiry=60, capacity=100)
        entry = (hosts or [{"address": "redis://localhost:6379"}])[0]
        self.address = entry["address"] if isinstance(entry, dict) else str(entry)
        self.prefix = prefix
        self._loops: dict[asyncio.AbstractEventLoop, _LoopLayer] = {}

    # One state per event loop: a Redis connection belongs to the loop that opened it.
    def _layer(self) -> _LoopLayer:
        loop = asyncio.get_running_loop()
        layer = self._loops.get(loop)
        if layer is None:
            layer = self._loops[loop] = _LoopLayer(self)
            self._close_with(loop)
        return layer

    def _close_with(self, loop: asyncio.AbstractEventLoop) -> None:
        original = loop.close

        def close(this: asyncio.AbstractEventLoop) -> None:
            layer = self._loops.pop(loop, None)
            if layer is not None and not loop.is_running():
                loop.run_until_complete(layer.flush())
            this.close = original  # type: ignore[method-assign]
            original()

        loop.close = types.MethodType(close, loop)  # type: ignore[method-assign]

    # Channels layer API
    async def new_channel(self, prefix: str = "specific.") -> str:
        return await self._layer().new_channel()

    async def send(self, channel: str, message: dict[str, Any]) -> None:
        assert self.require_valid_channel_name(channel)
        await self._layer().send(channel, message)

    async def receive(self, channel: str) -> dict[str, Any]:
        return await self._layer().receive(channel)

    async def group_add(self, group: str, channel: str) -> None:
        assert self.require_valid_group_name(group)
        await self._layer().group_add(group, channel)

    async def group_discard(self, group: str, channel: str) -> None:
        assert self.require_valid_group_name(group)
        await self._layer().group_discard(group, channel)

    async def group_send(self, group: str, message: dict[str, Any]) -> None:
        """Publish to the group and wait until Redis has taken the message."""
        assert self.require_valid_group_name(group)
        await self._layer().publish(self._group_key(group), message)

    async def flush(self) -> None:
        await self._layer().flush()

    # Extensions
    async def group_subscribe(self, group: str, callback: Callback) -> None:
        """Call ``callback(message)`` (in this event loop, without awaiting it) for every message sent to
        ``group`` from now on: returns once Redis has confirmed this process's subscription."""
        assert self.require_valid_group_name(group)
        await self._layer().subscribe(self._group_key(group), callback)

    async def group_unsubscribe(self, group: str, callback: Callback) -> None:
        await self._layer().unsubscribe(self._group_key(group), callback)

    def publish_soon(self, group: str, message: dict[str, Any]) -> None:
        """Queue a publish and return at once (call in the event loop); publishes keep their order."""
        assert self.require_valid_group_name(group)
        self._layer().enqueue(self._group_key(group), message, None)

    def _group_key(self, group: str) -> str:
        return f"{self.prefix}.g.{group}"

    def _process_key(self, process: str) -> str:
        return f"{self.prefix}.{process}"


class _LoopLayer:
    """The layer's state in one event loop: connections, subscriptions, local channels, the writer."""

    def __init__(self, owner: FanoutChannelLayer) -> None:
        self.owner = owner
        self.process = f"process.{uuid.uuid4().hex}"  # names this loop's channels: "<process>!<id>"
        self.process_key = owner._process_key(self.process)
        self.redis: aioredis.Redis | None = None
        self.pubsub: Any = None
        self.reader: asyncio.Task[None] | None = None
        self.writer: asyncio.Task[None] | None = None
        self.outbox: deque[tuple[str, bytes, asyncio.Future[None] | None]] = deque()
        self.wake = asyncio.Event()
        self.callbacks: dict[str, dict[Callback, None]] = {}  # Redis channel -> callbacks, in arrival order
        self.groups: dict[str, dict[str, None]] = {}  # Redis channel -> local channel names
        self.channels: dict[str, asyncio.Queue[dict[str, Any]]] = {}
        self.confirmations: dict[str, deque[asyncio.Future[None]]] = {}  # SUBSCRIBEs awaiting Redis's reply
        self.subscribed: dict[str, asyncio.Future[None]] = {}  # Redis channel -> confirmed (or pending)
        self.lock = asyncio.Lock()  # (un)subscribe commands, one at a time
        self.fanout: deque[tuple[list[Callback], Any]] = deque()  # messages being handed out, in order
        self.pumping = False

    def _connection(self) -> aioredis.Redis:
        if self.redis is None:
            self.redis = aioredis.Redis.from_url(self.owner.address)
        return self.redis

    # Publishing: one writer task per loop, so publishes leave in the order they were made.
    def enqueue(self, key: str, message: dict[str, Any], done: asyncio.Future[None] | None) -> None:
        self.outbox.append((key, msgpack.packb(message, use_bin_type=True), done))
        self.wake.set()
        if self.writer is None or self.writer.done():
            self.writer = asyncio.get_running_loop().create_task(self._write())

    async def publish(self, key: str, message: dict[str, Any]) -> None:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.enqueue(key, message, done)
        await done

    async def _write(self) -> None:
        try:
            while True:
                await self.wake.wait()
                self.wake.clear()
                await self._drain()
                if _cancelling():  # swallowed inside redis-py: honour it here
                    raise asyncio.CancelledError
        except asyncio.CancelledError:
            # The loop is ending (a server shutting down, a short-lived loop in a command or a test): what
            # was queued still goes out, within a bound.
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            try:
                await asyncio.wait_for(self._drain(), 2)
            except Exception:  # noqa: BLE001 - gone for good; subscribers resync on reconnect
                log.warning("websocket pushes dropped at shutdown: %d", len(self.outbox))
            raise

    async def _drain(self) -> None:
        redis = self._connection()
        while self.outbox:
            batch = [self.outbox.popleft() for _ in range(min(len(self.outbox), 256))]
            try:
                if len(batch) == 1:
                    await redis.publish(batch[0][0], batch[0][1])
                else:
                    await _publish_many(redis, batch)
            except Exception as exc:
                if _cancelling():  # redis-py may turn a cancellation into a connection error
                    self.outbox.extendleft(reversed(batch))
                    raise asyncio.CancelledError from exc
                log.warning("websocket push not published: %s", exc)
                for _, _, done in batch:
                    if done is not None and not done.done():
                        done.set_exception(exc)
                continue
            except asyncio.CancelledError:
                self.outbox.extendleft(reversed(batch))
                raise
            for _, _, done in batch:
                if done is not None and not done.done():
                    done.set_result(None)

    # Subscriptions: one per Redis channel (a group, or this process's own channel), whoever asks.
    async def _subscribe(self, key: str) -> None:
        """SUBSCRIBE ``key`` unless already done, and wait for Redis to confirm it."""
        confirmed = self.subscribed.get(key)
        if confirmed is None:
            loop = asyncio.get_running_loop()
            confirmed = self.subscribed[key] = loop.create_future()
            async with self.lock:
                if self.pubsub is None:
                    self.pubsub = self._connection().pubsub()
                waiting = self.confirmations.setdefault(key, deque())
                waiting.append(confirmed)
                try:
                    await self.pubsub.subscribe(key)
                except Exception as exc:
                    if self.subscribed.get(key) is confirmed:
                        del self.subscribed[key]
                    if confirmed in waiting:
                        waiting.remove(confirmed)
                    confirmed.set_exception(exc)  # every socket waiting for it is told
                    raise
                if self.reader is None or self.reader.done():
                    self.reader = loop.create_task(self._read())
        await asyncio.wait_for(asyncio.shield(confirmed), SUBSCRIBE_TIMEOUT)

    async def _unsubscribe_if_unused(self, key: str) -> None:
        if self.callbacks.get(key) or self.groups.get(key) or key not in self.subscribed:
            return
        del self.subscribed[key]
        async with self.lock:
            if key not in self.subscribed:  # nobody subscribed again meanwhile
                try:
                    await self.pubsub.unsubscribe(key)
                except Exception as exc:  # noqa: BLE001 - Redis away: messages for key are dropped here
                    log.info("websocket push unsubscribe failed: %s", exc)

    async def subscribe(self, key: str, callback: Callback) -> None:
        self.callbacks.setdefault(key, {})[callback] = None
        try:
            await self._subscribe(key)
        except BaseException:
            await self.unsubscribe(key, callback)
            raise

    async def unsubscribe(self, key: str, callback: Callback) -> None:
        callbacks = self.callbacks.get(key)
        if callbacks is not None:
            callbacks.pop(callback, None)
            if not callbacks:
                del self.callbacks[key]
        await self._unsubscribe_if_unused(key)

    async def _read(self) -> None:
        interrupted = False
        while True:
            try:
                message = await self.pubsub.get_message(timeout=None)
            except Exception as exc:  # Redis away: redis-py reconnects and resubscribes on the next read
                if _cancelling():
                    raise asyncio.CancelledError from exc
                if not interrupted:
                    log.warning("websocket push subscription interrupted: %s", exc)
                interrupted = True
                await asyncio.sleep(0.5)
                continue
            if _cancelling():  # swallowed inside redis-py: honour it here
                raise asyncio.CancelledError
            if interrupted:
                log.info("websocket push subscription restored")
                interrupted = False
            if message is None:
                continue
            kind = message["type"]
            key = message["channel"].decode() if isinstance(message["channel"], bytes) else message["channel"]
            if kind == "message":
                try:
                    self._deliver(key, msgpack.unpackb(message["data"], raw=False))
                except Exception:
                    log.exception("websocket push not delivered")
            elif kind == "subscribe":
                waiting = self.confirmations.get(key)
                if waiting:
                    future = waiting.popleft()
                    if not waiting:
                        del self.confirmations[key]
                    if not future.done():
                        future.set_result(None)

    def _deliver(self, key: str, message: Any) -> None:
        if key == self.process_key:
            channel, message = message
            queue = self.channels.get(channel)
            if queue is not None:
                queue.put_nowait(message)
            return
        # One decoded message for every local subscriber: they read it and never change it.
        callbacks = self.callbacks.get(key)
        if callbacks:
            self.fanout.append((list(callbacks), message))
            if not self.pumping:
                self.pumping = True
                self._pump()
        for channel in self.groups.get(key, ()):
            queue = self.channels.get(channel)
            if queue is not None:
                queue.put_nowait(message)

    def _pump(self) -> None:
        """Hand out pending messages, FANOUT_SLICE callbacks per event-loop turn and in arrival order, so
        the loop's other work (a request's response) never waits behind a whole fan-out."""
        budget = FANOUT_SLICE
        while self.fanout and budget > 0:
            callbacks, message = self.fanout[0]
            chunk, rest = callbacks[:budget], callbacks[budget:]
            for callback in chunk:
                try:
                    callback(message)
                except Exception:
                    log.exception("websocket push not delivered")
            budget -= len(chunk)
            if rest:
                self.fanout[0] = (rest, message)
            else:
                self.fanout.popleft()
        if self.fanout:
            asyncio.get_running_loop().call_soon(self._pump)
        else:
            self.pumping = False

    # Local channels, for generic consumers.
    async def new_channel(self) -> str:
        await self._subscribe(self.process_key)
        channel = f"{self.process}!{uuid.uuid4().hex}"
        self.channels[channel] = asyncio.Queue()
        return channel

    async def send(self, channel: str, message: dict[str, Any]) -> None:
        key = self.owner._process_key(channel.partition("!")[0])
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.outbox.append((key, msgpack.packb([channel, message], use_bin_type=True), done))
        self.wake.set()
        if self.writer is None or self.writer.done():
            self.writer = asyncio.get_running_loop().create_task(self._write())
        await done

    async def receive(self, channel: str) -> dict[str, Any]:
        queue = self.channels.get(channel)
        if queue is None:
            queue = self.channels[channel] = asyncio.Queue()
        try:
            return await queue.get()
        except asyncio.CancelledError:
            # Channels cancels a consumer's receive when the consumer ends: forget its channel.
            self.channels.pop(channel, None)
            for key in [k for k, members in self.groups.items() if channel in members]:
                await self.group_discard_key(key, channel)
            raise

    async def group_add(self, group: str, channel: str) -> None:
        key = self.owner._group_key(group)
        self.groups.setdefault(key, {})[channel] = None
        await self._subscribe(key)

    async def group_discard(self, group: str, channel: str) -> None:
        await self.group_discard_key(self.owner._group_key(group), channel)

    async def group_discard_key(self, key: str, channel: str) -> None:
        members = self.groups.get(key)
        if members is not None:
            members.pop(channel, None)
            if not members:
                del self.groups[key]
        await self._unsubscribe_if_unused(key)

    async def flush(self) -> None:
        for task in (self.reader, self.writer):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):  # closing anyway
                    await task
        self.reader = self.writer = None
        if self.pubsub is not None:
            await self.pubsub.aclose()
            self.pubsub = None
        if self.redis is not None:
            await self.redis.aclose(close_connection_pool=True)
            self.redis = None
        self.callbacks.clear()
        self.groups.clear()
        self.channels.clear()
        self.subscribed.clear()
        self.confirmations.clear()
        self.outbox.clear()
        self.fanout.clear()
        self.pumping = False
