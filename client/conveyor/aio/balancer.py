"""Choosing an instance of a service for asyncio: the same modes, rules and errors as ``conveyor.balancer``
(``_flows.select`` over HTTP, ``_selection.LocalPool`` locally), with the local mode's watch and lease
refresh running as tasks.

    async with reg.balancer("orders", strategy="weighted", local=True) as balancer:
        instance = await balancer.select()
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from .. import _flows, errors
from .._backoff import Backoff
from .._selection import BalancerBase
from ..records import Service
from .watch import ServiceWatch

log = logging.getLogger("conveyor.balancer")


class Balancer(BalancerBase):
    _watch: ServiceWatch

    def _setup(self) -> None:
        self._closed = False
        self._tasks: list[asyncio.Task[None]] = []
        if self.local:
            self._guard = contextlib.nullcontext()  # one event loop: nothing runs between two statements
            self._watch = ServiceWatch(self._registry, self.name)
            self._stop = asyncio.Event()

    def _start(self) -> None:
        if not self._tasks:
            self._tasks = [asyncio.create_task(self._follow()), asyncio.create_task(self._refresh())]

    async def select(self, key: str | None = None) -> Service:
        """One instance (a ``Service``); see ``conveyor.balancer.Balancer.select``."""
        if self._closed:
            raise RuntimeError("this balancer is closed")
        if not self.local:
            return await _flows.arun(
                _flows.select(self.name, self.strategy, self.selector, key), self._registry.transport
            )
        if self._version < 0:
            self._start()
            if not await self._watch.wait_synced(self._registry.config.timeout):
                raise self._not_synced()
        return self._choose(key)

    async def _follow(self) -> None:
        try:
            async for _event in self._watch:
                pass  # the watch keeps the view; select() reads it when its version moved
        except errors.ConveyorError as exc:
            log.error("balancer %s: the registry refused the watch: %s", self.name, exc)
            self._error = exc

    async def _refresh(self) -> None:
        backoff = Backoff(base=0.5, cap=5.0)
        while not self._stop.is_set():
            started = time.time()
            try:
                found = await _flows.arun(_flows.list_services(name=self.name), self._registry.transport)
            except (errors.Unauthorized, errors.Forbidden) as exc:
                self._error = exc
                return
            except Exception as exc:  # noqa: BLE001 - unreachable, 5xx, a closed transport: try again later
                log.debug("balancer %s: lease refresh failed: %s", self.name, exc)
                delay = backoff.next()
            else:
                backoff.reset()
                delay = self._deadlines(found, started)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)

    async def aclose(self) -> None:
        self._closed = True
        if self.local:
            self._stop.set()
            await self._watch.aclose()
            for task in self._tasks:
                task.cancel()
            for task in self._tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def __aenter__(self) -> Balancer:
        if self.local:
            self._start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
