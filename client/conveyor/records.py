"""The records the client hands out: ``Service`` (one registered instance, as the REST API, the select endpoint
and the ``/ws/services/`` stream describe it) and ``WatchEvent`` (one change seen by a watch)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

HEALTHS = ("healthy", "degraded", "unhealthy", "unknown")
SERVICE_TYPES = ("source", "transform", "sink")


def parse_time(value: Any) -> datetime | None:
    """An ISO 8601 time from the registry (``...Z`` or ``+00:00``) as an aware UTC datetime; None if absent."""
    if not value:
        return None
    return datetime.fromisoformat(str(value).replace("Z", "+00:00")).astimezone(UTC)


@dataclass(frozen=True)
class Service:
    """One registered instance. ``health`` is the registry's effective health when the record was read
    (``unhealthy`` once the lease lapsed); ``weight`` the weight in effect (0 while drained)."""

    id: str
    name: str
    endpoint: str
    weight: int = 100
    health: str = "healthy"
    labels: Mapping[str, str] = field(default_factory=dict)
    type: str = ""
    group_id: str | None = None
    drained: bool = False
    lease_expires_at: datetime | None = None
    lease_duration: int | None = None
    revision: int | None = None  # the registry revision of the message that carried it (watches only)

    @classmethod
    def from_json(cls, body: Mapping[str, Any], revision: int | None = None) -> Service:
        return cls(
            id=str(body["service_id"]),
            name=str(body.get("service_name", "")),
            endpoint=str(body.get("endpoint", "")),
            weight=int(body.get("weight", 100)),
            health=str(body.get("health", "unknown")),
            labels=dict(body.get("labels") or {}),
            type=str(body.get("service_type", "")),
            group_id=body.get("group_id"),
            drained=bool(body.get("drained", False)),
            lease_expires_at=parse_time(body.get("lease_expires_at")),
            lease_duration=body.get("lease_duration"),
            revision=revision if revision is not None else body.get("revision"),
        )

    def lapsed(self, at: datetime | None = None) -> bool:
        """Whether the lease known from this record has run out at ``at`` (now): the registry then reads the
        service as unhealthy, whether or not it has said so yet."""
        if self.lease_expires_at is None:
            return False
        return self.lease_expires_at <= (at or datetime.now(UTC))

    def same_state(self, other: Service) -> bool:
        """Equal in everything a consumer acts on: all but the lease deadline (heartbeats move it silently)
        and the revision."""
        return (self.name, self.endpoint, self.weight, self.health, dict(self.labels), self.type) == (
            other.name,
            other.endpoint,
            other.weight,
            other.health,
            dict(other.labels),
            other.type,
        ) and (self.group_id, self.drained) == (other.group_id, other.drained)


@dataclass(frozen=True)
class WatchEvent:
    """One change of one service, as a watch delivers it.

    ``type`` is the stream's: ``service.registered`` (always the first event of a service a watcher sees),
    ``service.updated`` (an operator's drain, undrain or weight, or any other change of the record),
    ``service.health`` or ``service.deregistered`` (``service`` is then None and ``reason`` says why:
    ``deregistered``, ``expired``, or ``absent`` when a reconnect's snapshot no longer had it).
    ``resync`` marks events computed from the snapshot of a reconnect rather than pushed by the registry.
    """

    type: str
    service_id: str
    service: Service | None
    revision: int | None = None
    resync: bool = False
    reason: str | None = None
