"""The service lifecycle log: the one module that writes ``ServiceEvent`` rows, and the actors they name.

Domain code (``registry.leases``) calls ``record`` inside the transaction of the change it records, so
a change and its history row commit or roll back together. Who acted is explicit where the caller knows
it (a token, a leader job's term); an operator acting in the admin is taken from the request, which
``OperatorMiddleware`` puts in a context variable for the request's duration (as django-auditlog's
middleware does), so admin code needs no extra argument to be attributed.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.urls import reverse
from django.utils import timezone

from .models import ActorKind, ServiceEvent, ServiceEventKind

Kind = ServiceEventKind


@dataclass(frozen=True)
class Actor:
    """Who made a change: an API token (its name), an operator (username) or a leader job and its term."""

    kind: str
    name: str

    @classmethod
    def token(cls, token: Any) -> Actor:
        return cls(ActorKind.TOKEN, getattr(token, "name", None) or "unknown token")

    @classmethod
    def operator(cls, username: str) -> Actor:
        return cls(ActorKind.OPERATOR, username or "unknown operator")

    @classmethod
    def leader_job(cls, run: Any, job: str) -> Actor:
        """From the LeaderJobRun a fenced transaction yields; None (an unfenced call, as tests make): no term."""
        if run is None:
            return cls(ActorKind.LEADER, f"leader job {job} (unfenced)")
        return cls(ActorKind.LEADER, f"leader job {run.job} term {run.term}")


_operator: contextvars.ContextVar[Actor | None] = contextvars.ContextVar("registry_operator", default=None)


def current_operator() -> Actor | None:
    """The operator acting in this request (OperatorMiddleware, or ``acting_as``), if any."""
    return _operator.get()


def actor_or_operator(by: Actor | None) -> Actor:
    """``by`` if the caller named an actor, else the operator of the current admin request."""
    if by is not None:
        return by
    return current_operator() or Actor.operator("")


@contextmanager
def acting_as(actor: Actor | None) -> Iterator[None]:
    """Attribute the changes made inside the block to ``actor`` (an operator)."""
    reset = _operator.set(actor)
    try:
        yield
    finally:
        _operator.reset(reset)


class OperatorMiddleware:
    """For requests to the admin by a signed-in staff user, make that user the operator of every change
    the request makes. Other requests (the API, authenticated by token) are left alone."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response
        self._prefix: str | None = None

    def __call__(self, request: HttpRequest) -> HttpResponse:
        if self._prefix is None:
            self._prefix = reverse("admin:index")
        user = getattr(request, "user", None)
        if not request.path.startswith(self._prefix) or user is None or not user.is_authenticated:
            return self.get_response(request)
        with acting_as(Actor.operator(user.get_username())):
            return self.get_response(request)


def _iso(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    return value


def diff(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, list[Any]]:
    """``{field: [before, after]}`` for every field whose value differs (missing reads as None)."""
    return {
        name: [_iso(before.get(name)), _iso(after.get(name))]
        for name in sorted({*before, *after})
        if before.get(name) != after.get(name)
    }


# The fields of a service its history shows the change of.
TRACKED = (
    "service_name",
    "service_type",
    "endpoint",
    "labels",
    "health",
    "group_id",
    "weight",
    "registered_weight",
    "operator_weight",
    "drained",
    "lease_duration",
    "deregister_after",
)


def snapshot(service: Any) -> dict[str, Any]:
    """The tracked fields of a service as they are now (before a change is applied, or after)."""
    return {name: getattr(service, name) for name in TRACKED}


def record(
    service_id: str,
    service_name: str,
    kind: str,
    actor: Actor,
    change: Mapping[str, Any],
    *,
    at: datetime | None = None,
    revision: int | None = None,
) -> ServiceEvent:
    """Write one lifecycle row. Call it inside the transaction of the change, so both commit together."""
    return ServiceEvent.objects.create(
        service_id=service_id,
        service_name=service_name,
        kind=kind,
        actor_kind=actor.kind,
        actor=actor.name[:255],
        change=dict(change),
        at=at or timezone.now(),
        revision=revision,
    )


def record_many(rows: list[ServiceEvent]) -> None:
    """Write several lifecycle rows in one statement (a leader scan's lapses and recoveries)."""
    if rows:
        ServiceEvent.objects.bulk_create(rows)


def event(
    service: Any, kind: str, actor: Actor, change: Mapping[str, Any], at: datetime, revision: int | None
) -> ServiceEvent:
    """An unsaved row for ``record_many``."""
    return ServiceEvent(
        service_id=service.service_id,
        service_name=service.service_name,
        kind=kind,
        actor_kind=actor.kind,
        actor=actor.name[:255],
        change=dict(change),
        at=at,
        revision=revision,
    )


def prune(now: datetime, keep_days: int | None = None, batch: int | None = None) -> int:
    """Delete one batch of lifecycle rows older than ``keep_days`` (REGISTRY_HISTORY_DAYS); how many.

    Deleting by primary keys taken in a bounded subquery keeps each statement (and its locks) small,
    however much history built up; the caller loops while there was work.
    """
    keep_days = settings.REGISTRY_HISTORY_DAYS if keep_days is None else keep_days
    batch = batch or settings.REGISTRY_HISTORY_PRUNE_BATCH
    cutoff = now - timedelta(days=keep_days)
    ids = list(ServiceEvent.objects.filter(at__lt=cutoff).order_by("at").values_list("pk", flat=True)[:batch])
    if not ids:
        return 0
    deleted, _ = ServiceEvent.objects.filter(pk__in=ids).delete()
    return deleted
