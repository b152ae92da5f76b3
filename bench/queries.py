"""Query benchmark: the label-selector list (a page of 100), the effective-health list filter and
/metrics over HTTP, with 10,000 registered services of which none, 100 or all have a lapsed lease;
on SQLite and, when a PostgreSQL server is given, on PostgreSQL.

    .venv/bin/python bench/queries.py                                  # SQLite only
    .venv/bin/python bench/queries.py --pg postgres://postgres@127.0.0.1:5432/postgres

With ``--pg`` (or BENCH_PG_URL) a scratch database is created on that server for the run and dropped
after it. The services are written straight to the database and the lease store (registering 10,000
over HTTP would take most of the run); a lapse is a lease deadline moved into the past in Redis, as a
service that stopped heartbeating has. Every measured request goes over HTTP through the whole stack.
Latency is one wrk connection (a client waiting for each answer); throughput is 16 connections.

The server inherits this process's environment: ``REGISTRY_REQUEST_THREADS=0`` measures Django's
thread (and database connection) per request, as before the request thread pool.

The selector query is measured three ways: ``selector`` with everything read from the database (the
registry's membership counter unset, so nothing is remembered: a list read right after a registration or
a removal); ``selector-after-change`` where each read follows a change of health of a service on the page
(a heartbeat that reports it, not timed), so the page's rows are read again but not its matches; and
``selector-repeated`` with the counter set, as any registration sets it, so a repeated page is served
from the server process's memory until one of its services changes. ``selector-after-change`` is timed by
this script's own HTTP client (httpx, one connection), which adds its own overhead (compare its
``selector-repeated-httpx`` row, the repeated page timed the same way); the others by wrk.

Needs wrk (Debian: apt-get install wrk).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx

BASE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BASE))
from bench.common import Stack, cpu_seconds, percentile, run_wrk  # noqa: E402

SELECTOR = "env=prod,zone=a"
QUERIES = {
    # every page read from the database (no change counted since Redis started, so nothing is remembered)
    "selector": f"/api/v1/services/?selector={SELECTOR}",
    # each read right after a change of health of a service on the page: the matches remembered, the page's
    # rows read again (timed by httpx, as is the repeated page's row after it, for comparison)
    "selector-after-change": f"/api/v1/services/?selector={SELECTOR}",
    "selector-repeated-httpx": f"/api/v1/services/?selector={SELECTOR}",
    # the same query repeated while none of the page's services changes: served from memory (registry.listing)
    "selector-repeated": f"/api/v1/services/?selector={SELECTOR}",
    "health": "/api/v1/services/?health=unhealthy",
    "metrics": "/metrics",
}
TARGET_P99_MS = 10.0

WRK_SCRIPT = """
wrk.method = "GET"
wrk.headers["Authorization"] = "Bearer {token}"
request = function()
  return wrk.format(nil, "{path}")
