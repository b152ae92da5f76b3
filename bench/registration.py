"""Registration storm benchmark: 16 concurrent clients register N distinct services over HTTP, then
re-register the same N unchanged, and heartbeats run on the same stack for comparison.

Prints registrations/s, p50, p99 and errors for each phase, on SQLite and, with ``--pg``, on a fresh
PostgreSQL database created for the run and dropped afterwards.

    .venv/bin/python bench/registration.py                       # SQLite
    .venv/bin/python bench/registration.py --pg postgres://postgres@127.0.0.1:5432/postgres
    .venv/bin/python bench/registration.py --pg URL --only pg    # PostgreSQL only
    .venv/bin/python bench/registration.py --baseline ../older-checkout   # the same run of that code first

The client is wrk with a Lua script that builds each body (one distinct service per request), so the
driver is not the bottleneck: wrk alone on this machine posts far more than the server answers. Needs
wrk (Debian: apt-get install wrk).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import WRK_DONE, Stack, cpu_seconds, run_wrk
from bench.heartbeat import WRK_SCRIPT as HEARTBEAT_SCRIPT

CONNECTIONS = 16

# Service i's body is a function of i alone, so a second pass sends exactly the same registration.
# A pass posts ids first, first+1, ... (mod n) until ``stop_after`` responses arrived, then prints how long
# that took (the wrk thread stops; the driver interrupts wrk for its latency summary). wrk calls request()
# once before the connections start to check the script, hence the counter starting at -1.
REGISTER_SCRIPT = """
local ffi = require("ffi")
ffi.cdef[[
typedef struct {{ long tv_sec; long tv_nsec; }} bench_timespec;
int clock_gettime(int clk, bench_timespec *tp);
]]
local ts = ffi.new("bench_timespec")
local function now_us()
  ffi.C.clock_gettime(1, ts)
  return tonumber(ts.tv_sec) * 1000000 + math.floor(tonumber(ts.tv_nsec) / 1000)
end
local first = {first}
local n = {n}
local stop_after = {stop_after}
local token = "{token}"
local prefix = "{prefix}"
local types = {{"source", "transform", "sink"}}
wrk.method = "POST"
wrk.headers["Authorization"] = "Bearer " .. token
wrk.headers["Content-Type"] = "application/json"
local counter = -1
local answered = 0
local unexpected = 0
local started = nil
request = function()
  if counter == 0 then started = now_us() end
  local i = (first + counter) % n
  counter = counter + 1
  local body = string.format(
    '{{"service_id": "%s%d", "service_name": "%s%d", "service_type": "%s", '
    .. '"endpoint": "10.%d.%d.%d:9000", "labels": {{"shard": "%d", "zone": "z%d"}}, "lease_duration": 3600}}',
    prefix, i, prefix, i % 100, types[i % 3 + 1],
    math.floor(i / 62500) % 250, math.floor(i / 250) % 250, i % 250 + 1, i % 16, i % 3)
  return wrk.format(nil, "/api/v1/services/", nil, body)
end
response = function(status, headers, body)
  answered = answered + 1
  if status ~= {expect} then unexpected = unexpected + 1 end
  if answered == stop_after then
    io.write(string.format("PASS answered=%d elapsed_us=%d unexpected=%d\\n", answered, now_us() - started, unexpected))
    io.flush()
    wrk.thread:stop()
  end
