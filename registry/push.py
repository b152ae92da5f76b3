"""Push to websocket subscribers through the Channels layer, only after the database commit.

A failed push is logged and never fails the request that caused it: every stream sends the current
state first on (re)connect and each message carries a generation or revision, so a subscriber that
missed a message recovers by reconnecting.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import threading
from collections.abc import Callable
from typing import Any

from asgiref.sync import SyncToAsync, async_to_sync
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


def _inside_asgi_server() -> bool:
    # Set by asgiref in threads that serve a request for an ASGI server's event loop.
    return getattr(SyncToAsync.threadlocal, "main_event_loop_pid", None) == os.getpid()


def send_now(group: str, payload: dict[str, Any]) -> None:
    message = {"type": "push", "payload": payload}
    try:
        if _inside_asgi_server():
            async_to_sync(get_channel_layer().group_send)(group, message)
        else:
            _loop_thread.run(get_channel_layer().group_send(group, message))
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
