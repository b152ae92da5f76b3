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
import threading
import time

from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from ._watch_state import SYNC_PROBE, WatchBase, log
from .records import WatchEvent


class ServiceWatch(WatchBase):
    def _setup(self) -> None:
        self._guard = threading.Lock()
        self._ws: ClientConnection | None = None
        self._closed = threading.Event()
        self._synced = threading.Event()
        self._settled = threading.Event()  # synced, or closed (a refused watch closes itself)

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
                self._ws = None
                ws.close()
                self._pause("stalled")
                continue
            except ConnectionClosed as closed:
                self._ws = None
                if self._closed.is_set():
                    continue
                error = self._refusal(closed)
                if error is not None:
                    self.close()
                    raise error from None
                self._pause(f"closed: {closed}")
                continue
            if self._take(raw) and not self._synced.is_set():
                self._synced.set()
                self._settled.set()

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
                error = self._refused_handshake(refused.response.status_code)
                if error is not None:
                    self.close()
                    raise error from None
                self._pause(refused)
                continue
            except (OSError, TimeoutError, InvalidHandshake) as exc:
                self._pause(exc)
                continue
            try:
                ws.send(json.dumps(SYNC_PROBE))
            except ConnectionClosed as closed:
                ws.close()
                error = self._refusal(closed)  # refused at once (a bad name, a revoked token): never retry
                if error is not None:
                    self.close()
                    raise error from None
                self._pause("closed at once")
                continue
            self._connected()
            self._ws = ws
            if self._closed.is_set():  # close() ran meanwhile and could not see this socket
                ws.close()
            return

    def _pause(self, why: object) -> None:
        self._closed.wait(self._next_delay(why))

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

    def wait_synced(self, timeout: float | None = None) -> bool:
        """Wait until the first snapshot has been read (while something iterates the watch) or the watch was
        closed; True if it was read."""
        self._settled.wait(timeout)
        return self._synced.is_set()

    def __enter__(self) -> ServiceWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
