"""A watch of ``/ws/services/`` (sync): an iterator of ``WatchEvent``s that reconnects by itself.

    with reg.watch_services("orders") as watch:
        for event in watch:
            print(event.type, event.service_id, event.service and event.service.health)

What a consumer sees (the rules are ``_watch_state``'s):

- first one ``service.registered`` per current service (the snapshot), then every change as it happens;
- per service, events in revision order and never the same revision twice;
- after a disconnect, the watch reconnects (capped exponential backoff with jitter), reads a fresh snapshot
  and emits only the differences from what it had delivered (``resync=True``): ``service.registered`` for
  a service that appeared meanwhile, ``service.health`` / ``service.updated`` for one that changed, and
  ``service.deregistered`` with ``reason="absent"`` for one that went away. Intermediate states of the
  disconnected period are not replayed: the consumer's view converges to the registry's.

The iterator raises ``Unauthorized``, ``Forbidden``, ``InvalidRequest`` (a bad name) or ``NotFound`` when the
registry refuses the watch, since reconnecting cannot help; it ends (StopIteration) once ``close()`` was
called, from any thread. ``view()`` is the current view (service id -> ``Service``), ``wait_synced()``
waits for the first snapshot.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from typing import TYPE_CHECKING

from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from . import errors
from ._backoff import Backoff
from ._watch_state import SYNC_PROBE, WatchState, close_error, handshake_error, watch_path
from .records import Service, WatchEvent

if TYPE_CHECKING:
    from .registry import Registry

log = logging.getLogger("conveyor.watch")


class ServiceWatch:
    def __init__(self, registry: Registry, name: str | None = None) -> None:
        self.name = name
        self._config = registry.config
        self._url = registry.config.ws_url + watch_path(name)
        self._state = WatchState()
        self._lock = threading.Lock()
        self._events: deque[WatchEvent] = deque()
        self._ws: ClientConnection | None = None
        self._closed = threading.Event()
        self._synced = threading.Event()
        self._settled = threading.Event()  # synced, or closed (a refused watch closes itself)
        self._backoff = Backoff(base=0.25, cap=10.0)
        self._sync_deadline = 0.0
        self.error: errors.ConveyorError | None = None  # why the registry refused the watch, once it did
        self.connects = 0  # connections made; more than one means it reconnected

    # --- the iterator ------------------------------------------------------------------------

    def __iter__(self) -> ServiceWatch:
        return self

    def __next__(self) -> WatchEvent:
        while True:
            if self._closed.is_set():
                raise StopIteration
            if self._events:
                return self._events.popleft()
            ws = self._ws
            if ws is None:
                self._connect()
                continue
            try:
                raw = ws.recv(timeout=max(0.05, self._sync_deadline - time.monotonic()) if self.syncing else None)
            except TimeoutError:
                log.warning("watch %s: the snapshot stalled for %.0f s; reconnecting", self._url, self._config.timeout)
                self._drop(ws)
                continue
            except ConnectionClosed as closed:
                self._lost(ws, closed)
                continue
            try:
                message = json.loads(raw)
            except ValueError:
                continue
            if not isinstance(message, dict):
                continue
            with self._lock:
                events = self._state.feed(message)
                synced = not self._state.syncing
            if not synced:  # a large snapshot may take a while: the deadline is for the next message
                self._sync_deadline = time.monotonic() + self._config.timeout
            if synced and not self._synced.is_set():
                self._synced.set()
                self._settled.set()
            if synced:
                self._backoff.reset()
            self._events.extend(events)

    def _connect(self) -> None:
        while not self._closed.is_set():
            try:
                # Entered by hand, not in a with block: the connection outlives this call (close() ends it).
                ws = connect(
                    self._url,
                    subprotocols=self._config.ws_subprotocols(),  # type: ignore[arg-type]
                    open_timeout=self._config.timeout,
                ).__enter__()
            except InvalidStatus as refused:
                error = handshake_error(refused.response.status_code)
                if error is not None:
                    self.error = error
                    self.close()
                    raise error from None
                self._pause(refused)
                continue
            except (OSError, TimeoutError, InvalidHandshake) as exc:
                self._pause(exc)
                continue
            try:
                ws.send(json.dumps(SYNC_PROBE))
            except ConnectionClosed:
                ws.close()
                self._pause(None)
                continue
            with self._lock:
                self._state.connected()
            self.connects += 1
            self._sync_deadline = time.monotonic() + self._config.timeout
            self._ws = ws
            if self._closed.is_set():  # close() ran meanwhile and could not see this socket
                ws.close()
            return

    def _pause(self, why: object) -> None:
        delay = self._backoff.next()
        log.info("watch %s: reconnecting in %.2f s (%s)", self._url, delay, why)
        self._closed.wait(delay)

    def _drop(self, ws: ClientConnection) -> None:
        self._ws = None
        ws.close()
        self._pause("dropped")

    def _lost(self, ws: ClientConnection, closed: ConnectionClosed) -> None:
        self._ws = None
        if self._closed.is_set():
            return
        code = closed.rcvd.code if closed.rcvd else None
        error = close_error(code, self._state.last_error_detail or (closed.rcvd.reason if closed.rcvd else ""))
        if error is not None:
            self.error = error
            self.close()
            raise error from None
        self._pause(f"closed with {code}")

    # --- control and state -------------------------------------------------------------------

    def close(self) -> None:
        """End the watch: a blocked ``next()`` returns StopIteration. Idempotent, from any thread."""
        self._closed.set()
        self._settled.set()
        ws = self._ws
        if ws is not None:
            ws.close()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    @property
    def syncing(self) -> bool:
        return self._state.syncing

    def wait_synced(self, timeout: float | None = None) -> bool:
        """Wait until the first snapshot has been read (while something iterates the watch) or the watch was
        closed; True if it was read."""
        self._settled.wait(timeout)
        return self._synced.is_set()

    def view(self) -> dict[str, Service]:
        """The services as the events delivered so far describe them (a copy)."""
        with self._lock:
            return dict(self._state.view)

    def view_if_changed(self, version: int) -> tuple[int, dict[str, Service] | None]:
        """(current version, a copy of the view if its version is not ``version``, else None)."""
        with self._lock:
            if self._state.version == version:
                return version, None
            return self._state.version, dict(self._state.view)

    def __enter__(self) -> ServiceWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