end
"""


def labels_of(i: int) -> dict[str, str]:
    return {
        "env": ("prod", "staging", "dev")[i % 3],
        "zone": "abcd"[i // 3 % 4],
        "shard": str(i % 16),
        "team": f"team-{i % 25}",
    }


# --- seeding (runs in a child process with the stack's environment) ---------------------


def seed(n: int) -> None:
    """Write ``n`` services (labels, label rows, Redis lease entries) owned by the first token."""
    import django

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "registry_project.settings")
    django.setup()
    from datetime import timedelta

    from django.db import connection, transaction
    from django.utils import timezone

    from registry import lease_store
    from registry.models import ApiToken, Service, ServiceLabel
    from registry.redis_client import get_redis

    now = timezone.now()
    owner = ApiToken.objects.order_by("pk").first()
    lease = 3600
    expires = now + timedelta(seconds=lease)
    services, rows = [], []
    for i in range(n):
        labels = labels_of(i)
        services.append(
            Service(
                service_id=f"q-{i}",
                service_name=f"app-{i % 50}",
                service_type=("source", "transform", "sink")[i % 3],
                endpoint=f"10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}:9000",
                labels=labels,
                health="healthy" if i % 10 else "degraded",
                registered_at=now,
                lease_duration=lease,
                deregister_after=86400,
                lease_expires_at=expires,
                owner=owner,
                revision=i + 1,
            )
        )
        rows += [
            ServiceLabel(service_id=f"q-{i}", service_name=f"app-{i % 50}", key=k, value=v) for k, v in labels.items()
        ]
    with transaction.atomic():
        Service.objects.bulk_create(services, batch_size=500)
        ServiceLabel.objects.bulk_create(rows, batch_size=2000)
    r, k = get_redis(), lease_store.keys()
    deadline = lease_store.to_ms(expires)
    conf = lease_store.conf_value(lease, 86400, owner.pk if owner else None)
    pipe = r.pipeline(transaction=False)
    for start in range(0, n, 1000):
        chunk = services[start : start + 1000]
        pipe.zadd(k.deadline, {s.service_id: deadline for s in chunk})
        pipe.zadd(k.removal, {s.service_id: deadline + 86400 * 1000 for s in chunk})
        pipe.hset(k.conf, mapping={s.service_id: conf for s in chunk})
        pipe.hset(k.health, mapping={s.service_id: s.health for s in chunk})
    pipe.execute()
    lease_store.mark_built(r)
    lease_store.mark_sessions_built(r)
    if connection.vendor == "postgresql":
        # what autovacuum does within a minute of a bulk load: planner statistics, visibility map
        with connection.cursor() as cursor:
            cursor.execute("VACUUM ANALYZE registry_service")
            cursor.execute("VACUUM ANALYZE registry_servicelabel")


# For each measured selector query: whether the registry's membership counter is set.
COUNTERS = {
    "selector": "off",
    "selector-after-change": "on",
    "selector-repeated": "on",
    "selector-repeated-httpx": "on",
}
# Timed by this script's client, not wrk: each read after a change of a service on the page, or repeated.
TIMED_HERE = {"selector-after-change": True, "selector-repeated-httpx": False}
SETTLE_SECONDS = 0.02


def counter(on: bool) -> None:
    """Set (as the first registration after Redis started does) or delete the registry's membership counter."""
    import django

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "registry_project.settings")
    django.setup()
    from registry import events
    from registry.redis_client import get_redis

    if on:
        get_redis().set(events.services_membership_key(), uuid.uuid4().int % 2**52)
    else:
        get_redis().delete(events.services_membership_key())


def timed_reads(stack: Stack, path: str, seconds: float, change_first: bool) -> dict[str, float]:
    """Read ``path`` over one connection for ``seconds``; with ``change_first``, each read follows a heartbeat
    that flips the health of the first service on the page (not timed). Returns wrk's keys."""
    headers = {"Authorization": f"Bearer {stack.token}"}
    took: list[float] = []
    errors = 0
    servers = stack.server_pids()
    cpu = 0.0
    health = iter(("degraded", "healthy") * 10**7)
    with httpx.Client(base_url=stack.url, headers=headers, timeout=30) as client:
        first = client.get(path).json()["results"][0]["service_id"]
        heartbeat = f"/api/v1/services/{first}/heartbeat/"
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if change_first:
                client.post(heartbeat, json={"health": next(health)}).raise_for_status()
                time.sleep(SETTLE_SECONDS)  # the change's own work after its answer (events) is not timed
            cpu_before = cpu_seconds(servers)
            started = time.perf_counter()
            response = client.get(path)
            took.append(time.perf_counter() - started)
            cpu += cpu_seconds(servers) - cpu_before
            errors += response.status_code != 200
    return {
        "rps": len(took) / sum(took),
        "p50_ms": percentile(took, 50) * 1000,
        "p99_ms": percentile(took, 99) * 1000,
        "errors": errors,
        "requests": len(took),
        "cpu_ms": cpu * 1000 / len(took),  # the servers' CPU while a read was in flight
    }


