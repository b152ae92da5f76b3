"""Choosing an instance of a service (sync), mirroring the seed's ``LoadBalancer``.

- ``local=False`` (default): every ``select()`` asks the registry's ``/api/v1/balancer/select/``; round-robin
  and weighted rotations are shared with every other caller.
- ``local=True``: the balancer follows ``/ws/services/?name=...`` on a background thread (``ServiceWatch``)
  and chooses in-process with ``conveyor.strategies``, the module the server uses, so a hot caller makes no
  request per selection; rotations are then this balancer's own. A lapsed lease is ineligible at once, before
  the registry's event (see ``_selection``).

Both raise the same typed errors: ``ServiceNotFound`` (no instance registered under the name),
``NoInstanceAvailable`` (instances exist, none healthy or degraded with a weight above 0), ``Unauthorized``,
``Forbidden``, ``InvalidRequest`` (unknown strategy, ``hash`` without a key), ``Unavailable``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

from . import _flows, errors
from ._backoff import Backoff
from ._selection import LocalPool, check_strategy, parse_selector
from .records import Service
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
        self._closed = threading.Event()
        self._error: errors.ConveyorError | None = None
        if not local:
            return
        self._lock = threading.Lock()
        self._pool = LocalPool(name, strategy, self.selector, stale_after)
        self._version = -1
        self._watch = ServiceWatch(registry, name)
        self._threads = [
            threading.Thread(target=self._follow, name=f"conveyor-balancer-watch-{name}", daemon=True),
            threading.Thread(target=self._refresh, name=f"conveyor-balancer-leases-{name}", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def select(self, key: str | None = None) -> Service:
        """One instance (a ``Service``); ``key`` is required by the ``hash`` strategy (same key, same instance
        while the pool is unchanged)."""
        if self._closed.is_set():
            raise RuntimeError("this balancer is closed")
        if not self.local:
            return _flows.run(_flows.select(self.name, self.strategy, self.selector, key), self._registry.transport)
        if self._version < 0 and not self._watch.wait_synced(self._registry.config.timeout):
            raise (
                self._watch.error
                or self._error
                or errors.Unavailable(f"no snapshot of {self.name!r} from the registry yet")
            )
        if self._error is not None:
            raise self._error
        with self._lock:
            self._follow_view()
            return self._pool.select(time.time(), key)

    def instances(self) -> list[Service]:
        """The instances a local balancer currently knows of (its name and selector), eligible or not."""
        if not self.local:
            raise RuntimeError("instances() is for local=True balancers")
        with self._lock:
            self._follow_view()
            return list(self._pool.records.values())

    def _follow_view(self) -> None:
        """Take the watch's view into the pool if it changed since the last look (under the lock)."""
        version, view = self._watch.view_if_changed(self._version)
        if view is not None:
            self._pool.set_view(view)
            self._version = version

    # --- local mode's threads ----------------------------------------------------------------

    def _follow(self) -> None:
        try:
            for _event in self._watch:
                pass  # the watch keeps the view; select() reads it when its version moved
        except errors.ConveyorError as exc:
            log.error("balancer %s: the registry refused the watch: %s", self.name, exc)
            self._error = exc
        except Exception:
            log.exception("balancer %s: the watch failed", self.name)
            self._error = errors.ConveyorError("the watch of the local balancer failed")

    def _refresh(self) -> None:
        backoff = Backoff(base=0.5, cap=5.0)
        while not self._closed.is_set():
            started = time.time()
            try:
                found = _flows.run(_flows.list_services(name=self.name), self._registry.transport)
            except (errors.Unauthorized, errors.Forbidden) as exc:
                self._error = exc
                return
            except Exception as exc:  # noqa: BLE001 - unreachable, 5xx, a closed transport: try again later
                log.debug("balancer %s: lease refresh failed: %s", self.name, exc)
                self._closed.wait(backoff.next())
                continue
            backoff.reset()
            with self._lock:
                self._pool.set_deadlines(found, started)
                period = self._pool.refresh_period()
            self._closed.wait(period)

    # --- life cycle --------------------------------------------------------------------------

    def close(self) -> None:
        self._closed.set()
        if self.local:
            self._watch.close()

    def __enter__(self) -> Balancer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
