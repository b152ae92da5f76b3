"""Registry events for `/ws/services/` watchers: service.registered, service.updated (an operator's drain or
weight), service.health, service.deregistered.

Each carries the service's ``revision`` (``registry.revisions``): strictly higher for every change of that
service a watcher can see, and the same number a snapshot shows for the same state.

Code on an event loop that makes changes through Django's sync thread (the batched registrations of
``registry.fast_register``) can ``collect`` the messages its commits publish and send them itself on the
loop (``send_collected``), so the sync thread never waits on the channel layer.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import redis
from channels.layers import get_channel_layer
from django.conf import settings
from django.utils import timezone

from .push import after_commit, channel_group, push_message, send_now
from .redis_client import get_redis

log = logging.getLogger(__name__)

# Per thread: the list the messages published there go to instead of the channel layer (``collect``).
_collecting = threading.local()

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
    groups = {*watch_groups(None), *watch_groups(service_name)}
    collected: list[tuple[str, dict[str, Any]]] | None = getattr(_collecting, "messages", None)
    if collected is not None:
        collected.extend((group, payload) for group in sorted(groups))
        return
    for group in groups:
        send_now(group, payload)


@contextmanager
def collect() -> Iterator[list[tuple[str, dict[str, Any]]]]:
    """Within the block, messages this thread publishes (after commit) are appended to the list yielded,
    as (group, payload), in order, instead of being sent: the caller sends them with ``send_collected``."""
    messages: list[tuple[str, dict[str, Any]]] = []
    _collecting.messages = messages
    try:
        yield messages
    finally:
        _collecting.messages = None


async def send_collected(messages: list[tuple[str, dict[str, Any]]]) -> None:
    """Send collected messages from the event loop, in order; as ``push.send_now``, a failed push is logged.
    With a layer that queues publishes in order (``publish_soon``), all but the last are queued and go out
    together with it, in one round trip; returns once the last is sent."""
    layer = get_channel_layer()
    queue = getattr(layer, "publish_soon", None)
    for index, (group, payload) in enumerate(messages):
        try:
            if queue is not None and index < len(messages) - 1:
                queue(group, push_message(payload))
            else:
                await layer.group_send(group, push_message(payload))
        except Exception:
            log.exception("push to %s failed", group)


def name_version_key(service_name: str) -> str:
    """Redis key of a service name's change counter: bumped by every change of a service of that name that
    an event announces, so a cache of that name's instances (balancer.selection) knows it is stale."""
    return f"{settings.REGISTRY_REDIS_PREFIX}name-version:{service_name}"


def services_version_key() -> str:
    """Redis key of the registry's change counter: bumped with every name's counter, so a reader of service
    list pages (registry.listing) knows whether anything changed while it read."""
    return f"{settings.REGISTRY_REDIS_PREFIX}services-version"


def services_membership_key() -> str:
    """Redis key of the registry's membership counter: bumped with the registry's counter by every change
    that can change which services a list filter matches, or their order (a registration, new or changed,
    and a removal), and not by a change of health, drain or weight; so registry.listing can keep which
    services a selector matches across those."""
    return f"{settings.REGISTRY_REDIS_PREFIX}services-membership"


# A counter Redis lost starts again at a random value, never at one a reader may have cached.
# KEYS: the names' counters, then the registry's. ARGV: a random start for each.
_BUMP_LUA = """
for i, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 0 then redis.call('SET', key, ARGV[i]) end
  redis.call('INCR', key)
end
"""


def _bump_name_versions(service_names: list[str], membership: bool = False) -> None:
    """Bump each name's counter and the registry's (and, with ``membership``, the membership counter), all
    in one script call."""
    keys = [name_version_key(name) for name in service_names] + [services_version_key()]
    if membership:
        keys.append(services_membership_key())
    get_redis().eval(_BUMP_LUA, len(keys), *keys, *(secrets.randbits(52) for _ in keys))


# Names whose bump after commit failed (Redis unreachable at that moment), retried until it succeeds or
# until every list a reader may have cached then has aged out (RETRY_FOR_SECONDS outlasts
# balancer.selection.MAX_AGE_SECONDS and registry.listing's, a test checks).
RETRY_FOR_SECONDS = 60.0
RETRY_INTERVAL_SECONDS = 0.2
_retry_lock = threading.Lock()
_retry_names: dict[str, float] = {}
_retry_membership = 0  # failed bumps of the membership counter not yet retried


def _bump_after_commit(service_names: list[str], membership: bool = False) -> None:
    global _retry_membership
    try:
        _bump_name_versions(service_names, membership)
    except (redis.RedisError, OSError):
        log.warning("name counters of %r not bumped after commit; retrying", service_names, exc_info=True)
        with _retry_lock:
            first = not _retry_names
            for name in service_names:
                _retry_names.setdefault(name, time.monotonic() + RETRY_FOR_SECONDS)
            _retry_membership += membership
        if first:
            threading.Thread(target=_retry_loop, name="name-counter-retry", daemon=True).start()


def _retry_loop() -> None:
    """Bump the pending names until Redis answers; names whose cached lists have all expired are dropped."""
    global _retry_membership
    while True:
        time.sleep(RETRY_INTERVAL_SECONDS)
        with _retry_lock:
            pending = dict(_retry_names)
            membership = _retry_membership
        try:
            _bump_name_versions(sorted(pending), membership > 0)
            done = list(pending)
            with _retry_lock:
                _retry_membership -= membership
        except (redis.RedisError, OSError):
            done = [name for name, give_up_at in pending.items() if time.monotonic() >= give_up_at]
        with _retry_lock:
            for name in done:
                _retry_names.pop(name, None)
            if not _retry_names:
                _retry_membership = 0  # given up with the names (or done)
                return


def names_changed(service_names: list[str], membership: bool = False) -> None:
    """Bump the names' counters now (inside the transaction) and again once it commits: a reader that
    reloaded in between, still seeing the old rows, reloads once more. A bump after commit that fails is
    retried in the background, so a list cached in between cannot outlive Redis's return by much.
    ``membership``: the change can change what a list filter matches (``services_membership_key``)."""
    if service_names:
        _bump_name_versions(service_names, membership)
        after_commit(lambda: _bump_after_commit(service_names, membership))


def name_changed(service_name: str) -> None:
    names_changed([service_name])


def service_registered(service: Any, previous_name: str | None = None) -> None:
    """``previous_name``: the name the service had before this re-registration (its old name's list changed too)."""
    services_registered([(service, previous_name)])


def services_registered(registered: list[tuple[Any, str | None]]) -> None:
    """``service_registered`` for each (service, previous name) of a batch, in order; each name's counter
    is bumped once for the whole batch."""
    names = {service.service_name for service, _ in registered}
    names |= {previous for _, previous in registered if previous}
    names_changed(sorted(names), membership=True)
    for service, _ in registered:
        body = service_payload(service)
        after_commit(lambda name=service.service_name, body=body: _publish("service.registered", name, body))


def service_updated(service: Any) -> None:
    """An operator changed the service (drain, undrain, weight): the whole record, as for a registration."""
    name_changed(service.service_name)
    body = service_payload(service)
    after_commit(lambda: _publish("service.updated", service.service_name, body))


def service_health(service: Any) -> None:
    name_changed(service.service_name)
    body = service_payload(service)
    after_commit(lambda: _publish("service.health", service.service_name, body))


def service_deregistered(service_id: str, service_name: str, reason: str, revision: int) -> None:
    names_changed([service_name], membership=True)
    body = {"revision": revision, "service_id": service_id, "service_name": service_name, "reason": reason}
    after_commit(lambda: _publish("service.deregistered", service_name, body))