def lapse(n: int, lapsed: int) -> None:
    """Move the lease deadline of the first ``lapsed`` of ``n`` services a minute into the past (the
    rest an hour ahead): they read unhealthy, and the removal deadline keeps them registered."""
    import django

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "registry_project.settings")
    django.setup()
    from django.utils import timezone

    from registry import lease_store
    from registry.redis_client import get_redis

    now_ms = lease_store.to_ms(timezone.now())
    r, k = get_redis(), lease_store.keys()
    r.zadd(k.deadline, {f"q-{i}": now_ms - 60_000 if i < lapsed else now_ms + 3_600_000 for i in range(n)})


# --- driver -----------------------------------------------------------------------------


@contextlib.contextmanager
def scratch_pg(server_url: str) -> Iterator[str]:
    """A throwaway database on the PostgreSQL server of ``server_url``; yields its URL, dropped after."""
    import psycopg

    name = f"bench_queries_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    parts = urlsplit(server_url)
    admin = urlunsplit(parts._replace(scheme="postgresql", path="/postgres"))
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield urlunsplit(parts._replace(path=f"/{name}"))
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def child(stack: Stack, *args: str) -> None:
    subprocess.run([sys.executable, __file__, *args], cwd=BASE, env=stack.env, check=True)


def check_answers(stack: Stack, n: int, lapsed: int) -> None:
    """The measured requests answer what they should (a fast wrong answer is no figure)."""
    headers = {"Authorization": f"Bearer {stack.token}"}
    with httpx.Client(base_url=stack.url, headers=headers, timeout=60) as client:
        page = client.get(QUERIES["selector"]).json()
        expected = sum(1 for i in range(n) if labels_of(i)["env"] == "prod" and labels_of(i)["zone"] == "a")
        assert page["count"] == expected and len(page["results"]) == min(100, expected), page.get("count")
        unhealthy = client.get(QUERIES["health"]).json()
        assert unhealthy["count"] == lapsed, (unhealthy["count"], lapsed)
        text = client.get(QUERIES["metrics"]).text
        assert f'conveyor_registry_services{{health="unhealthy"}} {lapsed}' in text, text[:400]


def measure(
    database: str, n: int, lapse_counts: list[int], seconds: int, throughput: bool, pg_url: str | None = None
) -> list[dict[str, object]]:
    """Rows {database, lapsed, query, p50_ms, p99_ms, rps, rps16, cpu_ms, errors} for each lapse count and query
    (``cpu_ms``: the server processes' CPU per request of the one-connection run)."""
    rows: list[dict[str, object]] = []
    with contextlib.ExitStack() as stack_ctx:
        if database == "postgresql":
            assert pg_url
            os.environ["DATABASE_URL"] = stack_ctx.enter_context(scratch_pg(pg_url))
        else:
            os.environ.pop("DATABASE_URL", None)
        try:
            stack = stack_ctx.enter_context(Stack(workers=2))
        finally:
            os.environ.pop("DATABASE_URL", None)
        child(stack, "--seed", str(n))
        for lapsed in lapse_counts:
            child(stack, "--lapse", str(lapsed), "--services", str(n))
            check_answers(stack, n, lapsed)
            for query, path in QUERIES.items():
                if query in COUNTERS:
                    child(stack, "--counter", COUNTERS[query])
                script = WRK_SCRIPT.format(token=stack.token, path=path)
                servers = stack.server_pids()
                cpu_before = cpu_seconds(servers)
                if query in TIMED_HERE:
                    one = timed_reads(stack, path, 2 * seconds, change_first=TIMED_HERE[query])  # more samples
                else:
                    one = run_wrk(stack.url + path, script, seconds, connections=1)
                cpu_ms = one.get("cpu_ms") or (cpu_seconds(servers) - cpu_before) * 1000 / max(1, one["requests"])
                timed_by_wrk = query not in TIMED_HERE
                many = (
                    run_wrk(stack.url + path, script, seconds, connections=16) if throughput and timed_by_wrk else None
                )
                row = {
                    "database": database,
                    "lapsed": lapsed,
                    "query": query,
                    "p50_ms": one["p50_ms"],
                    "p99_ms": one["p99_ms"],
                    "rps": one["rps"],
                    "rps16": many["rps"] if many else None,
                    "cpu_ms": cpu_ms,
                    "errors": one["errors"] + (many["errors"] if many else 0),
                }
                rows.append(row)
                print(
                    f"{database:10} {n} services, {lapsed:>5} lapsed  {query:21}  "
                    f"p50 {row['p50_ms']:6.2f} ms  p99 {row['p99_ms']:6.2f} ms  {row['rps']:6.0f} req/s (1 conn)"
                    + (f"  {row['rps16']:6.0f} req/s (16 conn)" if many else "")
                    + f"  server CPU {cpu_ms:.2f} ms/req  errors {row['errors']}",
                    flush=True,
                )
    return rows


