"""The per-service revision that orders every state of one service a `/ws/services/` watcher can see.

A service's revision is derived on every read from what the database and Redis hold, never stored whole:

    revision = 2 * (stored + max(0, recoveries - recoveries_seen)) + lapsed

- ``stored`` (``Service.revision``): taken from the registry's counter at every persisted change
  (registration, health change, an operator's drain or weight), committed with that change, and always
  above what the service's revision was just before (``reregister.take_revision``).
- ``recoveries`` (Redis, next to the lease deadline): how many times a heartbeat, or an outage's grace,
  renewed the lease after it had lapsed. The heartbeat script counts it in the same step that renews.
- ``recoveries_seen`` (``Service.recoveries_seen``): that count when ``stored`` was taken.
- ``lapsed``: the lease deadline is at or before the instant of the read, as for the effective health.

So a lapse (+1), a recovery (+2 over the lapsed state) and a persisted change (a new ``stored`` above the
old value) each give the service a strictly higher revision, and a snapshot computes, for the state it
shows, the same revision the event for that state carries. A removal's event (deregistered or expired)
takes one more revision from the counter, which a later registration of the same id exceeds.

Pure functions; no Django, no Redis.
"""

from __future__ import annotations

# Added to a service's recovery count when its lease entry is recreated from the database (Redis lost
# it): the recoveries counted since the last persisted change are unknown then, and the revision must
# not go back. Far more recoveries than any service makes between two persisted changes.
RESTORE_JUMP = 1 << 20


def base_of(stored: int, recoveries_seen: int, recoveries: int | None) -> int:
    """The revision's persisted part plus the recoveries since it was taken (``recoveries`` None: unknown,
    none counted)."""
    if recoveries is None:
        return stored
    return stored + max(0, recoveries - recoveries_seen)


def revision_of(stored: int, recoveries_seen: int, recoveries: int | None, lapsed: bool) -> int:
    """The revision of a service's state as read: even while its lease holds, odd once it has lapsed."""
    return 2 * base_of(stored, recoveries_seen, recoveries) + (1 if lapsed else 0)


def removal_revision(taken: int) -> int:
    """The revision of a ``service.deregistered`` event, from a value taken for it from the counter."""
    return 2 * taken
