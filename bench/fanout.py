"""Websocket fan-out benchmark: 1,000 subscribers to one group on a running server; time from a leave
request returning to the last subscriber receiving the new generation (p50, p99 over 20 rebalances), and
server memory per connection.

    .venv/bin/python bench/fanout.py [--subscribers 1000] [--rounds 20] [--workers 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import httpx
import websockets

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import Stack, percentile, rss_kib


async def run(stack: Stack, subscribers: int, rounds: int) -> tuple[list[float], list[float], float]:
    headers = {"Authorization": f"Bearer {stack.token}"}
    ws_url = stack.url.replace("http", "ws") + f"/ws/groups/fanout/?token={stack.token}"
    async with httpx.AsyncClient(base_url=stack.url, headers=headers, timeout=30) as rest:
        await rest.put("/api/v1/topics/fanout-events/", json={"partitions": 48})
        epochs = {}
        for m in ("member-a", "member-b", "member-c"):
            r = await rest.post(
                "/api/v1/groups/fanout/members/",
                json={"member_id": m, "service_name": "bench", "topics": ["fanout-events"], "static": True},
            )
            r.raise_for_status()
            epochs[m] = r.json()["member_epoch"]

        pids = stack.server_pids()
        before = rss_kib(pids)
        latest = [0] * subscribers
        arrived: list[float] = [0.0] * subscribers
        target = {"generation": 0}
        done = asyncio.Event()
        remaining = {"n": 0}
        sockets = []
        for i in range(0, subscribers, 50):  # connect in batches, as a fleet would
            batch = await asyncio.gather(
                *(websockets.connect(ws_url, max_queue=None) for _ in range(i, min(i + 50, subscribers)))
            )
            sockets.extend(batch)

        async def listen(i: int, ws: websockets.ClientConnection) -> None:
            async for raw in ws:
                generation = json.loads(raw)["generation"]
                if generation > latest[i]:
                    latest[i] = generation
                    if generation >= target["generation"] > 0 and not arrived[i]:
                        arrived[i] = time.perf_counter()
                        remaining["n"] -= 1
                        if remaining["n"] == 0:
                            done.set()

        listeners = [asyncio.create_task(listen(i, ws)) for i, ws in enumerate(sockets)]
        await asyncio.sleep(2)
        connected_rss = rss_kib(pids)
        per_connection = (connected_rss - before) / subscribers

        samples: list[float] = []
        from_sent: list[float] = []
        current = (await rest.get("/api/v1/groups/fanout/")).json()["generation"]
        member = "member-c"
        for _ in range(rounds):
            # the leave, then (unmeasured) the rejoin that restores the group for the next round
            for step, request in (
                (
                    "leave",
                    lambda: rest.delete(f"/api/v1/groups/fanout/members/{member}/?member_epoch={epochs[member]}"),
                ),
                (
                    "join",
                    lambda: rest.post(
                        "/api/v1/groups/fanout/members/",
                        json={"member_id": member, "service_name": "bench", "topics": ["fanout-events"]},
                    ),
                ),
            ):
                done.clear()
                for i in range(subscribers):
                    arrived[i] = 0.0
                target["generation"] = current + 1
                remaining["n"] = sum(1 for g in latest if g < current + 1)
                sent = time.perf_counter()
                r = await request()
                returned = time.perf_counter()
                r.raise_for_status()
                if step == "join":
                    epochs[member] = r.json()["member_epoch"]
                if remaining["n"] > 0:
                    await asyncio.wait_for(done.wait(), 30)
                current += 1
                if step == "leave":
                    last = max(arrived)
                    samples.append((max(last, returned) - returned) * 1000)
                    from_sent.append((last - sent) * 1000)
            await asyncio.sleep(0.1)
        for ws in sockets:
            await ws.close()
        for task in listeners:
            task.cancel()
        return samples, from_sent, per_connection


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    with Stack(workers=args.workers) as stack:
        samples, from_sent, per_connection = asyncio.run(run(stack, args.subscribers, args.rounds))
    print(
        f"{args.subscribers} websocket subscribers to one group, {args.workers} server processes, {args.rounds} leaves"
    )
    print(
        f"  leave returned -> last subscriber has the new generation: p50 {statistics.median(samples):.1f} ms  "
        f"p99 {percentile(samples, 99):.1f} ms  max {max(samples):.1f} ms"
    )
    print(
        f"  leave sent -> last subscriber has the new generation: p50 {statistics.median(from_sent):.1f} ms  "
        f"p99 {percentile(from_sent, 99):.1f} ms  (the push goes out before the response, so often before it)"
    )
    print(f"  server memory per connection: {per_connection:.1f} KiB")


if __name__ == "__main__":
    main()
