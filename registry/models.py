"""Registry records: services, their labels (indexed for selectors) and API tokens.

The lease deadline a heartbeat renews lives in Redis (see ``registry.lease_store``);
``Service.lease_expires_at`` is the deadline as of the last persisted state change and
is what reads fall back to when Redis has no entry for the service.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from django.db import models
from django.db.models import Q

from . import revisions
from .id_sets import InIdSet


class ServiceType(models.TextChoices):
    SOURCE = "source", "source"
    TRANSFORM = "transform", "transform"
    SINK = "sink", "sink"


class Health(models.TextChoices):
    HEALTHY = "healthy", "healthy"
    DEGRADED = "degraded", "degraded"
    UNHEALTHY = "unhealthy", "unhealthy"
    UNKNOWN = "unknown", "unknown"


def hash_token(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class ApiToken(models.Model):
    """An API principal. Only the SHA-256 of its key is stored; the key is shown once, at creation."""

    name = models.CharField(max_length=128, unique=True)
    key_hash = models.CharField(max_length=64, unique=True, editable=False)
    key_prefix = models.CharField(
        max_length=12, editable=False, help_text="First characters of the key, to recognise it."
    )
    is_staff = models.BooleanField(
        default=False, help_text="Staff tokens may change every service, not only their own."
    )
    is_active = models.BooleanField(default=True, help_text="Inactive tokens are refused (401).")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        verbose_name = "API token"
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    # DRF treats request.user as the principal; a token is always authenticated.
    is_authenticated = True
    is_anonymous = False

    @staticmethod
    def generate_key() -> str:
        return "cr_" + secrets.token_urlsafe(32)

    def set_key(self, key: str) -> None:
        self.key_hash = hash_token(key)
        self.key_prefix = key[:10]

    def may_change(self, service: Service) -> bool:
        return self.is_staff or service.owner_id == self.pk

    def may_change_member(self, member: Any) -> bool:
        """For a consumer-group member (groups.models.GroupMember): staff, or the token that joined it."""
        return self.is_staff or member.owner_id == self.pk


class ServiceQuerySet(models.QuerySet["Service"]):
    def matching(self, selector: dict[str, str]) -> ServiceQuerySet:
        """Services carrying every ``key=value`` of the selector.

        Each pair is a range of the covering (key, value, name, service) index of ServiceLabel, read once
        per query, not a probe per service row; the ranges are intersected in one ``INTERSECT`` (on 10,000
        services, two pairs and 834 matches, about a third cheaper on SQLite than an ``IN`` per pair)."""
        labels = ServiceLabel.objects
        ranges = [labels.filter(key=key, value=value).values("service_id") for key, value in selector.items()]
        if not ranges:
            return self
        return self.filter(pk__in=ranges[0].intersection(*ranges[1:]) if len(ranges) > 1 else ranges[0])

    def lapsed(self, lapsed_ids: Sequence[str]) -> ServiceQuerySet:
        """The services among ``lapsed_ids`` (the lease store's lapsed leases), sent as one parameter."""
        return self.filter(InIdSet("pk", lapsed_ids))

    def live(self, lapsed_ids: Sequence[str]) -> ServiceQuerySet:
        """The services not among ``lapsed_ids``."""
        return self.filter(~Q(InIdSet("pk", lapsed_ids))) if lapsed_ids else self

    def with_effective_health(self, health: str, lapsed_ids: Sequence[str]) -> ServiceQuerySet:
        """Filter on effective health, given the ids whose lease has lapsed (from the lease store).

        However many ids there are, they are one SQL parameter (registry.id_sets)."""
        if health == Health.UNHEALTHY and lapsed_ids:
            return self.filter(Q(health=Health.UNHEALTHY) | Q(InIdSet("pk", lapsed_ids)))
        return self.filter(health=health).live(lapsed_ids)


class Service(models.Model):
    service_id = models.CharField(max_length=128, primary_key=True)
    service_name = models.CharField(max_length=128, db_index=True)
    service_type = models.CharField(max_length=16, choices=ServiceType.choices, db_index=True)
    endpoint = models.CharField(max_length=300)
    labels = models.JSONField(default=dict, blank=True)
    health = models.CharField(
        "reported health",
        max_length=16,
        choices=Health.choices,
        default=Health.HEALTHY,
        help_text="Health last reported by the service; a lapsed lease reads as unhealthy whatever this says.",
    )
    group_id = models.CharField(max_length=128, null=True, blank=True, db_index=True)
    weight = models.PositiveSmallIntegerField(
        default=100,
        help_text="Weight in effect: 0 while drained, else the operator's weight if set, else the registered one.",
    )
    registered_weight = models.PositiveSmallIntegerField(default=100, help_text="0..1000, as the service registered.")
    operator_weight = models.PositiveSmallIntegerField(
        null=True,
        blank=True,
        help_text="0..1000 set by an operator; overrides the registered weight, also across re-registrations, "
        "until an operator clears it. Empty: no override.",
    )
    drained = models.BooleanField(
        default=False, help_text="Drained by an operator: never selected, also after re-registering, until undrained."
    )
    lease_duration = models.PositiveIntegerField(help_text="Seconds a heartbeat keeps the lease.")
    deregister_after = models.PositiveIntegerField(help_text="Seconds after the lease lapses before removal.")
    registered_at = models.DateTimeField()
    lease_expires_at = models.DateTimeField(
        db_index=True, help_text="Deadline at the last persisted change; heartbeats move it in Redis."
    )
    owner = models.ForeignKey(ApiToken, null=True, blank=True, on_delete=models.SET_NULL, related_name="services")
    revision = models.PositiveBigIntegerField(
        default=0, help_text="Registry revision of the last persisted change (registry.revisions)."
    )
    recoveries_seen = models.PositiveBigIntegerField(
        default=0, help_text="The lease's recovery count in Redis when the revision was taken (registry.revisions)."
    )

    objects = ServiceQuerySet.as_manager()

    # Set by registry.leases.attach_live_leases() from Redis for the records being read.
    live_expires_at: datetime | None = None
    live_recoveries: int | None = None

    class Meta:
        ordering = ["service_name", "service_id"]
        # The list's order: a page is a walk of this index, no sort of every match.
        indexes = [models.Index(fields=["service_name", "service_id"], name="service_name_id")]

    def __str__(self) -> str:
        return f"{self.service_name}/{self.service_id}"

    @property
    def expires_at(self) -> datetime:
        return self.live_expires_at or self.lease_expires_at

    @property
    def last_heartbeat(self) -> datetime:
        return self.expires_at - timedelta(seconds=self.lease_duration)

    def weight_in_effect(self) -> int:
        """Operator intent first: a drain, then an operator's weight, then the service's own."""
        if self.drained:
            return 0
        return self.operator_weight if self.operator_weight is not None else self.registered_weight

    def effective_health(self, now: datetime) -> str:
        """A lapsed lease reads as unhealthy from the instant it lapses, whatever was reported."""
        return Health.UNHEALTHY if self.expires_at <= now else self.health

    def effective_revision(self, now: datetime) -> int:
        """The revision of the state read at ``now`` (registry.revisions): odd once the lease has lapsed."""
        return revisions.revision_of(self.revision, self.recoveries_seen, self.live_recoveries, self.expires_at <= now)


class ServiceLabel(models.Model):
    """One label of a service, so selectors are indexed equality lookups on any database.

    The row carries its service's name (written with it by every registration, the only writer of either),
    so that a key=value pair's index range is in the service list's order (name, id): a selector's matches
    come in that order from the label index alone (``registry.listing.selector_ids``), without reading or
    sorting service rows."""

    service = models.ForeignKey(Service, on_delete=models.CASCADE, related_name="label_rows")
    service_name = models.CharField(max_length=128)
    key = models.CharField(max_length=63)
    value = models.CharField(max_length=256)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["service", "key"], name="unique_label_key_per_service")]
        # Covering: a selector's key=value pair is one index range that yields the service ids in list order.
        indexes = [models.Index(fields=["key", "value", "service_name", "service"], name="label_pair_in_list_order")]


