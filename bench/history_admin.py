"""History admin figures: queries and server time of the lifecycle-log and audit-trail pages over a large
history, and the prune job's rate. Its own SQLite file in a temporary folder (or DATABASE_URL).

    .venv/bin/python bench/history_admin.py                     # 10,000 services, 100,000 lifecycle rows
    .venv/bin/python bench/history_admin.py --services 1000 --per-service 5
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _timed(log: list[tuple[float, str]], execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
    """A database execute wrapper that records each query's time and SQL."""
    started = time.perf_counter()
    try:
        return execute(sql, params, many, context)
    finally:
        log.append((time.perf_counter() - started, sql))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--services", type=int, default=10_000)
    parser.add_argument("--per-service", type=int, default=10, help="lifecycle rows per service")
    parser.add_argument("--repeat", type=int, default=20, help="requests per page for the server time")
    args = parser.parse_args()

    folder = tempfile.mkdtemp(prefix="history-bench-")
    os.environ.setdefault("DATABASE_URL", f"sqlite:///{folder}/bench.sqlite3")
    os.environ.setdefault("SECRET_KEY", "history-bench-only")
    os.environ.setdefault("ALLOWED_HOSTS", "testserver")
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "registry_project.settings")
    import django

    django.setup()
    from django.contrib.admin.models import CHANGE, LogEntry
    from django.contrib.auth.models import User
    from django.contrib.contenttypes.models import ContentType
    from django.core.management import call_command
    from django.db import connections
    from django.test import Client
    from django.utils import timezone

    from registry import lifecycle
    from registry.models import Service, ServiceEvent, ServiceEventKind

    call_command("migrate", verbosity=0)
    user = User.objects.create_superuser("bench", "bench@example.com", "bench-only")
    now = timezone.now()
    kinds = ServiceEventKind.values
    started = time.perf_counter()
    batch: list[ServiceEvent] = []
    for i in range(args.services):
        for j in range(args.per_service):
            batch.append(
                ServiceEvent(
                    service_id=f"bench-{i}",
                    service_name=f"bench-{i % 100}",
                    kind=kinds[j % len(kinds)],
                    at=now - timedelta(days=(i * args.per_service + j) % 28, seconds=j),
                    actor_kind="token",
                    actor="bench",
                    change={"health": ["healthy", "degraded"]},
                    revision=j,
                )
            )
        if len(batch) >= 5000:
            ServiceEvent.objects.bulk_create(batch)
            batch = []
    ServiceEvent.objects.bulk_create(batch)
    ct = ContentType.objects.get_for_model(Service).pk
    LogEntry.objects.bulk_create(
        LogEntry(
            user=user,
            content_type_id=ct,
            object_id=f"bench-{i}",
            object_repr=f"bench/{i}",
            action_flag=CHANGE,
            change_message="Admin action: drain",
        )
        for i in range(args.services)
    )
    total = ServiceEvent.objects.count()
    made = time.perf_counter() - started
    print(f"history: {total} lifecycle rows, {args.services} log entries (made in {made:.1f} s)")

    from django.core.signals import request_finished, request_started
    from django.db import close_old_connections

    # the test client would close the connection after each request, and with it the captured queries
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    client = Client()
    client.force_login(user)
    pages = {
        "lifecycle list": "/admin/registry/serviceevent/",
        "one service's history": "/admin/registry/serviceevent/?service_id=bench-4242",
        "lifecycle, kind filter": "/admin/registry/serviceevent/?kind__exact=drained",
        "lifecycle, search by id": "/admin/registry/serviceevent/?q=bench-4242",
        "lifecycle, search by name": "/admin/registry/serviceevent/?q=bench-42",
        "audit trail": "/admin/admin/logentry/",
        "one lifecycle row": f"/admin/registry/serviceevent/{ServiceEvent.objects.first().pk}/change/",
    }
    print(f"{'page':<26} {'queries':>7} {'median ms':>10} {'p90 ms':>8}")
    for name, url in pages.items():
        queries: list[tuple[float, str]] = []
        with connections["default"].execute_wrapper(functools.partial(_timed, queries)):
            response = client.get(url)
        assert response.status_code == 200, (url, response.status_code)
        times = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            client.get(url)
            times.append((time.perf_counter() - t) * 1000)
        times.sort()
        p90 = times[int(len(times) * 0.9) - 1]
        print(f"{name:<26} {len(queries):>7} {statistics.median(times):>10.1f} {p90:>8.1f}")
        if os.environ.get("BENCH_SHOW_QUERIES"):
            for took, sql in queries:
                print(f"    {took * 1000:7.1f} ms {sql[:220]}")

    cutoff_days = 14
    old = ServiceEvent.objects.filter(at__lt=now - timedelta(days=cutoff_days)).count()
    started = time.perf_counter()
    deleted = 0
    while batch_deleted := lifecycle.prune(now, keep_days=cutoff_days, batch=5000):
        deleted += batch_deleted
    took = time.perf_counter() - started
    assert deleted == old
    print(f"prune: {deleted} rows older than {cutoff_days} days in {took:.2f} s ({deleted / took:,.0f} rows/s)")


if __name__ == "__main__":
    main()
