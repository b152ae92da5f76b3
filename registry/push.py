"""Push to websocket subscribers through the Channels layer, only after the database commit.

Pushes are handed to one publisher thread per process, which sends them in order on its own event
loop: the request that caused them does not wait for the server's fan-out to its own websockets. A
failed push is logged and never fails that request: every stream sends the current state first on
(re)connect and each message carries a generation or revision, so a subscriber that missed a message
recovers by reconnecting.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import queue
import threading
from collections.abc import Callable
from typing import Any

from channels.layers import get_channel_layer
from django.db import transaction

log = logging.getLogger(__name__)


def channel_group(kind: str, *parts: str) -> str:
    """A Channels group name for a stream (identifiers may hold ':', which group names may not)."""
    return f"{kind}.{hashlib.sha1('/'.join(parts).encode()).hexdigest()}"


class _Publisher:
    """A FIFO of pushes drained by a daemon thread with its own event loop (started after fork)."""

    def __init__(self) -> None:
        self.queue: queue.SimpleQueue[tuple[str, dict[str, Any]]] = queue.SimpleQueue()
        self.pid: int | None = None
        self.lock = threading.Lock()

    def submit(self, group: str, payload: dict[str, Any]) -> None:
        if self.pid != os.getpid():
            with self.lock:
                if self.pid != os.getpid():
                    self.queue = queue.SimpleQueue()
                    threading.Thread(target=self._drain, args=(self.queue,), name="push-publisher", daemon=True).start()
                    self.pid = os.getpid()
        self.queue.put((group, payload))

    @staticmethod
    def _drain(pending: queue.SimpleQueue[tuple[str, dict[str, Any]]]) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        while True:
            group, payload = pending.get()
            try:
                loop.run_until_complete(get_channel_layer().group_send(group, {"type": "push", "payload": payload}))
            except Exception:
                log.exception("push to %s failed", group)


_publisher = _Publisher()


def send_now(group: str, payload: dict[str, Any]) -> None:
    """Queue a push; it goes out in order, without blocking the caller."""
    _publisher.submit(group, payload)


def after_commit(build: Callable[[], None]) -> None:
    """Run ``build`` (which computes and queues messages) once the current transaction commits."""

    def run() -> None:
        try:
            build()
        except Exception:
            log.exception("push after commit failed")

    transaction.on_commit(run)
