"""Heartbeats side by side with etcd: etcd 3.4's v3 HTTP lease keepalive against our heartbeat, the same
wrk settings against each, in one launch.

1. etcd (Debian's etcd-server) on free ports in a temporary data dir: N leases granted, then wrk posts
   ``{"ID": <random lease>}`` to ``/v3/lease/keepalive`` (the gRPC gateway's HTTP/JSON path).
2. Our stack (bench.common.Stack: embedded Redis, SQLite or DATABASE_URL, the ASGI server): N services
   registered, then wrk posts authenticated heartbeats for random ids (one in 50 carries a health body).

Prints both rates, the ratio, p50/p99 and errors (wrk's non-2xx answers and socket errors).

    SECRET_KEY=dev .venv/bin/python bench/heartbeat_vs_etcd.py                 # 10,000 leases, -t2 -c32 -d10s
    SECRET_KEY=dev .venv/bin/python bench/heartbeat_vs_etcd.py --quick         # short, for development
    SECRET_KEY=dev .venv/bin/python bench/heartbeat_vs_etcd.py --workers 1,2   # our rate with 1 and 2 processes

Needs wrk and etcd (Debian: apt-get install wrk etcd-server).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.anchors import Etcd
from bench.common import Stack, run_wrk
from bench.heartbeat import WRK_SCRIPT

# One lease id per line of a table: etcd's ids are int64, beyond what a Lua number holds exactly.
ETCD_WRK_SCRIPT = """
local ids = {{{ids}}}
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
request = function()
  return wrk.format(nil, "/v3/lease/keepalive", nil, '{{"ID": ' .. ids[math.random(1, #ids)] .. '}}')
end
"""

# Each wrk thread its own random sequence (unseeded, both would send the same ids in the same order).
SEED = """
local thread_counter = 0
setup = function(thread)
  thread_counter = thread_counter + 1
  thread:set("seed", thread_counter)
end
init = function(args)
  math.randomseed(os.time() * 100 + seed)
end
"""


def _summary(runs: list[dict[str, float]]) -> dict[str, Any]:
    """The median run by rate, with the errors of all runs and every run's rate."""
    median = sorted(runs, key=lambda r: r["rps"])[len(runs) // 2]
    return {
        **median,
        "errors": sum(r["errors"] for r in runs),
        "requests": sum(r["requests"] for r in runs),
        "runs": [r["rps"] for r in runs],
    }


def compare(
    services: int = 10_000,
    seconds: int = 10,
    connections: int = 32,
    threads: int = 2,
    runs: int = 1,
    workers: tuple[int, ...] = (2,),
) -> dict[str, Any]:
    """Measure etcd and ours (with each worker count) in turns, both servers up, so that whatever else
    the machine does falls on both alike; the median run of each."""
    for tool in ("wrk", "etcd"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is not installed: apt-get install {'etcd-server' if tool == 'etcd' else tool}")
    etcd_runs: list[dict[str, float]] = []
    ours: dict[int, dict[str, Any]] = {}
    with Etcd() as etcd:
        ids = etcd.grant_leases(services)
        if etcd.keepalive(ids[0]) <= 0:
            raise RuntimeError("etcd's keepalive did not renew a granted lease")
        etcd_script = SEED + ETCD_WRK_SCRIPT.format(ids=",".join(f'"{i}"' for i in ids))
        version = etcd.version()
        for count in workers:
            with Stack(workers=count) as server:
                server.register_services(services)
                script = SEED + WRK_SCRIPT.format(n=services, token=server.token)
                our_runs = []
                for _ in range(runs):
                    etcd_runs.append(run_wrk(etcd.url, etcd_script, seconds, connections, threads))
                    our_runs.append(run_wrk(server.url, script, seconds, connections, threads))
                ours[count] = _summary(our_runs)
    return {"etcd": {"version": version, **_summary(etcd_runs)}, "ours": ours, "load": os.getloadavg()}


def _line(name: str, r: dict[str, Any]) -> str:
    spread = ", ".join(f"{x:.0f}" for x in r["runs"])
    return (
        f"  {name:<22} {r['rps']:8.0f} req/s   p50 {r['p50_ms']:6.2f} ms   p99 {r['p99_ms']:6.2f} ms   "
        f"errors {r['errors']} of {r['requests']}   (runs: {spread})"
    )


def report(figures: dict[str, Any], services: int, seconds: int, connections: int, threads: int) -> None:
    etcd = figures["etcd"]
    print(
        f"heartbeats vs etcd {etcd['version']} lease keepalive (HTTP gateway): {services} leases, "
        f"wrk -t{threads} -c{connections} -d{seconds}s, load average {' '.join(f'{x:.2f}' for x in figures['load'])}"
    )
    print(_line("etcd keepalive", etcd))
    for workers, ours in figures["ours"].items():
        print(_line(f"ours, {workers} process(es)", ours))
        print(f"  {'':<22} ratio {ours['rps'] / etcd['rps']:.2f}x etcd")


def results(quick: bool = False) -> list[dict[str, Any]]:
    """Rows for `make bench`: heartbeats/s against etcd, and our p99 (2 server processes)."""
    services, seconds = (2_000, 3) if quick else (10_000, 10)
    figures = compare(services=services, seconds=seconds)
    etcd, ours = figures["etcd"], figures["ours"][2]
    return [
        {
            "figure": f"heartbeats/s (wrk -t2 -c32, {services // 1000}k services)",
            "ours": f"{ours['rps']:.0f}",
            "anchor": f"{etcd['rps']:.0f} (etcd {etcd['version']} keepalive)",
            "ratio": f"{ours['rps'] / etcd['rps']:.2f}x",
            "target": ">=1.0x",
        },
        {
            "figure": "heartbeat p99 (same run)",
            "ours": f"{ours['p99_ms']:.1f} ms ({ours['errors']} errors)",
            "anchor": f"{etcd['p99_ms']:.1f} ms",
            "ratio": None,
            "target": "<10 ms, 0 errors",
        },
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--services", type=int, default=10_000)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--wrk-threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=1, help="wrk runs against each; the median is reported")
    parser.add_argument("--workers", default="2", help="comma-separated server process counts to measure")
    parser.add_argument("--quick", action="store_true", help="2,000 services, 3 s runs")
    args = parser.parse_args()
    if args.quick:
        args.services, args.seconds = 2_000, 3
    workers = tuple(int(w) for w in args.workers.split(","))
    figures = compare(args.services, args.seconds, args.connections, args.wrk_threads, args.runs, workers)
    report(figures, args.services, args.seconds, args.connections, args.wrk_threads)
    ratios = [ours["rps"] / figures["etcd"]["rps"] for ours in figures["ours"].values()]
    print(f"  median ratio {statistics.median(ratios):.2f}x (target >= 1.0x, p99 < 10 ms, 0 errors)")


if __name__ == "__main__":
    main()
