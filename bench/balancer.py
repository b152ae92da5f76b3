"""Balancer benchmark: the select endpoint's throughput and latency over HTTP with 1,000 instances of one
name registered (wrk), and the library's cost per selection (in-process).

    .venv/bin/python bench/balancer.py [--instances 1000] [--seconds 10] [--connections 16]

Needs wrk (Debian: apt-get install wrk).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from balancer.strategies import Instance, LoadBalancer
from bench.common import Stack, run_wrk

WRK_SCRIPT = """
wrk.headers["Authorization"] = "Bearer {token}"
local n = 0
request = function()
  n = n + 1
  return wrk.format("GET", "/api/v1/balancer/select/?name=bench-sink&strategy={strategy}&key=k" .. n)
end
"""


async def register(url: str, token: str, n: int) -> None:
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as client:
        sem = asyncio.Semaphore(16)

        async def one(i: int) -> None:
            async with sem:
                body = {
                    "service_id": f"bench-sink-{i}",
                    "service_name": "bench-sink",
                    "service_type": "sink",
                    "endpoint": f"10.1.{i // 250}.{i % 250 + 1}:9000",
                    "weight": 1 + i % 10,
                    "lease_duration": 3600,
                }
                (await client.post("/api/v1/services/", json=body)).raise_for_status()

        await asyncio.gather(*(one(i) for i in range(n)))


def library(n: int) -> dict[str, float]:
    instances = [Instance(f"i{i}", f"10.0.0.{i % 250}:1", 1 + i % 10) for i in range(n)]
    lb = LoadBalancer()
    result = {}
    for strategy in ("round_robin", "weighted", "random", "hash"):
        runs = 2000 if strategy != "hash" else 300
        start = time.perf_counter()
        for k in range(runs):
            lb.select(instances, strategy, key=f"k{k}")
        result[strategy] = (time.perf_counter() - start) / runs * 1e6
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=1000)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args()
    print(f"library, {args.instances} instances, microseconds per selection:")
    for strategy, us in library(args.instances).items():
        print(f"  {strategy:12s} {us:8.1f} us")
    with Stack(workers=2) as stack:
        asyncio.run(register(stack.url, stack.token, args.instances))
        print(
            f"select endpoint over HTTP, {args.instances} instances of one name, {args.connections} connections, "
            f"{args.seconds}s each:"
        )
        for strategy in ("round_robin", "weighted", "hash"):
            script = WRK_SCRIPT.replace("{token}", stack.token).replace("{strategy}", strategy)
            r = run_wrk(stack.url, script, args.seconds, args.connections)
            print(
                f"  {strategy:12s} {r['rps']:7.0f} req/s  p50 {r['p50_ms']:.1f} ms  p99 {r['p99_ms']:.1f} ms  "
                f"errors {r['errors']}"
            )


if __name__ == "__main__":
    main()
