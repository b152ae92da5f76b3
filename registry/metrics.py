"""Prometheus text exposition of the registry: services by effective health and shared counters.

Counters live in Redis so that every server process and worker adds to the same totals.
"""

from __future__ import annotations

from datetime import datetime

from django.db.models import Count

from . import lease_store
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
    lapsed = lapsed_ids(now)
    counts = {h.value: 0 for h in Health}
    for row in Service.objects.exclude(pk__in=lapsed).values("health").annotate(n=Count("pk")):
        counts[row["health"]] += row["n"]
    counts[Health.UNHEALTHY] += Service.objects.filter(pk__in=lapsed).count()
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