class LeaderTerm(models.Model):
    """The current leadership term per leadership name; ``term`` is the fencing token."""

    name = models.CharField(max_length=128, primary_key=True)
    term = models.PositiveBigIntegerField(default=0)
    holder = models.CharField(max_length=255, blank=True)
    expires_at = models.DateTimeField(null=True, blank=True, help_text="Lock validity as last reported by the holder.")
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name = "leader"

    def __str__(self) -> str:
        return f"{self.name}: term {self.term} ({self.holder})"


class LeaderTermHistory(models.Model):
    """Every term ever granted: who won it and when."""

    name = models.CharField(max_length=128)
    term = models.PositiveBigIntegerField()
    holder = models.CharField(max_length=255)
    started_at = models.DateTimeField()

    class Meta:
        ordering = ["name", "-term"]
        verbose_name = "leadership term"
        constraints = [models.UniqueConstraint(fields=["name", "term"], name="unique_term_per_name")]

    def __str__(self) -> str:
        return f"{self.name}: term {self.term} won by {self.holder}"


class LeaderJobRun(models.Model):
    """A leader job's committed run, written in the same fenced transaction as the job's changes."""

    name = models.CharField(max_length=128)
    term = models.PositiveBigIntegerField()
    holder = models.CharField(max_length=255)
    job = models.CharField(max_length=64)
    items = models.PositiveIntegerField(default=0, help_text="What the run changed (services expired, ...).")
    at = models.DateTimeField(db_index=True)

    class Meta:
        ordering = ["-id"]
        verbose_name = "leader job run"

    def __str__(self) -> str:
        return f"{self.job} (term {self.term}, {self.items} item(s))"


