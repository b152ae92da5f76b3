"""The operator's overview on the admin index: services by type and effective health, lapsed and drained
services, groups by state (reconciling too long flagged), the leader and its term, and the last hour's
expirations and rebalances, each number with the link to the filtered admin list behind it.

Everything is a handful of aggregate queries plus one Redis read of the lapsed leases, whatever the
number of services or groups (the lapsed ids go to the database as one parameter). The list filters the
links need and the admin lacks live here too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlencode

from django.conf import settings
from django.contrib import admin
from django.db.models import Count, DateTimeField, OuterRef, Q, QuerySet, Subquery, Sum
from django.db.models.functions import Coalesce
from django.http import HttpRequest
from django.urls import reverse
from django.utils import timezone

from groups.models import GroupState, RebalanceEvent, RebalanceReason, ServiceGroup

from . import leases
from .display import iso_utc
from .id_sets import InIdSet
from .leadership import LEADERSHIP
from .models import Health, LeaderJobRun, LeaderTerm, Service, ServiceType

HOUR = timedelta(hours=1)
SHOWN_STUCK = 20  # stuck groups named on the overview; the link lists them all


def reconciling_alert_seconds() -> int:
    """REGISTRY_RECONCILING_ALERT_SECONDS: a group reconciling longer than this is flagged."""
    return int(getattr(settings, "REGISTRY_RECONCILING_ALERT_SECONDS", 60))


def link(name: str, **params: Any) -> str:
    """The admin changelist ``admin:<name>_changelist`` filtered by ``params``."""
    url = reverse(f"admin:{name}_changelist")
    return f"{url}?{urlencode(params)}" if params else url


def with_reconciling_since(groups: QuerySet) -> QuerySet:
    """Annotate ``reconciling_since``: when the group's current generation began (its rebalance event),
    else its last update (a group older than its history)."""
    started = RebalanceEvent.objects.filter(group=OuterRef("pk"), generation=OuterRef("generation")).values(
        "created_at"
    )[:1]
    return groups.annotate(reconciling_since=Coalesce(Subquery(started, output_field=DateTimeField()), "updated_at"))


def stuck_groups(now: datetime, seconds: int | None = None) -> QuerySet:
    """Groups reconciling for longer than ``seconds`` (default: the setting), longest first."""
    seconds = reconciling_alert_seconds() if seconds is None else seconds
    cutoff = now - timedelta(seconds=seconds)
    reconciling = with_reconciling_since(ServiceGroup.objects.filter(state=GroupState.RECONCILING))
    return reconciling.filter(reconciling_since__lt=cutoff).order_by("reconciling_since")


@dataclass
class Cell:
    count: int
    url: str


@dataclass
class Overview:
    now: datetime
    health_columns: list[str]
    services_by_type: list[tuple[str, list[Cell], Cell]]  # type, a cell per health column, the type's total
    health_totals: list[Cell]
    services_total: Cell
    lapsed: Cell
    drained: Cell
    groups_by_state: list[tuple[str, Cell]]
    groups_total: Cell
    stuck: Cell
    stuck_shown: list[tuple[str, str, datetime]]  # group id, its page, reconciling since
    alert_seconds: int
    leader: LeaderTerm | None
    leader_url: str
    leader_current: bool
    expired_last_hour: Cell
    member_expiries_last_hour: Cell
    rebalances_last_hour: Cell
    rebalance_reasons: list[tuple[str, Cell]] = field(default_factory=list)


def overview(now: datetime | None = None) -> Overview:
    """The overview as of ``now`` (one clock for every number)."""
    now = now or timezone.now()
    lapsed_ids = leases.lapsed_ids(now)
    services = "registry_service"

    # Effective health: the stored health, except that a lapsed lease reads as unhealthy. One aggregate
    # query; the lapsed ids go as one parameter (registry.id_sets), however many there are.
    counts: dict[tuple[str, str], int] = {}
    rows = Service.objects.order_by().values("service_type", "health")
    if lapsed_ids:
        rows = rows.annotate(n=Count("pk"), lapsed=Count("pk", filter=Q(InIdSet("pk", lapsed_ids))))
    else:
        rows = rows.annotate(n=Count("pk"))
    lapsed_count = 0
    for row in rows:
        lapsed_here = row.get("lapsed", 0)
        key = (row["service_type"], row["health"])
        counts[key] = counts.get(key, 0) + row["n"] - lapsed_here
        if lapsed_here:
            unhealthy = (row["service_type"], Health.UNHEALTHY.value)
            counts[unhealthy] = counts.get(unhealthy, 0) + lapsed_here
            lapsed_count += lapsed_here

    columns = list(Health.values)
    by_type = []
    for service_type in ServiceType.values:
        cells = [
            Cell(counts.get((service_type, h), 0), link(services, service_type__exact=service_type, health=h))
            for h in columns
        ]
        by_type.append(
            (service_type, cells, Cell(sum(c.count for c in cells), link(services, service_type__exact=service_type)))
        )
    totals = [Cell(sum(counts.get((t, h), 0) for t in ServiceType.values), link(services, health=h)) for h in columns]
    drained = Service.objects.filter(drained=True).count()

    state_counts = dict(ServiceGroup.objects.values_list("state").annotate(n=Count("pk")).order_by())
    groups = "groups_servicegroup"
    by_state = [(s, Cell(state_counts.get(s, 0), link(groups, state__exact=s))) for s in GroupState.values]
    alert = reconciling_alert_seconds()
    stuck_qs = stuck_groups(now, alert)
    stuck_rows = list(stuck_qs.values_list("group_id", "reconciling_since")[:SHOWN_STUCK])
    stuck_count = len(stuck_rows) if len(stuck_rows) < SHOWN_STUCK else stuck_qs.count()
    stuck_shown = [(gid, reverse("admin:groups_servicegroup_change", args=[gid]), since) for gid, since in stuck_rows]

    leader = LeaderTerm.objects.filter(name=LEADERSHIP).first()
    leader_url = (
        reverse("admin:registry_leaderterm_change", args=[leader.pk]) if leader else link("registry_leaderterm")
    )
    hour_ago = now - HOUR
    expired = LeaderJobRun.objects.filter(job="cleanup", at__gte=hour_ago).aggregate(n=Sum("items"))["n"] or 0
    events = "groups_rebalanceevent"
    recent = RebalanceEvent.objects.filter(created_at__gte=hour_ago)
    reason_counts = dict(recent.values_list("reason").annotate(n=Count("pk")).order_by())
    since = iso_utc(hour_ago)
    return Overview(
        now=now,
        health_columns=columns,
        services_by_type=by_type,
        health_totals=totals,
        services_total=Cell(sum(counts.values()), link(services)),
        lapsed=Cell(lapsed_count, link(services, lease="lapsed")),
        drained=Cell(drained, link(services, drained__exact=1)),
        groups_by_state=by_state,
        groups_total=Cell(sum(state_counts.values()), link(groups)),
        stuck=Cell(stuck_count, link(groups, reconciling="stuck")),
        stuck_shown=stuck_shown,
        alert_seconds=alert,
        leader=leader,
        leader_url=leader_url,
        leader_current=bool(leader and leader.expires_at and leader.expires_at > now),
        expired_last_hour=Cell(expired, leader_url),
        member_expiries_last_hour=Cell(
            reason_counts.get(RebalanceReason.EXPIRY, 0),
            link(events, reason__exact=RebalanceReason.EXPIRY, created_at__gte=since),
        ),
        rebalances_last_hour=Cell(sum(reason_counts.values()), link(events, created_at__gte=since)),
        rebalance_reasons=[
            (label, Cell(reason_counts[value], link(events, reason__exact=value, created_at__gte=since)))
            for value, label in RebalanceReason.choices
            if reason_counts.get(value)
        ],
    )


class LeaseFilter(admin.SimpleListFilter):
    """Services whose lease has lapsed (not yet removed) or is live, read from the lease store."""

    title = "lease"
    parameter_name = "lease"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("lapsed", "lapsed, not yet removed"), ("live", "live")]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        if self.value() == "lapsed":
            return queryset.filter(InIdSet("pk", leases.lapsed_ids(timezone.now())))
        if self.value() == "live":
            return queryset.live(leases.lapsed_ids(timezone.now()))
        return queryset


class ReconcilingFilter(admin.SimpleListFilter):
    """Groups reconciling for longer than REGISTRY_RECONCILING_ALERT_SECONDS."""

    title = "reconciling"
    parameter_name = "reconciling"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("stuck", f"longer than {reconciling_alert_seconds()} s")]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        if self.value() == "stuck":
            return queryset.filter(pk__in=stuck_groups(timezone.now()).values("pk"))
        return queryset
