"""Registry events for `/ws/services/` watchers: service.registered, service.updated (an operator's drain or
weight), service.health, service.deregistered.

Each carries the service's ``revision`` (``registry.revisions``): strictly higher for every change of that
service a watcher can see, and the same number a snapshot shows for the same state.
"""

from __future__ import annotations

import secrets
from datetime import datetime
from typing import Any

from django.conf import settings
from django.utils import timezone

from .push import after_commit, channel_group, send_now
from .redis_client import get_redis

ALL = "all"


def watch_groups(service_name: str | None) -> list[str]:
    return (
        [channel_group("services", ALL)] if service_name is None else [channel_group("services", "name", service_name)]
    )


def service_payload(service: Any, now: datetime | None = None) -> dict[str, Any]:
    """The service as read at ``now`` (its live lease attached): effective health and revision agree."""
    now = now or timezone.now()
    return {
        "revision": service.effective_revision(now),
        "service_id": service.service_id,
        "service_name": service.service_name,
        "service_type": service.service_type,
        "endpoint": service.endpoint,
        "labels": service.labels,
        "health": service.effective_health(now),
        "group_id": service.group_id,
        "weight": service.weight,
        "drained": service.drained,
        "operator_weight": service.operator_weight,
        "lease_expires_at": service.expires_at.isoformat().replace("+00:00", "Z"),
    }


def publish_now(event: str, service_name: str, body: dict[str, Any]) -> None:
    """Publish outside any transaction (for changes that write nothing, such as a lapsing lease)."""
    _publish(event, service_name, body)


def _publish(event: str, service_name: str, body: dict[str, Any]) -> None:
    payload = {"type": event, **body}
    for group in {*watch_groups(None), *watch_groups(service_name)}:
        send_now(group, payload)


def name_version_key(service_name: str) -> str:
    """Redis key of a service name's change counter: bumped by every change of a service of that name that
    an event announces, so a cache of that name's instances (balancer.selection) knows it is stale."""
    return f"{settings.REGISTRY_REDIS_PREFIX}name-version:{service_name}"


# A counter Redis lost starts again at a random value, never at one a reader may have cached.
_BUMP_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then redis.call('SET', KEYS[1], ARGV[1]) end
return redis.call('INCR', KEYS[1])
"""


def _bump_name_version(service_name: str) -> None:
    get_redis().eval(_BUMP_LUA, 1, name_version_key(service_name), secrets.randbits(52))


def _name_changed(service_name: str) -> None:
    """Bump the name's counter now (inside the transaction) and again once it commits: a reader that
    reloaded in between, still seeing the old rows, reloads once more."""
    _bump_name_version(service_name)
    after_commit(lambda: _bump_name_version(service_name))


def service_registered(service: Any, previous_name: str | None = None) -> None:
    """``previous_name``: the name the service had before this re-registration (its old name's list changed too)."""
    _name_changed(service.service_name)
    if previous_name and previous_name != service.service_name:
        _name_changed(previous_name)
    body = service_payload(service)
    after_commit(lambda: _publish("service.registered", service.service_name, body))


def service_updated(service: Any) -> None:
    """An operator changed the service (drain, undrain, weight): the whole record, as for a registration."""
    _name_changed(service.service_name)
    body = service_payload(service)
    after_commit(lambda: _publish("service.updated", service.service_name, body))


def service_health(service: Any) -> None:
    _name_changed(service.service_name)
    body = service_payload(service)
    after_commit(lambda: _publish("service.health", service.service_name, body))


def service_deregistered(service_id: str, service_name: str, reason: str, revision: int) -> None:
    _name_changed(service_name)
    body = {"revision": revision, "service_id": service_id, "service_name": service_name, "reason": reason}
    after_commit(lambda: _publish("service.deregistered", service_name, body))
