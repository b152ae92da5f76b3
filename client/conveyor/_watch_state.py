"""What a watch of ``/ws/services/`` makes of the messages it receives, with no I/O: the current view (service id
-> ``Service``), per-service ordering and de-duplication by ``revision``, and the differences a reconnect's
snapshot makes to the view. ``watch.ServiceWatch`` and ``aio.watch.ServiceWatch`` feed it.

The stream sends the current state first on every (re)connect: one ``service.registered`` message per
service. Nothing marks its end, so after connecting the watch sends ``{"type": "sync"}``; the server handles
a socket's messages one at a time, after the snapshot, so its answer (today an ``error`` naming the unknown
type; a ``sync`` reply or a ``snapshot.end`` message are understood too) comes after every snapshot message.
Until then messages only build the new snapshot; at the barrier it replaces the view and its differences
from the view are the events (``resync=True`` after a reconnect). After it, messages are applied live:

- a message whose ``revision`` is at or below the last one applied for that service is dropped (a duplicate,
  or older than what the view has), also after a deregistration (a tombstone keeps its revision);
- the first event of a service the watcher did not know is a ``service.registered``;
- a ``service.deregistered`` for a service not in the view changes nothing and is dropped.

A snapshot is the registry's state when it was read, newer than anything the previous connection delivered,
so it is applied whatever its revisions say (a registry that lapsed a lease without a new revision, or whose
revision counter restarted with its Redis, still converges), and its revisions are the new baseline.
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import replace
from typing import Any
from urllib.parse import urlencode

from websockets.exceptions import ConnectionClosed

from . import errors
from ._backoff import Backoff
from ._flows import RegistryLike
from .records import Service, WatchEvent

log = logging.getLogger("conveyor.watch")

REGISTERED, UPDATED, HEALTH, DEREGISTERED = (
    "service.registered",
    "service.updated",
    "service.health",
    "service.deregistered",
)
RECORD_TYPES = (REGISTERED, UPDATED, HEALTH)
SYNC_PROBE = {"type": "sync"}
BARRIER_TYPES = ("sync", "synced", "snapshot.end")
MAX_TOMBSTONES = 10_000


def is_barrier(message: Mapping[str, Any]) -> bool:
    kind = message.get("type")
    if kind in BARRIER_TYPES:
        return True
    return kind == "error" and "'sync'" in str(message.get("detail", ""))


def close_error(code: int | None, detail: str) -> errors.ConveyorError | None:
    """The error a close code means when reconnecting cannot help (bad name, bad token...), else None."""
    detail = detail or f"websocket closed with code {code}"
    kinds: dict[int, type[errors.ConveyorError]] = {
        4400: errors.InvalidRequest,
        4401: errors.Unauthorized,
        4403: errors.Forbidden,
        4404: errors.NotFound,
    }
    if code in kinds:
        return kinds[code](detail, status=code - 4000)
    return None


class WatchState:
    def __init__(self) -> None:
        self.view: dict[str, Service] = {}
        self.revisions: dict[str, int] = {}
        self.tombstones: OrderedDict[str, int] = OrderedDict()
        self.syncing = False
        self.synced_once = False
        self.pending: dict[str, Service] = {}
        self.pending_reasons: dict[str, str] = {}
        self.version = 0  # bumped by every change of the view
        self.last_error_detail = ""

    def connected(self) -> None:
        """A new connection: the messages up to the barrier are its snapshot."""
        self.syncing = True
        self.pending = {}
        self.pending_reasons = {}

    def feed(self, message: Mapping[str, Any]) -> list[WatchEvent]:
        kind = message.get("type")
        if self.syncing and is_barrier(message):
            return self._finish_snapshot()
        if kind == "error":
            self.last_error_detail = str(message.get("detail", ""))
            return []
        if kind not in (*RECORD_TYPES, DEREGISTERED) or "service_id" not in message:
            return []  # a message type this client does not know: ignore it
        if self.syncing:
            self._pend(message)
            return []
        return self._apply(message)

    def _pend(self, message: Mapping[str, Any]) -> None:
        sid = str(message["service_id"])
        if message["type"] == DEREGISTERED:
            self.pending.pop(sid, None)
            self.pending_reasons[sid] = str(message.get("reason") or "deregistered")
            return
        record = Service.from_json(message)
        held = self.pending.get(sid)
        if held is not None and _older(record.revision, held.revision):
            return
        self.pending[sid] = record

    def _finish_snapshot(self) -> list[WatchEvent]:
        resync = self.synced_once
        events: list[WatchEvent] = []
        for sid in sorted(self.pending):
            record = self.pending[sid]
            old = self.view.get(sid)
            if old is None:
                events.append(WatchEvent(REGISTERED, sid, record, record.revision, resync))
            elif not old.same_state(record):
                kind = HEALTH if _only_health_differs(old, record) else UPDATED
                events.append(WatchEvent(kind, sid, record, record.revision, resync))
        for sid in sorted(set(self.view) - set(self.pending)):
            reason = self.pending_reasons.get(sid, "absent")
            events.append(WatchEvent(DEREGISTERED, sid, None, None, resync, reason))
        self.view = self.pending
        self.revisions = {sid: r.revision for sid, r in self.view.items() if r.revision is not None}
        self.tombstones.clear()
        self.pending, self.pending_reasons = {}, {}
        self.syncing = False
        self.synced_once = True
        self.version += 1
        return events

    def _apply(self, message: Mapping[str, Any]) -> list[WatchEvent]:
        sid = str(message["service_id"])
        revision = message.get("revision")
        last = self.revisions.get(sid, self.tombstones.get(sid))
        if revision is not None and last is not None and int(revision) <= last:
            return []
        if message["type"] == DEREGISTERED:
            if sid not in self.view:
                return []
            del self.view[sid]
            self.revisions.pop(sid, None)
            if revision is not None:
                self.tombstones[sid] = int(revision)
                while len(self.tombstones) > MAX_TOMBSTONES:
                    self.tombstones.popitem(last=False)
            self.version += 1
            return [WatchEvent(DEREGISTERED, sid, None, revision, False, str(message.get("reason") or "deregistered"))]
        record = Service.from_json(message)
        kind = str(message["type"]) if sid in self.view else REGISTERED
        self.view[sid] = record
        self.tombstones.pop(sid, None)
        if revision is not None:
            self.revisions[sid] = int(revision)
        self.version += 1
        return [WatchEvent(kind, sid, record, record.revision, False)]


def _older(revision: int | None, than: int | None) -> bool:
    return revision is not None and than is not None and revision < than


def _only_health_differs(old: Service, new: Service) -> bool:
    return old.health != new.health and old.same_state(replace(new, health=old.health))


def handshake_error(status: int, detail: str = "") -> errors.ConveyorError | None:
    """The error for a refused websocket handshake (HTTP status) when retrying cannot help, else None."""
    if status in (400, 401, 403, 404):
        return errors.from_response(status, {"detail": detail or f"websocket handshake refused with HTTP {status}"})
    return None


def watch_path(name: str | None) -> str:
    return "/ws/services/" + ("" if name is None else "?" + urlencode({"name": name}))


class WatchBase:
    """What both watch drivers share: the state, the events not yet delivered, the reconnect pacing and the
    handling of a received message. ``_guard`` serialises the state against readers of the view (a lock for
    the sync watch, whose view is read from other threads)."""

    _guard: AbstractContextManager[Any]

    def __init__(self, registry: RegistryLike, name: str | None = None) -> None:
        self.name = name
        self._config = registry.config
        self._url = registry.config.ws_url + watch_path(name)
        self._state = WatchState()
        self._events: deque[WatchEvent] = deque()
        self._backoff = Backoff(base=0.25, cap=10.0)
        self._sync_deadline = 0.0
        self.error: errors.ConveyorError | None = None  # why the registry refused the watch, once it did
        self.connects = 0  # connections made; more than one means it reconnected
        self._setup()

    def _setup(self) -> None:
        raise NotImplementedError

    @property
    def syncing(self) -> bool:
        return self._state.syncing

    def view(self) -> dict[str, Service]:
        """The services as the events delivered so far describe them (a copy)."""
        with self._guard:
            return dict(self._state.view)

    def view_if_changed(self, version: int) -> tuple[int, dict[str, Service] | None]:
        """(current version, a copy of the view if its version is not ``version``, else None)."""
        with self._guard:
            if self._state.version == version:
                return version, None
            return self._state.version, dict(self._state.view)

    def _connected(self) -> None:
        """A connection is open and the sync probe sent: what arrives until the barrier is its snapshot."""
        with self._guard:
            self._state.connected()
        self.connects += 1
        self._sync_deadline = time.monotonic() + self._config.timeout

    def _take(self, raw: str | bytes) -> bool:
        """Apply one received message; True once the snapshot is complete."""
        try:
            message = json.loads(raw)
        except ValueError:
            return not self._state.syncing
        if not isinstance(message, dict):
            return not self._state.syncing
        with self._guard:
            events = self._state.feed(message)
            synced = not self._state.syncing
        if synced:
            self._backoff.reset()
        else:  # a large snapshot may take a while: the deadline is for the next message
            self._sync_deadline = time.monotonic() + self._config.timeout
        self._events.extend(events)
        return synced

    def _refusal(self, closed: ConnectionClosed) -> errors.ConveyorError | None:
        """The error of a close that reconnecting cannot mend (kept in ``error``), else None."""
        code, reason = (closed.rcvd.code, closed.rcvd.reason) if closed.rcvd else (None, "")
        self.error = close_error(code, self._state.last_error_detail or reason)
        return self.error

    def _refused_handshake(self, status: int) -> errors.ConveyorError | None:
        self.error = handshake_error(status)
        return self.error

    def _next_delay(self, why: object) -> float:
        delay = self._backoff.next()
        log.info("watch %s: reconnecting in %.2f s (%s)", self._url, delay, why)
        return delay