def pg_server() -> str | None:
    url = os.environ.get("BENCH_PG_URL") or os.environ.get("DATABASE_URL") or ""
    return url if url.startswith(("postgres://", "postgresql://")) else None


def run(n: int, lapse_counts: list[int], seconds: int, throughput: bool, pg_url: str | None) -> list[dict[str, object]]:
    if not shutil.which("wrk"):
        sys.exit("wrk is not installed: apt-get install wrk")
    rows = measure("sqlite", n, lapse_counts, seconds, throughput)
    if pg_url:
        rows += measure("postgresql", n, lapse_counts, seconds, throughput, pg_url)
    return rows


def results(quick: bool = False) -> list[dict[str, str | None]]:
    """Rows for `make bench`: each query's p99 (one connection) per database and lapse count."""
    n = 10_000
    counts = [0, n] if quick else [0, 100, n]
    rows = run(n, counts, seconds=2 if quick else 5, throughput=not quick, pg_url=None if quick else pg_server())
    table: list[dict[str, str | None]] = []
    for row in rows:
        rps16 = f", {row['rps16']:.0f} req/s at 16 conn" if row["rps16"] else ""
        table.append(
            {
                "figure": f"query {row['query']}, {row['database']}, {n} services, {row['lapsed']} lapsed: p99",
                "ours": f"{row['p99_ms']:.1f} ms (p50 {row['p50_ms']:.1f} ms, server CPU {row['cpu_ms']:.1f} ms"
                f"{rps16}; errors {row['errors']})",
                "anchor": None,
                "ratio": None,
                "target": f"p99 < {TARGET_P99_MS:.0f} ms, no errors"
                if row["query"].startswith("selector")
                else "no errors (no id lists in SQL)",
            }
        )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--services", type=int, default=10_000)
    parser.add_argument("--lapsed", default="0,100,10000", help="comma-separated lapse counts, measured in turn")
    parser.add_argument("--seconds", type=int, default=5, help="length of each wrk run")
    parser.add_argument("--pg", default=pg_server(), help="a PostgreSQL server URL (a scratch database is made)")
    parser.add_argument("--no-throughput", action="store_true", help="skip the 16-connection runs")
    parser.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--lapse", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--counter", choices=["on", "off"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.counter is not None:
        return counter(args.counter == "on")
    if args.seed is not None:
        return seed(args.seed)
    if args.lapse is not None:
        return lapse(args.services, args.lapse)
    counts = [int(c) for c in args.lapsed.split(",")]
    rows = run(args.services, counts, args.seconds, not args.no_throughput, args.pg)
    worst = max((r["p99_ms"] for r in rows if str(r["query"]).startswith("selector")), default=0.0)
    print(f"selector query p99, worst case: {worst:.2f} ms (target < {TARGET_P99_MS:.0f} ms)")
    return None


if __name__ == "__main__":
    main()
