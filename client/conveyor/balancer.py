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

from . import _flows, errors
from ._backoff import Backoff
from ._selection import BalancerBase
from .records import Service
from .watch import ServiceWatch

log = logging.getLogger("conveyor.balancer")


class Balancer(BalancerBase):
    _watch: ServiceWatch

    def _setup(self) -> None:
        self._closed = threading.Event()
        if not self.local:
            return
        self._guard = threading.Lock()
        self._watch = ServiceWatch(self._registry, self.name)
        for target, role in ((self._follow, "watch"), (self._refresh, "leases")):
            threading.Thread(target=target, name=f"conveyor-balancer-{role}-{self.name}", daemon=True).start()

    def select(self, key: str | None = None) -> Service:
        """One instance (a ``Service``); ``key`` is required by the ``hash`` strategy (same key, same instance
        while the pool is unchanged)."""
        if self._closed.is_set():
            raise RuntimeError("this balancer is closed")
        if not self.local:
            return _flows.run(_flows.select(self.name, self.strategy, self.selector, key), self._registry.transport)
        if self._version < 0 and not self._watch.wait_synced(self._registry.config.timeout):
            raise self._not_synced()
        return self._choose(key)

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
            self._closed.wait(self._deadlines(found, started))

    # --- life cycle --------------------------------------------------------------------------

    def close(self) -> None:
        self._closed.set()
        if self.local:
            self._watch.close()

    def __enter__(self) -> Balancer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
