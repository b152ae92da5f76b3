"""The registration handle's decisions, with no I/O, threads or clock of its own: what to send next and when,
what an answer or an error means, when the lease may have lapsed. ``registration.Registration`` (threads) and
``aio.registration.Registration`` (asyncio) drive the same ``RegistrationState``; every method takes ``now``
(a monotonic time in seconds).

The phases:

- ``running``: registering (at start and after a 404) or heartbeating at the server's interval;
- ``stopped``: a 401/403/400 ended it; nothing is sent any more, ``error`` says why (it still reports the
  lease lapse when the time comes, since nobody renews it);
- ``closing``/``closed``: ``close()`` was called. Nothing is decided after that: an answer that arrives
  later (a 404 to a heartbeat in flight included) changes nothing, so a closed handle never registers again.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from . import errors
from ._backoff import Backoff, jittered
from ._flows import Flow, Pause, RegistryLike, Request
from ._signals import SigtermHook
from .records import HEALTHS, SERVICE_TYPES, Service

log = logging.getLogger("conveyor.registration")

RUNNING, STOPPED, CLOSING, CLOSED = "running", "stopped", "closing", "closed"
LEASE_LOST, LEASE_RECOVERED = "lease_lost", "lease_recovered"


@dataclass(frozen=True)
class Spec:
    """What is registered: the body of ``POST /services/``."""

    service_id: str
    name: str
    type: str
    endpoint: str
    labels: Mapping[str, str] = field(default_factory=dict)
    lease: int = 30
    weight: int | None = None
    group_id: str | None = None
    deregister_after: int | None = None

    def __post_init__(self) -> None:
        if self.type not in SERVICE_TYPES:
            raise ValueError(f"type must be one of {', '.join(SERVICE_TYPES)}, got {self.type!r}")

    def body(self, health: str) -> dict[str, Any]:
        body: dict[str, Any] = {
            "service_id": self.service_id,
            "service_name": self.name,
            "service_type": self.type,
            "endpoint": self.endpoint,
            "labels": dict(self.labels),
            "lease_duration": self.lease,
            "health": health,
        }
        for key, value in (
            ("weight", self.weight),
            ("group_id", self.group_id),
            ("deregister_after", self.deregister_after),
        ):
            if value is not None:
                body[key] = value
        return body


def check_health(health: str) -> str:
    if health not in HEALTHS:
        raise ValueError(f"health must be one of {', '.join(HEALTHS)}, got {health!r}")
    return health


@dataclass(frozen=True)
class Send:
    """Send ``request`` now; ``register`` tells a registration from a heartbeat, ``health_seq`` which
    ``set_health`` it carries."""

    request: Request
    register: bool
    health_seq: int


@dataclass(frozen=True)
class Wait:
    until: float | None  # None: until woken (set_health, close)


@dataclass(frozen=True)
class Exit:
    pass


Step = Send | Wait | Exit

# Errors after which sending again cannot help: the handle stops and keeps the error.
FATAL = (errors.Unauthorized, errors.Forbidden, errors.InvalidRequest)


class RegistrationState:
    def __init__(self, spec: Spec, health: str = "healthy", *, timeout: float = 10.0, rng: random.Random | None = None):
        self.spec = spec
        self.timeout = timeout
        self.rng = rng or random.Random()
        self.phase = RUNNING
        self.health = check_health(health)
        self.health_seq = 0  # bumped by every set_health
        self.acked_health_seq = -1  # the newest health_seq the registry has answered 200 to
        self.failed_health_seq = -1  # the newest health_seq a failed request carried
        self.lease = float(spec.lease)
        self.interval = max(1.0, spec.lease / 3)  # until the registry says
        self.need_register = True
        self.ever_sent_register = False  # a registration may exist: close deregisters
        self.due_at = 0.0
        self.backoff = Backoff(base=0.25, cap=self.interval, rng=self.rng)
        self.last_ok: float | None = None  # when the last successful request was sent
        self.lease_lost = False
        self.error: errors.ConveyorError | None = None  # why it stopped
        self.last_error: errors.ConveyorError | None = None  # the newest error, transient ones included
        self.service: Service | None = None
        self.expires_at: str | None = None  # the registry's lease deadline, as it said
        self.registrations = 0
        self.heartbeats = 0

    # --- what to do -------------------------------------------------------------------------

    def lapse_at(self) -> float | None:
        """When the lease may lapse: the lease after the last success was sent (the registry started its
        lease no earlier), unless that was already reported."""
        if self.last_ok is None or self.lease_lost:
            return None
        return self.last_ok + self.lease

    def tick(self, now: float) -> list[str]:
        """Notices due at ``now``: ``LEASE_LOST`` once the lease may have lapsed (once per lapse)."""
        lapse = self.lapse_at()
        if lapse is not None and now >= lapse and self.phase in (RUNNING, STOPPED):
            self.lease_lost = True
            return [LEASE_LOST]
        return []

    def next_step(self, now: float) -> Step:
        if self.phase in (CLOSING, CLOSED):
            return Exit()
        lapse = self.lapse_at()
        if self.phase == STOPPED:
            return Wait(lapse) if lapse is not None else Exit()
        if now >= self.due_at:
            return self._send()
        return Wait(self.due_at if lapse is None else min(self.due_at, lapse))

    def _send(self) -> Send:
        if self.need_register:
            self.ever_sent_register = True
            request = Request(
                "POST", "services/", json=self.spec.body(self.health), resource="service", timeout=self.timeout
            )
            return Send(request, True, self.health_seq)
        # A heartbeat longer than the interval is worth less than the next one: it times out by then.
        timeout = min(self.timeout, max(1.0, self.interval))
        request = Request(
            "POST",
            f"services/{self.spec.service_id}/heartbeat/",
            json={"health": self.health},
            resource="service",
            timeout=timeout,
        )
        return Send(request, False, self.health_seq)

    # --- what happened ----------------------------------------------------------------------

    def set_health(self, health: str, now: float) -> int:
        """Record a new health; it is sent at once (unless backing off: then with the next retry).
        Returns its sequence number for ``health_settled``."""
        self.health = check_health(health)
        self.health_seq += 1
        if self.backoff.attempts == 0:
            self.due_at = now
        return self.health_seq

    def health_settled(self, seq: int) -> bool | None:
        """True once the registry has health ``seq`` (or a later one), False if a request carrying it failed
        or the handle stopped, None while undecided."""
        if self.acked_health_seq >= seq:
            return True
        if self.failed_health_seq >= seq or self.phase != RUNNING:
            return False
        return None

    def succeeded(self, step: Send, answer: Any, sent_at: float, now: float) -> list[str]:
        if self.phase != RUNNING:
            return []  # closed (or stopped) meanwhile: an answer changes nothing any more
        self.backoff.reset()
        lease = (answer or {}).get("lease") or {}
        if lease.get("duration"):
            self.lease = float(lease["duration"])
        self.interval = float(lease.get("heartbeat_interval") or max(1.0, self.lease / 3))
        self.backoff.cap = max(self.backoff.base, self.interval)
        self.expires_at = lease.get("expires_at", self.expires_at)
        if step.register:
            self.need_register = False
            self.registrations += 1
            self.service = Service.from_json(answer)
        else:
            self.heartbeats += 1
        self.acked_health_seq = max(self.acked_health_seq, step.health_seq)
        self.last_ok = sent_at
        self.due_at = now + jittered(self.interval, self.rng)
        if self.health_seq > self.acked_health_seq:
            self.due_at = now  # the health changed while this was in flight
        if self.lease_lost:
            self.lease_lost = False
            return [LEASE_RECOVERED]
        return []

    def failed(self, step: Send, error: errors.ConveyorError, now: float) -> list[str]:
        if self.phase != RUNNING:
            return []  # above all: a 404 after close must not register again
        self.last_error = error
        self.failed_health_seq = max(self.failed_health_seq, step.health_seq)
        if isinstance(error, errors.NotFound) and not step.register:
            # The registry removed it (deregistered by someone, or expired): register again at once. If that
            # keeps happening it costs one registration per heartbeat interval, never a loop.
            self.need_register = True
            self.due_at = now
            return []
        if isinstance(error, FATAL):
            self.phase = STOPPED
            self.error = error
            return []
        delay = self.backoff.next()
        if isinstance(error, errors.RateLimited) and error.retry_after:
            delay = max(delay, error.retry_after)
        self.due_at = now + delay
        return []

    def close(self) -> None:
        if self.phase != CLOSED:
            self.phase = CLOSING

    def deregister(self) -> Flow[None]:
        """DELETE the service (a 404 means it is gone already); an unreachable registry is retried with backoff
        for about ``timeout`` seconds in all. Failures are kept in ``last_error`` and logged, never raised: the
        handle is closing either way."""
        backoff = Backoff(base=0.25, cap=2.0, rng=self.rng)
        waited = 0.0
        request = Request("DELETE", f"services/{self.spec.service_id}/", resource="service", timeout=self.timeout)
        while True:
            try:
                yield request
                return
            except errors.NotFound:
                return
            except errors.ConveyorError as exc:
                self.last_error = exc
                delay = backoff.next()
                if not isinstance(exc, errors.Unavailable) or waited + delay > self.timeout:
                    log.warning("could not deregister %s: %s", self.spec.service_id, exc)
                    return
                waited += delay
                yield Pause(delay)


class HandleBase:
    """What both registration handles share: their arguments, their ``RegistrationState`` and what they
    expose from it. Each driver adds its own machinery in ``_setup()``."""

    def __init__(
        self,
        registry: RegistryLike,
        service_id: str,
        *,
        name: str,
        type: str,
        endpoint: str,
        labels: Mapping[str, str] | None = None,
        lease: int = 30,
        health: str = "healthy",
        weight: int | None = None,
        group_id: str | None = None,
        deregister_after: int | None = None,
        on_lease_lost: Callable[[Any], Any] | None = None,
        on_lease_recovered: Callable[[Any], Any] | None = None,
        handle_signals: bool = False,
    ) -> None:
        self.service_id = service_id
        self._transport = registry.transport
        self._timeout = registry.config.timeout
        spec = Spec(service_id, name, type, endpoint, dict(labels or {}), lease, weight, group_id, deregister_after)
        self._state = RegistrationState(spec, health, timeout=self._timeout)
        self._callbacks_by_notice = {LEASE_LOST: on_lease_lost, LEASE_RECOVERED: on_lease_recovered}
        self._handle_signals = handle_signals
        self._signals: SigtermHook | None = None
        self._started = False
        self._setup()

    def _setup(self) -> None:
        raise NotImplementedError

    def _callbacks_for(self, notices: list[str]) -> list[Callable[[Any], Any]]:
        """The callbacks ``notices`` call for, in order (logged here, run by the driver)."""
        due = []
        for notice in notices:
            if notice == LEASE_LOST:
                log.warning("the lease of %s may have lapsed (last error: %s)", self.service_id, self._state.last_error)
            else:
                log.info("the lease of %s is renewed again", self.service_id)
            callback = self._callbacks_by_notice.get(notice)
            if callback is not None:
                due.append(callback)
        return due

    @property
    def state(self) -> str:
        """``running``, ``stopped`` (see ``error``), ``closing`` or ``closed``."""
        return self._state.phase

    @property
    def health(self) -> str:
        return self._state.health

    @property
    def lease_lost(self) -> bool:
        return self._state.lease_lost

    @property
    def error(self) -> errors.ConveyorError | None:
        """Why the handle stopped (401, 403, 400); None while it runs."""
        return self._state.error

    @property
    def last_error(self) -> errors.ConveyorError | None:
        """The newest error, transient ones included."""
        return self._state.last_error

    @property
    def service(self) -> Service | None:
        """The record the last registration returned."""
        return self._state.service

    @property
    def expires_at(self) -> str | None:
        """The lease deadline the registry last gave."""
        return self._state.expires_at

    @property
    def heartbeat_interval(self) -> float:
        return self._state.interval

    @property
    def registrations(self) -> int:
        """How many times it was registered (1, plus one per re-registration after a 404)."""
        return self._state.registrations

    @property
    def heartbeats(self) -> int:
        """Successful heartbeats so far."""
        return self._state.heartbeats

    def __repr__(self) -> str:
        return f"<Registration {self.service_id} {self._state.phase} health={self._state.health}>"
