"""Heartbeat benchmark: register N services on a running server, then drive authenticated heartbeats
with wrk for a fixed time; prints requests/s, p50, p99, errors and server memory.

    .venv/bin/python bench/heartbeat.py                # starts its own stack (embedded Redis, SQLite)
    .venv/bin/python bench/heartbeat.py --url http://127.0.0.1:8000 --token cr_...   # an existing server

Needs wrk (Debian: apt-get install wrk).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import Stack, rss_kib, run_wrk

WRK_SCRIPT = """
local n = {n}
local token = "{token}"
wrk.method = "POST"
wrk.headers["Authorization"] = "Bearer " .. token
wrk.headers["Content-Type"] = "application/json"
local counter = 0
request = function()
  counter = counter + 1
  local id = math.random(0, n - 1)
  local body = ""
  if counter % 50 == 0 then body = '{{"health": "healthy"}}' end
  return wrk.format(nil, "/api/v1/services/bench-" .. id .. "/heartbeat/", nil, body)
end
"""


async def register_all(url: str, token: str, n: int, concurrency: int = 32) -> float:
    headers = {"Authorization": f"Bearer {token}"}
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)

    async def worker(client: httpx.AsyncClient) -> None:
        while True:
            try:
                i = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            body = {
                "service_id": f"bench-{i}",
                "service_name": f"bench-{i % 100}",
                "service_type": "source",
                "endpoint": f"10.0.{i // 250 % 250}.{i % 250 + 1}:9000",
                "labels": {"shard": str(i % 16)},
                "lease_duration": 3600,
            }
            response = await client.post("/api/v1/services/", json=body, headers=headers)
            if response.status_code not in (200, 201):
                raise RuntimeError(f"registration failed: {response.status_code} {response.text}")

    start = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="an existing server (default: start one)")
    parser.add_argument("--token", help="a staff token for --url")
    parser.add_argument("--services", type=int, default=10_000)
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--connections", default="16,64", help="comma-separated wrk connection counts")
    parser.add_argument("--wrk-threads", type=int, default=1)
    parser.add_argument("--workers", type=int, default=2, help="uvicorn worker processes when starting a server")
    parser.add_argument("--runs", type=int, default=3, help="wrk runs; the median is reported")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk is not installed: apt-get install wrk")

    with contextlib.ExitStack() as stack:
        if args.url:
            if not args.token:
                sys.exit("--url needs --token (a staff token of that server)")
            url, token, pids = args.url, args.token, []
        else:
            server = stack.enter_context(Stack(workers=args.workers))
            url, token = server.url, server.token
            pids = server.server_pids()
        took = asyncio.run(register_all(url, token, args.services))
        print(f"registered {args.services} services in {took:.1f}s ({args.services / took:.0f}/s)")
        for connections in [int(c) for c in args.connections.split(",")]:
            results = []
            for run in range(args.runs):
                result = run_wrk(
                    url, WRK_SCRIPT.format(n=args.services, token=token), args.seconds, connections, args.wrk_threads
                )
                results.append(result)
                print(
                    f"  {connections} connections, run {run + 1}: {result['rps']:.0f} req/s  "
                    f"p50 {result['p50_ms']:.2f} ms  p99 {result['p99_ms']:.2f} ms  "
                    f"errors {result['errors']} of {result['requests']}"
                )
            med = sorted(results, key=lambda r: r["rps"])[len(results) // 2]
            print(
                f"heartbeats, {connections} connections, {args.services} services "
                f"(median of {args.runs} runs of {args.seconds}s):"
            )
            print(f"  throughput  {med['rps']:.0f} req/s")
            print(f"  latency     p50 {med['p50_ms']:.2f} ms   p99 {med['p99_ms']:.2f} ms")
            print(f"  errors      {sum(r['errors'] for r in results)} (all runs)")
        if pids:
            print(f"  server RSS  {rss_kib(pids) / 1024:.0f} MiB over {len(pids)} processes")


if __name__ == "__main__":
    main()
