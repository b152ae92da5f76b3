"""Heartbeats side by side with etcd: etcd 3.4's v3 HTTP lease keepalive against our heartbeat, the same
wrk settings against each, in one launch.

1. etcd (Debian's etcd-server) on free ports in a temporary data dir: N leases granted, then wrk posts
   ``{"ID": <random lease>}`` to ``/v3/lease/keepalive`` (the gRPC gateway's HTTP/JSON path).
2. Our stack (bench.common.Stack: embedded Redis, SQLite or DATABASE_URL, the ASGI server): N services
   registered, then wrk posts authenticated heartbeats for random ids (one in 50 carries a health body).

Prints both rates, the ratio, p50/p99 and errors (wrk's non-2xx answers and socket errors), and the CPU
time each side spent per request (ours: the server processes and Redis; etcd: etcd; and wrk's own), which
varies less than the rates on a machine other work shares: on a quiet machine, where wrk and the server
share the cores, the rate follows the CPU per request of server and wrk together.

    SECRET_KEY=dev .venv/bin/python bench/heartbeat_vs_etcd.py                 # 10,000 leases, -t2 -c32 -d10s
    SECRET_KEY=dev .venv/bin/python bench/heartbeat_vs_etcd.py --quick         # short, for development
    SECRET_KEY=dev .venv/bin/python bench/heartbeat_vs_etcd.py --workers 1,2   # our rate with 1 and 2 processes

Needs wrk and etcd (Debian: apt-get install wrk etcd-server).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.anchors import Etcd
from bench.common import Stack, cpu_seconds, run_wrk
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


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measured_wrk(url: str, script: str, pids: list[int], seconds: int, connections: int, threads: int) -> dict:
    """One wrk run, with the CPU time per request of ``pids`` (the server side) and of wrk, in microseconds."""
    server_before, wrk_before = cpu_seconds(pids), _children_cpu()
    result = run_wrk(url, script, seconds, connections, threads)
    requests = max(1, result["requests"])
    result["server_cpu_us"] = (cpu_seconds(pids) - server_before) / requests * 1e6
    result["wrk_cpu_us"] = (_children_cpu() - wrk_before) / requests * 1e6
    return result


def _summary(runs: list[dict[str, float]]) -> dict[str, Any]:
    """The median run by rate, with the errors of all runs, every run's rate and the median CPU figures."""
    median = sorted(runs, key=lambda r: r["rps"])[len(runs) // 2]
    return {
        **median,
        "errors": sum(r["errors"] for r in runs),
        "requests": sum(r["requests"] for r in runs),
        "runs": [r["rps"] for r in runs],
        "server_cpu_us": statistics.median(r["server_cpu_us"] for r in runs),
        "wrk_cpu_us": statistics.median(r["wrk_cpu_us"] for r in runs),
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
                ours_pids = [*server.server_pids(), server.redis_pid()]
                for _ in range(runs):
                    etcd_runs.append(measured_wrk(etcd.url, etcd_script, [etcd.pid], seconds, connections, threads))
                    our_runs.append(measured_wrk(server.url, script, ours_pids, seconds, connections, threads))
                ours[count] = _summary(our_runs)
    return {"etcd": {"version": version, **_summary(etcd_runs)}, "ours": ours, "load": os.getloadavg()}


def _line(name: str, r: dict[str, Any]) -> str:
    spread = ", ".join(f"{x:.0f}" for x in r["runs"])
    return (
        f"  {name:<22} {r['rps']:8.0f} req/s   p50 {r['p50_ms']:6.2f} ms   p99 {r['p99_ms']:6.2f} ms   "
        f"errors {r['errors']} of {r['requests']}   (runs: {spread})\n"
        f"  {'':<22} CPU per request: server {r['server_cpu_us']:.0f} us + wrk {r['wrk_cpu_us']:.0f} us"
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
        cpu_ratio = _cpu(etcd) / _cpu(ours)
        print(
            f"  {'':<22} ratio {ours['rps'] / etcd['rps']:.2f}x etcd "
            f"(by CPU per request, server + wrk: {cpu_ratio:.2f}x)"
        )


def _cpu(figures: dict[str, Any]) -> float:
    return figures["server_cpu_us"] + figures["wrk_cpu_us"]


def results(quick: bool = False) -> list[dict[str, Any]]:
    """Rows for `make bench`: heartbeats/s against etcd with 2 server processes (and 1, unless quick), p99."""
    services, seconds, runs, workers = (1_000, 3, 1, (2,)) if quick else (10_000, 10, 3, (1, 2))
    figures = compare(services=services, seconds=seconds, runs=runs, workers=workers)
    etcd, ours = figures["etcd"], figures["ours"][2]
    anchor = f"etcd {etcd['version']} keepalive"
    rows = [
        {
            "figure": f"heartbeats/s (wrk -t2 -c32, {services // 1000}k services)",
            "ours": f"{ours['rps']:.0f}",
            "anchor": f"{etcd['rps']:.0f} ({anchor})",
            "ratio": f"{ours['rps'] / etcd['rps']:.2f}x",
            "target": ">=1.0x",
        },
        {
            "figure": "heartbeat p99 (same runs)",
            "ours": f"{ours['p99_ms']:.1f} ms ({ours['errors']} errors)",
            "anchor": f"{etcd['p99_ms']:.1f} ms",
            "ratio": None,
            "target": "<10 ms, 0 errors",
        },
        {
            "figure": "CPU per heartbeat, server side + wrk",
            "ours": f"{ours['server_cpu_us']:.0f} + {ours['wrk_cpu_us']:.0f} us",
            "anchor": f"{etcd['server_cpu_us']:.0f} + {etcd['wrk_cpu_us']:.0f} us",
            "ratio": f"{_cpu(etcd) / _cpu(ours):.2f}x",
            "target": "-",
        },
    ]
    if 1 in figures["ours"]:
        one = figures["ours"][1]
        rows.append(
            {
                "figure": "heartbeats/s with 1 server process (same settings)",
                "ours": f"{one['rps']:.0f} (p99 {one['p99_ms']:.1f} ms)",
                "anchor": f"{etcd['rps']:.0f} ({anchor})",
                "ratio": f"{one['rps'] / etcd['rps']:.2f}x",
                "target": "-",
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--services", type=int, default=10_000)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--wrk-threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=1, help="wrk runs against each; the median is reported")
    parser.add_argument("--workers", default="2", help="comma-separated server process counts to measure")
    parser.add_argument("--quick", action="store_true", help="1,000 services, 3 s runs")
    parser.add_argument("--results", action="store_true", help="print the rows `make bench` collects")
    args = parser.parse_args()
    if args.results:
        for row in results(quick=args.quick):
            print(row)
        return
    if args.quick:
        args.services, args.seconds = 1_000, 3
    workers = tuple(int(w) for w in args.workers.split(","))
    figures = compare(args.services, args.seconds, args.connections, args.wrk_threads, args.runs, workers)
    report(figures, args.services, args.seconds, args.connections, args.wrk_threads)
    ratios = [ours["rps"] / figures["etcd"]["rps"] for ours in figures["ours"].values()]
    print(f"  median ratio {statistics.median(ratios):.2f}x (target >= 1.0x, p99 < 10 ms, 0 errors)")


if __name__ == "__main__":
    main()