end
"""


def _pass(url: str, token: str, n: int, expect: int, prefix: str = "bench-", timeout: int = 300) -> dict[str, float]:
    """One pass of ``n`` registrations (ids 0..n-1) by CONNECTIONS concurrent clients; every answer should be
    ``expect`` (201 new, 200 re-registered)."""
    # The first pass never wraps (the few requests in flight when it stops register new ids too).
    modulus = n if expect == 200 else 10**9
    script = REGISTER_SCRIPT.format(first=0, n=modulus, stop_after=n, token=token, prefix=prefix, expect=expect)
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(script + WRK_DONE)
    wrk = subprocess.Popen(
        ["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{timeout}s", "--timeout", "10s", "-s", f.name, url],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert wrk.stdout is not None
    lines = []
    passed = None
    for line in wrk.stdout:
        lines.append(line)
        passed = passed or re.match(r"PASS answered=(\d+) elapsed_us=(\d+) unexpected=(\d+)", line)
        if passed and wrk.poll() is None:
            wrk.send_signal(signal.SIGINT)  # the pass is over: print the summary now
    wrk.wait()
    Path(f.name).unlink()
    result = re.search(r"RESULT requests=\d+ duration_us=\d+ p50_us=(\d+) p99_us=(\d+) errors=(\d+)", "".join(lines))
    if not passed or not result:
        raise RuntimeError("wrk did not finish the pass:\n" + "".join(lines))
    answered, elapsed_us, unexpected = map(int, passed.groups())
    p50, p99, errors = map(int, result.groups())
    return {
        "rps": answered / (elapsed_us / 1e6),
        "p50_ms": p50 / 1000,
        "p99_ms": p99 / 1000,
        "errors": errors + unexpected,
        "requests": answered,
    }


@contextlib.contextmanager
def pg_database(server_url: str) -> Iterator[str]:
    """A fresh PostgreSQL database on the server of ``server_url`` for one run; dropped afterwards."""
    import psycopg

    name = f"registry_bench_{os.getpid()}_{secrets.token_hex(3)}"
    parts = urlsplit(server_url)
    admin = urlunsplit(parts._replace(path="/postgres"))
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield urlunsplit(parts._replace(path=f"/{name}"))
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def run(database_url: str | None, n: int, heartbeat_seconds: int, workers: int = 2) -> dict[str, dict[str, float]]:
    """Start a stack on ``database_url`` (None: SQLite), run the three phases and return their figures."""
    saved = os.environ.get("DATABASE_URL")
    if database_url:
        os.environ["DATABASE_URL"] = database_url
    else:
        os.environ.pop("DATABASE_URL", None)
    try:
        with Stack(workers=workers) as stack:
            out = {
                "register": _cpu(stack, lambda: _pass(stack.url, stack.token, n, 201)),
                "unchanged": _cpu(stack, lambda: _pass(stack.url, stack.token, n, 200)),
                "heartbeat": _cpu(
                    stack,
                    lambda: run_wrk(
                        stack.url, HEARTBEAT_SCRIPT.format(n=n, token=stack.token), heartbeat_seconds, CONNECTIONS
                    ),
                ),
            }
            counts = stack.manage("shell", "-c", _COUNT_CHECK).strip().splitlines()[-1]
            out["check"] = dict(zip(("services", "history"), map(float, counts.split()), strict=True))
            return out
    finally:
        if saved is None:
            os.environ.pop("DATABASE_URL", None)
        else:
            os.environ["DATABASE_URL"] = saved


def _cpu(stack: Stack, phase: Callable[[], dict[str, float]]) -> dict[str, float]:
    """``phase``'s figures, with the CPU time per request of the server processes and of Redis (a figure
    that other load on the machine disturbs far less than the rate)."""
    server, store = stack.server_pids(), [stack.redis_pid()]
    before = cpu_seconds(server), cpu_seconds(store)
    out = phase()
    requests = max(1.0, out["requests"])
    out["server_cpu_us"] = (cpu_seconds(server) - before[0]) / requests * 1e6
    out["redis_cpu_us"] = (cpu_seconds(store) - before[1]) / requests * 1e6
    return out


# What the run left in the database: every service registered once, and one history row per registration
# (an unchanged re-registration writes none).
_COUNT_CHECK = (
    "from registry.models import Service, ServiceEvent; print(Service.objects.count(), ServiceEvent.objects.count())"
)


def _line(label: str, r: dict[str, float]) -> str:
    return (
        f"  {label:<24} {r['rps']:7.0f}/s   p50 {r['p50_ms']:6.2f} ms   p99 {r['p99_ms']:7.2f} ms   "
        f"errors {r['errors']} of {r['requests']}   CPU/request: server {r['server_cpu_us']:.0f} us, "
        f"Redis {r['redis_cpu_us']:.0f} us"
    )


def report(db: str, n: int, res: dict[str, dict[str, float]]) -> None:
    print(f"{db}: {n} services, {CONNECTIONS} concurrent clients (wrk), 2 server processes")
    print(_line("register (new)", res["register"]))
    print(_line("re-register unchanged", res["unchanged"]))
    print(_line("heartbeat", res["heartbeat"]))
    ratio = res["unchanged"]["rps"] / res["heartbeat"]["rps"]
    print(f"  unchanged re-registration / heartbeat: {ratio:.2f}x")
    print(
        f"  left in the database: {res['check']['services']:.0f} services, {res['check']['history']:.0f} history rows"
    )


def _targets() -> dict[str, float]:
    return {"sqlite": 300.0, "postgresql": 1000.0}


def results(quick: bool = False) -> list[dict[str, str | None]]:
    """Rows for `make bench`: registration rates on SQLite and (with DATABASE_URL or BENCH_PG_URL set to a
    PostgreSQL server) on a fresh PostgreSQL database; the unchanged re-registration rate against the
    heartbeat rate of the same run."""
    n = 600 if quick else 10_000
    seconds = 2 if quick else 10
    runs: list[tuple[str, str | None]] = [("sqlite", None)]
    pg = os.environ.get("BENCH_PG_URL") or os.environ.get("DATABASE_URL", "")
    if pg.startswith("postgres"):
        runs.append(("postgresql", pg))
    rows: list[dict[str, str | None]] = []
    for db, server in runs:
        with pg_database(server) if server else contextlib.nullcontext(None) as url:
            res = run(url, n, seconds)
        reg, same, hb = res["register"], res["unchanged"], res["heartbeat"]
        rows.append(
            {
                "figure": f"registrations/s over HTTP, {db}, {n} services, {CONNECTIONS} clients "
                f"(p50 {reg['p50_ms']:.1f} ms, p99 {reg['p99_ms']:.1f} ms, errors {reg['errors']})",
                "ours": f"{reg['rps']:.0f}/s",
                "anchor": None,
                "ratio": None,
                "target": f">= {_targets()[db]:.0f}/s",
            }
        )
        rows.append(
            {
                "figure": f"unchanged re-registrations/s vs heartbeats/s, {db} "
                f"(p99 {same['p99_ms']:.1f} ms vs {hb['p99_ms']:.1f} ms, errors {same['errors']})",
                "ours": f"{same['rps']:.0f}/s",
                "anchor": f"{hb['rps']:.0f}/s",
                "ratio": f"{same['rps'] / hb['rps']:.2f}x",
                "target": "about a heartbeat",
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--services", type=int, default=10_000)
    parser.add_argument("--heartbeat-seconds", type=int, default=5)
    parser.add_argument("--pg", help="a PostgreSQL server URL; a fresh database is created on it for the run")
    parser.add_argument("--only", choices=["sqlite", "pg"], help="run one database only")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--baseline", help="another checkout of the project (e.g. a git worktree of an older commit): run it first"
    )
    args = parser.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk is not installed: apt-get install wrk")
    if args.baseline:
        rest = [a for a in sys.argv[1:] if a != args.baseline and not a.startswith("--baseline")]
        script = Path(args.baseline).resolve() / "bench" / "registration.py"
        print(f"baseline: {args.baseline}", flush=True)
        subprocess.run([sys.executable, str(script), *rest], check=True, cwd=script.parent.parent)
        print("this checkout:", flush=True)
    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    if args.only != "pg":
        report("sqlite", args.services, run(None, args.services, args.heartbeat_seconds, args.workers))
    if args.pg and args.only != "sqlite":
        with pg_database(args.pg) as url:
            report("postgresql", args.services, run(url, args.services, args.heartbeat_seconds, args.workers))
    elif args.only == "pg":
        sys.exit("--only pg needs --pg URL")


if __name__ == "__main__":
    main()