class LeaseStoreState(models.Model):
    """What the database knows of the Redis lease store's continuity (one row): the server run it last
    saw, and the latest time any process found Redis unreachable. Kept here, not in Redis, because a
    Redis that restarted from an old file or lost its data cannot tell what it missed."""

    id = models.PositiveSmallIntegerField(primary_key=True, default=1)
    run_id = models.CharField(max_length=64, blank=True, help_text="Redis run_id seen by the last grace check.")
    unreachable_at = models.DateTimeField(
        null=True, blank=True, help_text="Latest moment a request or job found Redis unreachable."
    )
    graced_at = models.DateTimeField(
        null=True, blank=True, help_text="The outage (unreachable_at) that the latest grace covered."
    )

    class Meta:
        verbose_name = "lease store state"

    def __str__(self) -> str:
        return f"lease store (run {self.run_id[:8] or '-'})"


class ServiceEventKind(models.TextChoices):
    REGISTERED = "registered", "registered"
    REREGISTERED = "re-registered", "re-registered"
    HEALTH_CHANGED = "health_changed", "health changed"
    DRAINED = "drained", "drained"
    UNDRAINED = "undrained", "undrained"
    WEIGHT_CHANGED = "weight_changed", "weight changed"
    LAPSED = "lapsed", "lease lapsed"
    RECOVERED = "recovered", "lease recovered"
    EXPIRED = "expired", "expired"
    DEREGISTERED = "deregistered", "deregistered"


class ActorKind(models.TextChoices):
    TOKEN = "token", "API token"
    OPERATOR = "operator", "operator"
    LEADER = "leader", "leader job"


class ServiceEvent(models.Model):
    """One change in a service's life (registry.lifecycle writes them). Keyed by the service id, not a
    foreign key: the history outlives the service row, until the prune job forgets it by age."""

    service_id = models.CharField(max_length=128)
    service_name = models.CharField(max_length=128)
    kind = models.CharField(max_length=16, choices=ServiceEventKind.choices)
    at = models.DateTimeField()
    actor_kind = models.CharField(max_length=16, choices=ActorKind.choices)
    actor = models.CharField(max_length=255, help_text="Token name, operator username, or 'leader job <job> term <n>'.")
    change = models.JSONField(default=dict, blank=True, help_text="What changed: field -> [before, after].")
    revision = models.PositiveBigIntegerField(
        null=True, blank=True, help_text="The service's revision for this state (registry.revisions)."
    )

    class Meta:
        ordering = ["-at", "-id"]
        verbose_name = "service lifecycle event"
        indexes = [
            models.Index(fields=["service_id", "-at"], name="service_event_service_at"),
            models.Index(fields=["kind", "-at"], name="service_event_kind_at"),
            models.Index(fields=["service_name", "-at"], name="service_event_name_at"),
            models.Index(fields=["at"], name="service_event_at"),
        ]

    def __str__(self) -> str:
        return f"{self.service_id}: {self.get_kind_display()} by {self.actor}"
