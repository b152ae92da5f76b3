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
import time

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from .._watch_state import SYNC_PROBE, WatchBase, log
from ..records import WatchEvent


class ServiceWatch(WatchBase):
    def _setup(self) -> None:
        self._guard = contextlib.nullcontext()  # one event loop: nothing runs between two statements
        self._ws: ClientConnection | None = None
        self._closed = asyncio.Event()
        self._synced = asyncio.Event()

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
                if self.syncing:
                    raw = await asyncio.wait_for(ws.recv(), max(0.05, self._sync_deadline - time.monotonic()))
                else:
                    raw = await ws.recv()
            except TimeoutError:
                log.warning("watch %s: the snapshot stalled; reconnecting", self._url)
                self._ws = None
                await ws.close()
                await self._pause("stalled")
                continue
            except ConnectionClosed as closed:
                self._ws = None
                if self._closed.is_set():
                    continue
                error = self._refusal(closed)
                if error is not None:
                    await self.aclose()
                    raise error from None
                await self._pause(f"closed: {closed}")
                continue
            if self._take(raw):
                self._synced.set()

    async def _connect(self) -> None:
        while not self._closed.is_set():
            try:
                ws = await connect(
                    self._url,
                    subprotocols=self._config.ws_subprotocols(),  # type: ignore[arg-type]
                    open_timeout=self._config.timeout,
                )
            except InvalidStatus as refused:
                error = self._refused_handshake(refused.response.status_code)
                if error is not None:
                    await self.aclose()
                    raise error from None
                await self._pause(refused)
                continue
            except (OSError, TimeoutError, InvalidHandshake) as exc:
                await self._pause(exc)
                continue
            try:
                await ws.send(json.dumps(SYNC_PROBE))
            except ConnectionClosed as closed:
                await ws.close()
                error = self._refusal(closed)  # refused at once (a bad name, a revoked token): never retry
                if error is not None:
                    await self.aclose()
                    raise error from None
                await self._pause("closed at once")
                continue
            self._connected()
            if self._closed.is_set():  # aclose() ran meanwhile and could not see this socket
                await ws.close()
                return
            self._ws = ws
            return

    async def _pause(self, why: object) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closed.wait(), self._next_delay(why))

    async def aclose(self) -> None:
        """End the watch: a pending ``__anext__`` ends the iteration. Idempotent."""
        self._closed.set()
        ws, self._ws = self._ws, None
        if ws is not None:
            await ws.close()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    async def wait_synced(self, timeout: float | None = None) -> bool:
        """Wait until the first snapshot has been read or the watch was closed; True if it was read."""
        waits = [asyncio.ensure_future(self._synced.wait()), asyncio.ensure_future(self._closed.wait())]
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
        return self._synced.is_set()

    async def __aenter__(self) -> ServiceWatch:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
