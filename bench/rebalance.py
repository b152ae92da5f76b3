"""Rebalance propagation benchmark: time from a leave request returning to every remaining member's
heartbeat answering with the new generation, over HTTP on a running server.

Members heartbeat back to back (no pause), so the figure is the protocol's own latency, not a
heartbeat interval. Repeated: a member leaves, everyone sees it, it joins again, everyone sees that.

    .venv/bin/python bench/rebalance.py [--members 20] [--rounds 20] [--partitions 120]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import Stack, percentile


async def run(url: str, token: str, members: int, rounds: int, partitions: int) -> list[float]:
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(
        base_url=url, headers=headers, timeout=30, limits=httpx.Limits(max_connections=members + 4)
    ) as client:
        await client.put("/api/v1/topics/bench-events/", json={"partitions": partitions})
        ids = [f"member-{i}" for i in range(members)]
        epochs = {}
        for m in ids:
            r = await client.post(
                "/api/v1/groups/bench/members/",
                json={"member_id": m, "service_name": "bench", "topics": ["bench-events"], "static": True},
            )
            r.raise_for_status()
            epochs[m] = r.json()["member_epoch"]
        seen = dict.fromkeys(ids, 0)
        active = set(ids)
        stop = False

        async def heartbeat_loop(m: str) -> None:
            while not stop:
                if m not in active:
                    await asyncio.sleep(0.001)
                    continue
                r = await client.post(
                    f"/api/v1/groups/bench/members/{m}/heartbeat/",
                    json={"generation": seen[m], "member_epoch": epochs[m]},
                )
                if r.status_code == 200:
                    seen[m] = r.json()["generation"]

        loops = [asyncio.create_task(heartbeat_loop(m)) for m in ids]
        await asyncio.sleep(1.0)
        samples: list[float] = []
        leaver = ids[-1]
        for _ in range(rounds):
            active.discard(leaver)
            r = await client.delete(f"/api/v1/groups/bench/members/{leaver}/?member_epoch={epochs[leaver]}")
            r.raise_for_status()
            returned = time.perf_counter()
            target = (await client.get("/api/v1/groups/bench/")).json()["generation"]
            while any(seen[m] < target for m in active):
                await asyncio.sleep(0.0005)
            samples.append((time.perf_counter() - returned) * 1000)
            r = await client.post(
                "/api/v1/groups/bench/members/",
                json={"member_id": leaver, "service_name": "bench", "topics": ["bench-events"]},
            )
            seen[leaver], epochs[leaver] = r.json()["generation"], r.json()["member_epoch"]
            active.add(leaver)
            await asyncio.sleep(0.2)
        stop = True
        await asyncio.gather(*loops)
        return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--partitions", type=int, default=120)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    with Stack(workers=args.workers) as stack:
        samples = asyncio.run(run(stack.url, stack.token, args.members, args.rounds, args.partitions))
    print(
        f"leave -> every remaining member's heartbeat sees the new generation "
        f"({args.members} members heartbeating back to back, {args.partitions} partitions, {args.rounds} leaves)"
    )
    print(
        f"  p50 {statistics.median(samples):.1f} ms   p99 {percentile(samples, 99):.1f} ms   max {max(samples):.1f} ms"
    )


if __name__ == "__main__":
    main()
