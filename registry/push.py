"""Push to websocket subscribers through the Channels layer (registry_project.layer), only after the
database commit, without making the request that caused the push wait for its delivery.

A failed push is logged and never fails the request that caused it: every stream sends the current
state first on (re)connect and each message carries a generation or revision, so a subscriber that
missed a message recovers by reconnecting.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable
from typing import Any

from asgiref.sync import SyncToAsync
from channels.layers import get_channel_layer
from django.db import transaction

log = logging.getLogger(__name__)


def channel_group(kind: str, *parts: str) -> str:
    """A Channels group name for a stream (identifiers may hold ':', which group names may not)."""
    return f"{kind}.{hashlib.sha1('/'.join(parts).encode()).hexdigest()}"


class _LoopThread:
    """A persistent event loop in a daemon thread, for pushes from code that has no event loop of its
    own (Celery workers, management commands): async_to_sync would build a new loop, and the channel
    layer a new Redis connection, for every single push."""

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self.pid: int | None = None
        self.lock = threading.Lock()

    def run(self, coroutine: Any) -> None:
        with self.lock:
            if self.pid != os.getpid():  # first use, or first use after a fork
                self.loop = asyncio.new_event_loop()
                threading.Thread(target=self.loop.run_forever, name="push-loop", daemon=True).start()
                self.pid = os.getpid()
        assert self.loop is not None
        asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=10)


_loop_thread = _LoopThread()


def _server_loop() -> asyncio.AbstractEventLoop | None:
    """The ASGI server's event loop when called from a thread that serves one of its requests."""
    if getattr(SyncToAsync.threadlocal, "main_event_loop_pid", None) != os.getpid():
        return None
    loop = getattr(SyncToAsync.threadlocal, "main_event_loop", None)
    return loop if loop is not None and loop.is_running() else None


def push_message(payload: dict[str, Any]) -> dict[str, Any]:
    """The layer message for ``payload``: the JSON text every socket is sent is encoded here, once."""
    return {"type": "push", "payload": payload, "text": json.dumps(payload)}


def send_now(group: str, payload: dict[str, Any]) -> None:
    """Publish ``payload`` to a stream. Inside the ASGI server this only queues the publish on the server's
    event loop (in order with the process's other pushes) and returns: the request that caused it never
    waits for Redis, let alone for the sockets. Elsewhere (Celery, commands) it returns once published."""
    message = push_message(payload)
    try:
        layer = get_channel_layer()
        loop = _server_loop()
        if loop is not None and hasattr(layer, "publish_soon"):
            loop.call_soon_threadsafe(_publish_soon, layer, group, message)
        else:
            _loop_thread.run(layer.group_send(group, message))
    except Exception:
        log.exception("push to %s failed", group)


def _publish_soon(layer: Any, group: str, message: dict[str, Any]) -> None:
    try:
        layer.publish_soon(group, message)
    except Exception:
        log.exception("push to %s failed", group)


def after_commit(build: Callable[[], None]) -> None:
    """Run ``build`` (which computes and sends messages) once the current transaction commits."""

    def run() -> None:
        try:
            build()
        except Exception:
            log.exception("push after commit failed")

    transaction.on_commit(run)
