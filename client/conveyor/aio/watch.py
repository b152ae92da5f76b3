"""A watch of ``/ws/services/`` for asyncio: the same events and rules as ``conveyor.watch`` (both feed
``_watch_state``), as an async iterator.

    async with reg.watch_services("orders") as watch:
        async for event in watch:
            ...
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from typing import TYPE_CHECKING

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from .. import errors
from .._backoff import Backoff
from .._watch_state import SYNC_PROBE, WatchState, close_error, handshake_error, watch_path
from ..records import Service, WatchEvent

if TYPE_CHECKING:
    from .registry import Registry

log = logging.getLogger("conveyor.watch")


class ServiceWatch:
    def __init__(self, registry: Registry, name: str | None = None) -> None:
        self.name = name
        self._config = registry.config
        self._url = registry.config.ws_url + watch_path(name)
        self._state = WatchState()
        self._events: deque[WatchEvent] = deque()
        self._ws: ClientConnection | None = None
        self._closed = asyncio.Event()
        self._synced = asyncio.Event()
        self._backoff = Backoff(base=0.25, cap=10.0)
        self._sync_deadline = 0.0
        self.error: errors.ConveyorError | None = None  # why the registry refused the watch, once it did
        self.connects = 0

    def __aiter__(self) -> ServiceWatch:
        return self

    async def __anext__(self) -> WatchEvent:
        while True:
            if self._closed.is_set():
                raise StopAsyncIteration
            if self._events:
                return self._events.popleft()
            ws = self._ws
            if ws is None:
                await self._connect()
                continue
            try:
                if self._state.syncing:
                    raw = await asyncio.wait_for(ws.recv(), max(0.05, self._sync_deadline - time.monotonic()))
                else:
                    raw = await ws.recv()
            except TimeoutError:
                log.warning("watch %s: the snapshot stalled; reconnecting", self._url)
                await self._drop(ws)
                continue
            except ConnectionClosed as closed:
                await self._lost(closed)
                continue
            try:
                message = json.loads(raw)
            except ValueError:
                continue
            if not isinstance(message, dict):
                continue
            events = self._state.feed(message)
            if self._state.syncing:  # a large snapshot may take a while: the deadline is for the next message
                self._sync_deadline = time.monotonic() + self._config.timeout
            else:
                self._synced.set()
                self._backoff.reset()
            self._events.extend(events)

    async def _connect(self) -> None:
        while not self._closed.is_set():
            try:
                ws = await connect(
                    self._url,
                    subprotocols=self._config.ws_subprotocols(),  # type: ignore[arg-type]
                    open_timeout=self._config.timeout,
                )
            except InvalidStatus as refused:
                error = handshake_error(refused.response.status_code)
                if error is not None:
                    self.error = error
                    await self.aclose()
                    raise error from None
                await self._pause(refused)
                continue
            except (OSError, TimeoutError, InvalidHandshake) as exc:
                await self._pause(exc)
                continue
            try:
                await ws.send(json.dumps(SYNC_PROBE))
            except ConnectionClosed:
                await ws.close()
                await self._pause(None)
                continue
            self._state.connected()
            self.connects += 1
            self._sync_deadline = time.monotonic() + self._config.timeout
            if self._closed.is_set():  # aclose() ran meanwhile and could not see this socket
                await ws.close()
                return
            self._ws = ws
            return

    async def _pause(self, why: object) -> None:
        delay = self._backoff.next()
        log.info("watch %s: reconnecting in %.2f s (%s)", self._url, delay, why)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closed.wait(), delay)

    async def _drop(self, ws: ClientConnection) -> None:
        self._ws = None
        await ws.close()
        await self._pause("dropped")

    async def _lost(self, closed: ConnectionClosed) -> None:
        self._ws = None
        if self._closed.is_set():
            return
        code = closed.rcvd.code if closed.rcvd else None
        error = close_error(code, self._state.last_error_detail or (closed.rcvd.reason if closed.rcvd else ""))
        if error is not None:
            self.error = error
            await self.aclose()
            raise error from None
        await self._pause(f"closed with {code}")

    async def aclose(self) -> None:
        """End the watch: a pending ``__anext__`` ends the iteration. Idempotent."""
        self._closed.set()
        ws, self._ws = self._ws, None
        if ws is not None:
            await ws.close()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    @property
    def syncing(self) -> bool:
        return self._state.syncing

    async def wait_synced(self, timeout: float | None = None) -> bool:
        """Wait until the first snapshot has been read or the watch was closed; True if it was read."""
        waits = [asyncio.ensure_future(self._synced.wait()), asyncio.ensure_future(self._closed.wait())]
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
        return self._synced.is_set()

    def view(self) -> dict[str, Service]:
        return dict(self._state.view)

    @property
    def version(self) -> int:
        return self._state.version

    async def __aenter__(self) -> ServiceWatch:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
