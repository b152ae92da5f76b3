"""Batching on an event loop: what the requests of one loop turn send to Redis goes as one call.

``LoopBatcher`` holds the mechanics the fast paths share (heartbeats in ``registry.fastpath``, unchanged
re-registration checks in ``registry.fast_register``): the first item of a turn starts a task; it runs on
the next turn, when every request whose bytes arrived with it has queued its item too, and sends them all
(at most ``MAX_BATCH``; the rest start the next call) through ``call``. Each waiter gets its own reply; a
reply that is an exception fails that waiter alone; an error of the call reaches every waiter of it.

A batcher with ``SERIAL`` set has at most one call out at a time: what is queued while a call is out goes
in the next call, sent when that one returns (requests that arrive one per turn, as clients answered one
after another come back, then share a call instead of making one each).
"""

from __future__ import annotations

import asyncio
import weakref
from typing import Generic, TypeVar

Item = TypeVar("Item")
Reply = TypeVar("Reply")


class LoopBatcher(Generic[Item, Reply]):
    """One per event loop (``of_loop``); subclasses say how a batch is sent (``call``)."""

    MAX_BATCH = 256
    SERIAL = False  # at most one call out at a time (see the module docstring)
    what = "items"  # for the error a short reply raises

    def __init__(self) -> None:
        self.pending: list[tuple[Item, asyncio.Future[Reply]]] = []
        self.tasks: set[asyncio.Task[None]] = set()  # the loop keeps only weak references to tasks
        self.out = False  # a SERIAL batcher's call is out (or about to be sent)

    @classmethod
    def of_loop(cls) -> LoopBatcher[Item, Reply]:
        """The running event loop's batcher of this class (a server process has one loop; tests run each
        request in a loop of its own)."""
        loop = asyncio.get_running_loop()
        batchers = _per_loop.get(cls)
        if batchers is None:
            batchers = _per_loop[cls] = weakref.WeakKeyDictionary()
        found = batchers.get(loop)
        if found is None:
            found = batchers[loop] = cls()
        return found

    async def call(self, items: list[Item]) -> list[Reply | Exception]:
        """Send ``items`` in one round trip: a reply per item, in order (an exception for an item that
        failed alone)."""
        raise NotImplementedError

    def run(self, item: Item) -> asyncio.Future[Reply]:
        """Queue ``item``; the future is its reply (or the error of its call)."""
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self.pending.append((item, future))
        if len(self.pending) == 1 and not self.out:
            self._start()
        return future

    def _start(self) -> None:
        self.out = self.SERIAL
        task = asyncio.get_running_loop().create_task(self._send())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _send(self) -> None:
        batch, self.pending = self.pending[: self.MAX_BATCH], self.pending[self.MAX_BATCH :]
        if self.pending and not self.SERIAL:
            self._start()
        try:
            replies = await self.call([item for item, _ in batch])
            if len(replies) != len(batch):
                raise RuntimeError(f"{len(replies)} replies to a batch of {len(batch)} {self.what}")
        except Exception as exc:  # noqa: BLE001 (handed to each waiter, which answers for it)
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            self._next()
            return
        except BaseException:  # cancelled with its loop: so are its waiters
            self.out = False
            for _, future in batch:
                future.cancel()
            raise
        self._next()
        for (_, future), reply in zip(batch, replies, strict=True):
            if future.done():
                continue
            if isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    def _next(self) -> None:
        """A SERIAL batcher's call returned: send what was queued meanwhile."""
        if self.SERIAL:
            self.out = False
            if self.pending:
                self._start()


_per_loop: dict[type, weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopBatcher]] = {}  # type: ignore[type-arg]
