"""Prometheus text exposition of the registry: services by effective health and shared counters.

Counters live in Redis so that every server process and worker adds to the same totals.
"""

from __future__ import annotations

from datetime import datetime

from django.db.models import Count, Q

from . import lease_store
from .id_sets import InIdSet
from .leases import lapsed_ids
from .models import Health, Service
from .redis_client import get_redis

COUNTERS = {
    "heartbeats": "Heartbeats accepted (leases renewed).",
    "registrations": "New service registrations.",
    "reregistrations": "Registrations of an already registered service_id.",
    "deregistrations": "Services deregistered through the API or the admin.",
    "expirations": "Services removed by the cleanup job after their lease lapsed.",
    "fencing_rejections": "Leader-job writes rejected because their term was stale or their lock had lapsed.",
}


def services_by_health(now: datetime) -> dict[str, int]:
    """Services by effective health: one aggregate query, the lapsed ids sent as one parameter."""
    lapsed = lapsed_ids(now)
    counts = {h.value: 0 for h in Health}
    rows = Service.objects.order_by().values("health")
    if lapsed:
        rows = rows.annotate(n=Count("pk"), lapsed=Count("pk", filter=Q(InIdSet("pk", lapsed))))
    else:
        rows = rows.annotate(n=Count("pk"))
    for row in rows:
        lapsed_here = row.get("lapsed", 0)
        counts[row["health"]] += row["n"] - lapsed_here
        counts[Health.UNHEALTHY] += lapsed_here
    return counts


def render(now: datetime) -> str:
    lines = [
        "# HELP conveyor_registry_services Registered services by effective health.",
        "# TYPE conveyor_registry_services gauge",
    ]
    for health, n in services_by_health(now).items():
        lines.append(f'conveyor_registry_services{{health="{health}"}} {n}')
    values = lease_store.counters(get_redis(), COUNTERS)
    for name, help_text in COUNTERS.items():
        metric = f"conveyor_registry_{name}_total"
        lines += [f"# HELP {metric} {help_text}", f"# TYPE {metric} counter", f"{metric} {values[name]}"]
    return "\n".join(lines) + "\n"
