"""Push to websocket subscribers through the Channels layer, only after the database commit.

A failed push is logged and never fails the request that caused it: every stream sends the current
state first on (re)connect and each message carries a generation or revision, so a subscriber that
missed a message recovers by reconnecting.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import transaction

log = logging.getLogger(__name__)


def channel_group(kind: str, *parts: str) -> str:
    """A Channels group name for a stream (identifiers may hold ':', which group names may not)."""
    return f"{kind}.{hashlib.sha1('/'.join(parts).encode()).hexdigest()}"


def send_now(group: str, payload: dict[str, Any]) -> None:
    try:
        async_to_sync(get_channel_layer().group_send)(group, {"type": "push", "payload": payload})
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
