"""Admin console tables with many rows: server time (median of the runs) and SQL queries per page for
the services list in each order (default, natural id, effective health, lease deadline), a later page,
a selector search, the group page and its confirmation steps.

    .venv/bin/python bench/admin_tables.py                     # 10,000 services, 100 groups of 10 members
    .venv/bin/python bench/admin_tables.py --services 2000 --runs 3

Runs in-process on a fresh SQLite file in a temporary folder (or DATABASE_URL's PostgreSQL, which it
migrates) and an embedded Redis; the pages are requested through Django's test client, so the time is
the server's alone (no network, no browser).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

BASE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BASE))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--services", type=int, default=10_000)
    parser.add_argument("--groups", type=int, default=100)
    parser.add_argument("--members", type=int, default=10, help="members per group")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    var = tempfile.mkdtemp(prefix="bench-admin-")
    os.environ.setdefault("REGISTRY_VAR_DIR", var)
    os.environ.setdefault("SECRET_KEY", "bench-admin-tables-not-secret")
    os.environ.setdefault("DATABASE_URL", f"sqlite:///{var}/bench.sqlite3")
    os.environ["DJANGO_SETTINGS_MODULE"] = "registry_project.settings"
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"

    from registry_project.embedded_redis import RedisServer

    redis_server = RedisServer().start()
    os.environ["REDIS_URL"] = redis_server.url
    try:
        run(args)
    finally:
        redis_server.stop()


def run(args: argparse.Namespace) -> None:
    import django

    django.setup()
    from django.conf import settings
    from django.contrib.auth.models import User
    from django.core.management import call_command
    from django.db import connection
    from django.test import Client
    from django.test.utils import CaptureQueriesContext
    from django.utils import timezone

    settings.ALLOWED_HOSTS = ["*"]
    call_command("migrate", verbosity=0)
    from groups import membership, topics
    from registry import lease_store, leases
    from registry.models import ApiToken
    from registry.redis_client import get_redis, reset_clients

    reset_clients()
    lease_store.mark_built(get_redis())
    lease_store.mark_sessions_built(get_redis())
    token = ApiToken(name=f"bench-{os.getpid()}", is_staff=True)
    token.set_key(ApiToken.generate_key())
    token.save()

    started = time.perf_counter()
    now = timezone.now()
    for i in range(args.services):
        body = {
            "service_id": f"svc-{i}",
            "service_name": f"pipeline-{i % 50}",
            "service_type": ("source", "transform", "sink")[i % 3],
            "endpoint": f"worker-{i}.pipeline.eu-west-1.internal.example.com:{9000 + i % 1000}",
            "labels": {"env": ("prod", "staging")[i % 2], "shard": str(i % 16)},
            "lease_duration": 5 if i % 100 == 0 else 3600,  # 1 in 100 lapses during the run
            "deregister_after": 86400,
        }
        leases.register(body, token, now)
    topics.put_topic("orders", 120, now)
    for g in range(args.groups):
        for m in range(args.members):
            membership.join(f"group-{g}", f"svc-{g * args.members + m}", "c", ["orders"], token, now)
    print(f"set-up: {args.services} services, {args.groups} groups: {time.perf_counter() - started:.0f} s")
    time.sleep(6)  # let the short leases lapse, so lapsed rows exist to sort and show

    client = Client()
    client.force_login(User.objects.create_superuser("bench", "b@example.com", "bench"))
    from registry.admin import ServiceAdmin

    health = ServiceAdmin.list_display.index("health_badge") + 1
    lease = ServiceAdmin.list_display.index("lease_left") + 1
    ident = ServiceAdmin.list_display.index("id_cell") + 1
    group = "group-0"
    last = max(1, -(-args.services // ServiceAdmin.list_per_page))
    far = min(50, last)
    pages = [
        ("services list (name, natural id)", "/admin/registry/service/"),
        (f"services list, page {far}", f"/admin/registry/service/?p={far}"),
        ("services by natural id", f"/admin/registry/service/?o={ident}"),
        ("services by effective health", f"/admin/registry/service/?o={health}"),
        ("services by lease left (lapsed first)", f"/admin/registry/service/?o={lease}"),
        (f"services by lease left, page {far}", f"/admin/registry/service/?o={lease}&p={far}"),
        ("services, selector env=prod,shard=3", "/admin/registry/service/?q=env%3Dprod%2Cshard%3D3"),
        ("services, refused selector env=", "/admin/registry/service/?q=env%3D"),
        ("group page", f"/admin/groups/servicegroup/{group}/change/"),
        ("force rebalance confirmation", f"/admin/groups/servicegroup/{group}/rebalance/"),
        ("remove member confirmation", f"/admin/groups/servicegroup/{group}/members/svc-0/remove/"),
    ]
    client.get("/admin/registry/service/")  # templates compiled once, before the timed runs
    print(f"{'page':44} {'median ms':>10} {'max ms':>8} {'queries':>8}")
    for name, url in pages:
        times, queries = [], 0
        for _ in range(args.runs):
            with CaptureQueriesContext(connection) as captured:
                t0 = time.perf_counter()
                response = client.get(url)
                times.append((time.perf_counter() - t0) * 1000)
            assert response.status_code == 200, (url, response.status_code)
            queries = len(captured.captured_queries)
        print(f"{name:44} {statistics.median(times):10.1f} {max(times):8.1f} {queries:8d}")
    print(f"database: {connection.vendor}; {args.runs} runs per page")


if __name__ == "__main__":
    main()
