"""Registry signals: ``services_removed`` and ``lease_store_recovered`` for other apps, and keeping the
Redis token cache in step with ApiToken rows (a changed or deleted token is forgotten at once), and a
saved token's services' names marked changed, since their ``owner`` shows the token's name."""

from __future__ import annotations

import logging

import redis
from django.db import transaction
from django.db.models.signals import post_delete, post_save, pre_delete
from django.dispatch import Signal, receiver

from . import events, lease_store
from .models import ApiToken, Service
from .redis_client import get_redis

log = logging.getLogger(__name__)

# Sent after the commit that removed services: service_ids (list of str), owners (service id -> id of
# the token that owned it, or None), reason ("deregistered" or "expired"), now. The groups app removes
# those ids from their groups where the same token joined them.
services_removed = Signal()

# Sent by registry.outage after Redis came back (restarted, emptied, or unreachable for a while) and the
# lease entries were restored, before grace is granted: now, guard. The groups app restores member
# sessions that Redis lost.
lease_store_recovered = Signal()


def _forget(key_hash: str) -> None:
    try:
        lease_store.forget_token(get_redis(), key_hash)
    except redis.RedisError:
        # Cached tokens expire after lease_store.TOKEN_CACHE_SECONDS, which bounds how long
        # a revocation that could not reach Redis goes unnoticed.
        log.exception("could not drop token %s from the Redis cache", key_hash[:8])


@receiver(post_save, sender=ApiToken)
@receiver(post_delete, sender=ApiToken)
def forget_cached_token(sender, instance: ApiToken, created: bool = False, **kwargs) -> None:  # type: ignore[no-untyped-def]
    if created:
        return  # a new token has nothing cached yet
    # Now, so this change is seen at once; and again after commit, in case a heartbeat
    # re-cached the old row in between.
    _forget(instance.key_hash)
    transaction.on_commit(lambda: _forget(instance.key_hash))


@receiver(post_save, sender=ApiToken)
@receiver(pre_delete, sender=ApiToken)
def owned_names_changed(sender, instance: ApiToken, created: bool = False, **kwargs) -> None:  # type: ignore[no-untyped-def]
    """A saved token (renamed, say) or a deleted one (its services keep no owner) changes the ``owner`` its
    services show: the caches of their names' instances (balancer.selection) and of list pages
    (registry.listing) reload, as for any change of those services."""
    if created:
        return
    names = Service.objects.filter(owner=instance).values_list("service_name", flat=True).distinct()
    events.names_changed(sorted(names))
