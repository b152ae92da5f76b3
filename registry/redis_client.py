"""Shared Redis clients (one thread-safe sync client per URL, one asyncio client per URL and event loop)
and ``Lua``, a script run by its SHA1."""

from __future__ import annotations

import asyncio
import hashlib
import weakref
from typing import Any

import redis
import redis.asyncio as aredis
from django.conf import settings

_sync_clients: dict[str, redis.Redis] = {}
_async_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, aredis.Redis]] = (
    weakref.WeakKeyDictionary()
)


def _options() -> dict[str, float]:
    timeout = settings.REDIS_SOCKET_TIMEOUT_MS / 1000
    return {"socket_timeout": timeout, "socket_connect_timeout": min(timeout, 2), "health_check_interval": 30}


def get_redis(url: str | None = None) -> redis.Redis:
    url = url or settings.REDIS_URL
    client = _sync_clients.get(url)
    if client is None:
        client = _sync_clients.setdefault(url, redis.Redis.from_url(url, **_options()))
    return client


def get_async_redis(url: str | None = None) -> aredis.Redis:
    url = url or settings.REDIS_URL
    per_loop = _async_clients.setdefault(asyncio.get_running_loop(), {})
    client = per_loop.get(url)
    if client is None:
        client = per_loop[url] = aredis.Redis.from_url(url, **_options())
    return client


class Lua:
    """A Lua script run by its SHA1 (EVALSHA), so a hot path does not send its text at every call; the text
    goes once Redis answers that it does not know the script (NOSCRIPT: a Redis restarted or flushed)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    def run(self, r: redis.Redis, keys: list[Any], *args: Any) -> Any:
        try:
            return r.evalsha(self.sha, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:
            return r.eval(self.source, len(keys), *keys, *args)

    async def run_async(self, r: aredis.Redis, keys: list[Any], *args: Any) -> Any:
        try:
            return await r.evalsha(self.sha, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:
            return await r.eval(self.source, len(keys), *keys, *args)


def reset_clients() -> None:
    """Drop cached clients (tests point REDIS_URL at servers they start)."""
    for client in _sync_clients.values():
        client.close()
    _sync_clients.clear()
    _async_clients.clear()
