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
from collections.abc import Mapping
from typing import TYPE_CHECKING

from .. import _flows, errors
from .._backoff import Backoff
from .._selection import LocalPool, check_strategy, parse_selector
from ..records import Service
from .watch import ServiceWatch

if TYPE_CHECKING:
    from .registry import Registry

log = logging.getLogger("conveyor.balancer")


class Balancer:
    def __init__(
        self,
        registry: Registry,
        name: str,
        strategy: str = "round_robin",
        selector: Mapping[str, str] | str | None = None,
        local: bool = False,
        *,
        stale_after: float = 15.0,
    ) -> None:
        self.name = name
        self.strategy = check_strategy(strategy)
        self.selector = parse_selector(selector)
        self.local = local
        self._registry = registry
        self._error: errors.ConveyorError | None = None
        self._closed = False
        self._tasks: list[asyncio.Task[None]] = []
        if local:
            self._pool = LocalPool(name, strategy, self.selector, stale_after)
            self._version = -1
            self._watch = ServiceWatch(registry, name)
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
                raise (
                    self._watch.error
                    or self._error
                    or errors.Unavailable(f"no snapshot of {self.name!r} from the registry yet")
                )
        if self._error is not None:
            raise self._error
        self._follow_view()
        return self._pool.select(time.time(), key)

    def instances(self) -> list[Service]:
        """The instances a local balancer currently knows of (its name and selector), eligible or not."""
        if not self.local:
            raise RuntimeError("instances() is for local=True balancers")
        self._follow_view()
        return list(self._pool.records.values())

    def _follow_view(self) -> None:
        if self._watch.version != self._version:
            self._pool.set_view(self._watch.view())
            self._version = self._watch.version

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
                self._pool.set_deadlines(found, started)
                delay = self._pool.refresh_period()
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
