"""The registration handle for asyncio: the same decisions as the sync one (``_registration_state``), driven by
one task per handle instead of a thread. See ``conveyor.registration`` for the behaviour; here:

    async with reg.register("orders-1", name="orders", type="source", endpoint="10.0.0.5:8080") as handle:
        ...
    handle = await reg.register(...)          # the same, closed with ``await handle.close()``

Callbacks (``on_lease_lost(handle)``, ``on_lease_recovered(handle)``) may be plain functions, called on the
event loop, or coroutine functions, run as tasks one after the other.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import Callable, Generator
from typing import Any

from .. import _flows, errors
from .._registration_state import (
    CLOSED,
    CLOSING,
    RUNNING,
    STOPPED,
    Exit,
    HandleBase,
    Send,
    Wait,
)
from .._signals import Chain, SigtermHook

log = logging.getLogger("conveyor.registration")

Callback = Callable[["Registration"], Any]


class Registration(HandleBase):
    """A registered service kept alive by heartbeats from a task; see ``conveyor.registration.Registration``."""

    def _setup(self) -> None:
        self._changed: asyncio.Condition | None = None
        self._task: asyncio.Task[None] | None = None
        self._callbacks: asyncio.Queue[Callback] | None = None
        self._callback_task: asyncio.Task[None] | None = None
        self._closed: asyncio.Event | None = None
        self._sigterm_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop  # set by start() when it installs the signal handler

    # --- life cycle --------------------------------------------------------------------------

    async def start(self) -> Registration:
        """Register now (raising the typed error if that fails), then heartbeat in a task. Idempotent."""
        if self._state.phase != RUNNING:
            raise RuntimeError("this registration handle was closed; ask Registry.register for a new one")
        if self._started:
            return self
        self._started = True
        self._changed = asyncio.Condition()
        self._closed = asyncio.Event()
        step = self._state.next_step(time.monotonic())
        assert isinstance(step, Send)
        if self._handle_signals:  # first: outside the main thread this refuses, before anything is registered
            self._loop = asyncio.get_running_loop()
            self._signals = SigtermHook(self._on_sigterm)
        sent_at = time.monotonic()
        try:
            answer = await _flows.asend(self._transport, step.request)
        except errors.ConveyorError:
            self._state.phase = CLOSED
            self._closed.set()
            if self._signals is not None:
                self._signals.remove()
            raise
        self._state.succeeded(step, answer, sent_at, time.monotonic())
        self._task = asyncio.create_task(self._run(), name=f"conveyor-heartbeat-{self.service_id}")
        return self

    async def close(self) -> None:
        """Stop heartbeating, wait for a request in flight, then deregister; never registers again after."""
        if self._state.phase == CLOSED:
            return
        if self._state.phase == CLOSING:
            assert self._closed is not None
            await self._closed.wait()
            return
        self._state.close()
        try:
            if self._task is not None:
                await self._wake()
                # The task finishes the request it may be making (a registration must not land after the
                # DELETE), then sees the handle closing and ends.
                await asyncio.shield(self._task)
            if self._started and self._state.ever_sent_register:
                await _flows.arun(self._state.deregister(), self._transport)
        finally:
            self._state.phase = CLOSED
            if self._closed is not None:
                self._closed.set()
            if self._callback_task is not None:
                self._callback_task.cancel()
            if self._signals is not None:
                self._signals.remove()
            if self._changed is not None:
                await self._wake()

    def _on_sigterm(self, chain: Chain) -> None:
        # A signal handler runs between two steps of the event loop's thread: close as a task, chain after.
        async def close_then_chain() -> None:
            try:
                await self.close()
            finally:
                chain()

        def schedule() -> None:
            self._sigterm_task = self._loop.create_task(close_then_chain())

        self._loop.call_soon_threadsafe(schedule)

    def __await__(self) -> Generator[Any, None, Registration]:
        return self.start().__await__()

    async def __aenter__(self) -> Registration:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- health ------------------------------------------------------------------------------

    async def set_health(self, health: str, *, wait: bool = True, timeout: float | None = None) -> bool:
        """Report ``health`` now; True once the registry has it (see the sync ``set_health``)."""
        if self._state.phase in (CLOSING, CLOSED) or self._changed is None:
            raise RuntimeError("this registration handle is not running")
        seq = self._state.set_health(health, time.monotonic())
        await self._wake()
        if not wait:
            return False
        async with self._changed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: self._state.health_settled(seq) is not None),
                    self._timeout if timeout is None else timeout,
                )
        return bool(self._state.health_settled(seq))

    # --- the task ----------------------------------------------------------------------------

    async def _wake(self) -> None:
        assert self._changed is not None
        async with self._changed:
            self._changed.notify_all()

    def _notify(self, notices: list[str]) -> None:
        for callback in self._callbacks_for(notices):
            if self._callbacks is None:
                self._callbacks = asyncio.Queue()
                self._callback_task = asyncio.create_task(self._run_callbacks())
            self._callbacks.put_nowait(callback)

    async def _run_callbacks(self) -> None:
        assert self._callbacks is not None
        while True:
            callback = await self._callbacks.get()
            try:
                result = callback(self)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                log.exception("callback %r of the registration of %s failed", callback, self.service_id)

    async def _run(self) -> None:
        state = self._state
        assert self._changed is not None
        try:
            while True:
                now = time.monotonic()
                self._notify(state.tick(now))
                step = state.next_step(now)
                if isinstance(step, Exit):
                    return
                if isinstance(step, Wait):
                    async with self._changed:
                        timeout = None if step.until is None else max(0.0, step.until - time.monotonic())
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._changed.wait(), timeout)
                    continue
                sent_at = time.monotonic()
                try:
                    answer = await _flows.asend(self._transport, step.request)
                except Exception as exc:  # noqa: BLE001 - whatever went wrong, the answer is: retry later
                    if not isinstance(exc, errors.ConveyorError):
                        exc = errors.ConveyorError(f"{type(exc).__name__}: {exc}")
                    notices = state.failed(step, exc, time.monotonic())
                    if state.phase == STOPPED:
                        log.error("registration of %s stopped: %s", self.service_id, exc)
                else:
                    notices = state.succeeded(step, answer, sent_at, time.monotonic())
                await self._wake()
                self._notify(notices)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("the heartbeat task of %s failed", self.service_id)
