"""Client selection benchmark: selects/s from one thread with the client's balancer, local (following the
services stream, choosing in-process with conveyor.strategies) and over HTTP (one request per selection, a
pooled connection), with 100 and 1,000 instances of one name registered.

    .venv/bin/python bench/client_select.py [--instances 100 1000] [--seconds 3]

It starts its own stack (Redis, SQLite, uvicorn with 2 workers); --url and --token use a running server instead.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from conveyor import Registry
from conveyor.balancer import Balancer

from bench.balancer import register
from bench.common import Stack

STRATEGIES = ("round_robin", "weighted", "random", "hash")


def rate(balancer: Balancer, seconds: float, strategy: str) -> float:
    """Selections per second from this thread for ``seconds``."""
    done = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(50):
            balancer.select(f"k{done}" if strategy == "hash" else None)
            done += 1
        if time.perf_counter() >= deadline:
            return done / (time.perf_counter() - start)


def measure(url: str, token: str, instances: int, seconds: float, name: str) -> None:
    reg = Registry(url, token)
    print(f"{instances} instances of {name!r}, one thread, {seconds:.0f} s each:")
    for strategy in STRATEGIES:
        with reg.balancer(name, strategy=strategy, local=True) as local:
            local.select("warm-up")  # waits for the snapshot
            local_rate = rate(local, seconds, strategy)
        http_rate = rate(reg.balancer(name, strategy=strategy), seconds, strategy)
        print(
            f"  {strategy:12s} local {local_rate:10,.0f} selects/s   over HTTP {http_rate:6,.0f} selects/s   "
            f"(x{local_rate / http_rate:,.0f})"
        )
    reg.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--url")
    parser.add_argument("--token")
    args = parser.parse_args()
    if args.url:
        for n in sorted(args.instances):  # growing: the name holds the first n ids
            asyncio.run(register(args.url, args.token, n))
            measure(args.url, args.token, n, args.seconds, "bench-sink")
        return
    for n in args.instances:
        with Stack(workers=2) as stack:  # a fresh stack per size: the name holds exactly n instances
            asyncio.run(register(stack.url, stack.token, n))
            measure(stack.url, stack.token, n, args.seconds, "bench-sink")


if __name__ == "__main__":
    main()
