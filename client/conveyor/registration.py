"""The registration handle (sync): registers a service, keeps its lease with heartbeats from a background
thread, reports health changes at once, tells the application when the lease may have lapsed, and
deregisters on close (or SIGTERM, opt-in). The decisions are ``_registration_state``'s; this module runs them
on one worker thread per handle, which makes every request, so none overlaps another of the same handle.

    with reg.register("orders-1", name="orders", type="source", endpoint="10.0.0.5:8080") as handle:
        ...                                   # serve; handle.set_health("degraded") when it is so

Lease loss: ``on_lease_lost(handle)`` is called when no heartbeat or registration has succeeded for longer
than the lease (counted from when the last successful one was sent): the registry may now read the service
as ``unhealthy``, and remove it once ``deregister_after`` passes too. The handle keeps trying; when a request
succeeds again (a heartbeat, or a registration after a 404) ``on_lease_recovered(handle)`` is called, and a
later lapse calls ``on_lease_lost`` again: the calls alternate. Callbacks run one at a time, in order, on a
thread shared by every handle of the process, never on the heartbeat thread: a slow callback delays other
callbacks, not heartbeats.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from . import _flows, errors
from ._registration_state import (
    CLOSED,
    CLOSING,
    RUNNING,
    STOPPED,
    Exit,
    HandleBase,
    Send,
    Wait,
)
from ._signals import Chain, SigtermHook

log = logging.getLogger("conveyor.registration")

Callback = Callable[["Registration"], Any]


class _CallbackThread:
    """One daemon thread per process that runs handles' callbacks in the order they were queued."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[Callback, Registration]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, callback: Callback, handle: Registration) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="conveyor-callbacks", daemon=True)
                self._thread.start()
        self._queue.put((callback, handle))

    def _run(self) -> None:
        while True:
            callback, handle = self._queue.get()
            try:
                callback(handle)
            except Exception:
                log.exception("callback %r of the registration of %s failed", callback, handle.service_id)


_callbacks = _CallbackThread()


class Registration(HandleBase):
    """A registered service kept alive by heartbeats. Built by ``Registry.register``, which starts it.

    Attributes worth reading: ``health`` (what is reported), ``lease_lost``, ``error`` (why it stopped:
    401/403/400; None while fine), ``last_error`` (the newest error, transient ones included), ``service``
    (the record the last registration returned), ``expires_at`` (the registry's lease deadline as last
    told), ``state`` (``running``, ``stopped``, ``closing``, ``closed``).
    """

    def _setup(self) -> None:
        # Re-entrant: the SIGTERM handler runs close() in the main thread, possibly inside one of our own
        # short critical sections; waits go through the condition, which releases every level.
        self._cond = threading.Condition(threading.RLock())
        self._worker: threading.Thread | None = None
        self._worker_done = False

    # --- life cycle --------------------------------------------------------------------------

    def start(self) -> Registration:
        """Register now (raising the typed error if the registry refuses or cannot be reached), then
        heartbeat in the background. Idempotent."""
        with self._cond:
            if self._state.phase != RUNNING:
                raise RuntimeError("this registration handle was closed; ask Registry.register for a new one")
            if self._started:
                return self
            self._started = True
            step = self._state.next_step(time.monotonic())
        assert isinstance(step, Send)
        if self._handle_signals:  # first: outside the main thread this refuses, before anything is registered
            self._signals = SigtermHook(self._on_sigterm)
        sent_at = time.monotonic()
        try:
            answer = _flows.send(self._transport, step.request)
        except errors.ConveyorError:
            with self._cond:
                self._state.phase = CLOSED
            if self._signals is not None:
                self._signals.remove()
            raise
        with self._cond:
            self._state.succeeded(step, answer, sent_at, time.monotonic())
        self._worker = threading.Thread(target=self._run, name=f"conveyor-heartbeat-{self.service_id}", daemon=True)
        self._worker.start()
        return self

    def close(self) -> None:
        """Stop heartbeating, wait for a request in flight to finish, then deregister (a 404 is fine: it is
        gone). Idempotent; safe from any thread and from a signal handler. Nothing is sent for this handle
        after it returns, and it never registers again."""
        with self._cond:
            if self._state.phase == CLOSED:
                return
            if self._state.phase == CLOSING:
                self._cond.wait_for(lambda: self._state.phase == CLOSED)
                return
            self._state.close()
            self._cond.notify_all()
            if self._worker is not None:
                # Not join(): the worker needs the lock to finish, and wait_for releases it (every level).
                self._cond.wait_for(lambda: self._worker_done)
            must_deregister = self._started and self._state.ever_sent_register
        try:
            if must_deregister:
                _flows.run(self._state.deregister(), self._transport)
        finally:
            with self._cond:
                self._state.phase = CLOSED
                self._cond.notify_all()
            if self._signals is not None:
                self._signals.remove()

    def _on_sigterm(self, chain: Chain) -> None:
        try:
            self.close()
        finally:
            chain()

    def __enter__(self) -> Registration:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- health ------------------------------------------------------------------------------

    def set_health(self, health: str, *, wait: bool = True, timeout: float | None = None) -> bool:
        """Report ``health`` (healthy, degraded, unhealthy, unknown) now, not at the next heartbeat. Every later
        heartbeat carries it too. With ``wait``, returns True once the registry has it and False if the request
        failed or ``timeout`` (default: the registry timeout) passed; it is retried with the heartbeats."""
        with self._cond:
            if self._state.phase in (CLOSING, CLOSED):
                raise RuntimeError("this registration handle is closed")
            seq = self._state.set_health(health, time.monotonic())
            self._cond.notify_all()
            if not wait:
                return False
            self._cond.wait_for(
                lambda: self._state.health_settled(seq) is not None,
                timeout=self._timeout if timeout is None else timeout,
            )
            return bool(self._state.health_settled(seq))

    # --- the worker --------------------------------------------------------------------------

    def _notify(self, notices: list[str]) -> None:
        for callback in self._callbacks_for(notices):
            _callbacks.submit(callback, self)

    def _run(self) -> None:
        state = self._state
        try:
            while True:
                with self._cond:
                    now = time.monotonic()
                    self._notify(state.tick(now))
                    step = state.next_step(now)
                    if isinstance(step, Exit):
                        return
                    if isinstance(step, Wait):
                        self._cond.wait(None if step.until is None else max(0.0, step.until - now))
                        continue
                sent_at = time.monotonic()
                try:
                    answer = _flows.send(self._transport, step.request)
                except Exception as exc:  # noqa: BLE001 - whatever went wrong, the answer is: retry later
                    if not isinstance(exc, errors.ConveyorError):
                        exc = errors.ConveyorError(f"{type(exc).__name__}: {exc}")
                    with self._cond:
                        notices = state.failed(step, exc, time.monotonic())
                        if state.phase == STOPPED:
                            log.error("registration of %s stopped: %s", self.service_id, exc)
                        self._cond.notify_all()
                else:
                    with self._cond:
                        notices = state.succeeded(step, answer, sent_at, time.monotonic())
                        self._cond.notify_all()
                self._notify(notices)
        except Exception:  # a bug must not leave close() waiting forever
            log.exception("the heartbeat thread of %s failed", self.service_id)
        finally:
            with self._cond:
                self._worker_done = True
                self._cond.notify_all()
