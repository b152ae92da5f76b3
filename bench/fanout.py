"""Websocket fan-out benchmark, 2 server processes (issue 13, target 4).

In one launch:
  - leave response time with no subscribers (leave sent -> response), over ``--rounds`` leaves;
  - ``--subscribers`` websockets on /ws/groups/fanout/, spread over both server processes (counted);
    server RSS per idle websocket = (RSS with N idle sockets - RSS with none) / N over the server processes;
  - the same leaves with every socket subscribed: leave sent -> the last subscriber has the new generation
    (p50/p99), and the leave's own response time, to compare with the figure without subscribers;
  - the bench client's own floor: the same sockets on a minimal `websockets` server in another process
    that broadcasts a message of the same size, trigger sent -> last socket has it. The client (one
    asyncio loop, uvloop when installed, a substring check per message) shares the 2 cores with the
    servers, so it bounds what the figure above can show.

    SECRET_KEY=dev .venv/bin/python bench/fanout.py [--subscribers 1000] [--rounds 30] [--workers 2]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import websockets

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Stack, free_port, percentile, rss_kib

GROUP = "fanout"
TOPIC = "fanout-events"
BEFORE_KIB_PER_SOCKET = 81  # measured before the fan-out layer (issue 13)


def socket_count(pid: int) -> int:
    count = 0
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
    except FileNotFoundError:
        pass
    return count


def stats(values: list[float]) -> dict[str, float]:
    return {"p50": statistics.median(values), "p99": percentile(values, 99), "max": max(values)}


class Subscribers:
    """N websockets with a listener each that stamps the arrival of the awaited generation, nothing more."""

    def __init__(self, sockets: list[Any]) -> None:
        self.sockets = sockets
        self.arrived = [0.0] * len(sockets)
        self.marker = ""
        self.remaining = 0
        self.done = asyncio.Event()
        self.first = [asyncio.get_running_loop().create_future() for _ in sockets]
        self.tasks = [asyncio.create_task(self.listen(i, ws)) for i, ws in enumerate(sockets)]

    async def listen(self, i: int, ws: Any) -> None:
        try:
            async for raw in ws:
                now = time.perf_counter()
                if not self.first[i].done():
                    self.first[i].set_result(raw)
                if self.marker and not self.arrived[i] and self.marker in raw:
                    self.arrived[i] = now
                    self.remaining -= 1
                    if self.remaining == 0:
                        self.done.set()
        except websockets.ConnectionClosed:
            pass

    def expect(self, marker: str) -> None:
        self.arrived = [0.0] * len(self.sockets)
        self.marker = marker
        self.remaining = len(self.sockets)
        self.done.clear()

    async def wait(self, timeout: float = 30) -> float:
        """The arrival time of the last socket."""
        await asyncio.wait_for(self.done.wait(), timeout)
        return max(self.arrived)

    async def close(self) -> None:
        await asyncio.gather(*(ws.close() for ws in self.sockets), return_exceptions=True)
        for task in self.tasks:
            task.cancel()


async def connect_all(url: str, n: int, **kwargs: Any) -> list[Any]:
    sockets: list[Any] = []
    for i in range(0, n, 50):  # in batches, as a fleet would
        batch = await asyncio.gather(
            *(websockets.connect(url, max_queue=None, ping_interval=None, **kwargs) for _ in range(i, min(i + 50, n)))
        )
        sockets.extend(batch)
    return sockets


async def leaves(rest: httpx.AsyncClient, epochs: dict[str, int], rounds: int, subs: Subscribers | None) -> dict:
    """``rounds`` leaves of member-c, each followed by its rejoin: the leave's response times and, with
    subscribers, the time from the leave sent to the last subscriber holding the new generation."""
    generation = (await rest.get(f"/api/v1/groups/{GROUP}/")).json()["generation"]
    responses: list[float] = []
    to_last: list[float] = []
    member = "member-c"
    for _ in range(rounds):
        generation += 1
        if subs:
            subs.expect(f'"generation": {generation},')
        sent = time.perf_counter()
        r = await rest.delete(f"/api/v1/groups/{GROUP}/members/{member}/?member_epoch={epochs[member]}")
        responses.append((time.perf_counter() - sent) * 1000)
        r.raise_for_status()
        if subs:
            to_last.append((await subs.wait() - sent) * 1000)
        generation += 1
        if subs:
            subs.expect(f'"generation": {generation},')
        r = await rest.post(
            f"/api/v1/groups/{GROUP}/members/",
            json={"member_id": member, "service_name": "bench", "topics": [TOPIC]},
        )
        r.raise_for_status()
        epochs[member] = r.json()["member_epoch"]
        if subs:
            await subs.wait()
        await asyncio.sleep(0.05)
    return {"response": responses, "to_last": to_last}


FLOOR_SERVER = """
import asyncio, sys
import websockets
from websockets.asyncio.server import broadcast, serve

clients = set()

async def handler(ws):
    if ws.request.path == "/control":
        async for size in ws:
            broadcast(clients, "x" * int(size))
        return
    clients.add(ws)
    try:
        await ws.wait_closed()
    finally:
        clients.discard(ws)

async def main():
    async with serve(handler, "127.0.0.1", int(sys.argv[1]), ping_interval=None, max_queue=None):
        print("ready", flush=True)
        await asyncio.Future()

asyncio.run(main())
"""


async def client_floor(n: int, rounds: int, size: int) -> list[float]:
    """Trigger sent -> last of ``n`` sockets has a ``size``-byte broadcast from a minimal server."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", FLOOR_SERVER, str(port)], stdout=subprocess.PIPE)
    try:
        assert server.stdout is not None
        await asyncio.to_thread(server.stdout.readline)
        subs = Subscribers(await connect_all(f"ws://127.0.0.1:{port}/", n))
        control = await websockets.connect(f"ws://127.0.0.1:{port}/control")
        await asyncio.sleep(0.5)
        samples = []
        for _ in range(rounds):
            subs.expect("x" * 8)
            sent = time.perf_counter()
            await control.send(str(size))
            samples.append((await subs.wait() - sent) * 1000)
            await asyncio.sleep(0.05)
        await control.close()
        await subs.close()
        return samples
    finally:
        server.terminate()
        server.wait(timeout=10)


async def run(stack: Stack, subscribers: int, rounds: int) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {stack.token}"}
    ws_url = stack.url.replace("http", "ws") + f"/ws/groups/{GROUP}/"
    async with httpx.AsyncClient(base_url=stack.url, headers=headers, timeout=30) as rest:
        (await rest.put(f"/api/v1/topics/{TOPIC}/", json={"partitions": 48})).raise_for_status()
        epochs = {}
        for m in ("member-a", "member-b", "member-c"):
            r = await rest.post(
                f"/api/v1/groups/{GROUP}/members/",
                json={"member_id": m, "service_name": "bench", "topics": [TOPIC], "static": True},
            )
            r.raise_for_status()
            epochs[m] = r.json()["member_epoch"]

        await leaves(rest, epochs, 3, None)  # warm up
        alone = await leaves(rest, epochs, rounds, None)

        pids = [p for p in stack.server_pids() if p != stack.server.pid] or stack.server_pids()
        await asyncio.sleep(0.5)
        rss_before = rss_kib(pids)
        sockets_before = {pid: socket_count(pid) for pid in pids}
        subs = Subscribers(await connect_all(ws_url, subscribers, additional_headers=headers))
        first = await asyncio.wait_for(asyncio.gather(*subs.first), 60)
        message_size = len(first[0])
        await asyncio.sleep(1.0)
        rss_idle = rss_kib(pids)
        spread = [socket_count(pid) - sockets_before[pid] for pid in pids]

        await leaves(rest, epochs, 2, subs)  # warm up
        loaded = await leaves(rest, epochs, rounds, subs)
        await subs.close()
    floor = await client_floor(subscribers, rounds, message_size)
    return {
        "alone": stats(alone["response"]),
        "response": stats(loaded["response"]),
        "to_last": stats(loaded["to_last"]),
        "floor": stats(floor),
        "kib_per_socket": (rss_idle - rss_before) / subscribers,
        "spread": spread,
        "message_size": message_size,
    }


def measure(subscribers: int, rounds: int, workers: int) -> dict[str, Any]:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    with Stack(workers=workers) as stack:
        return asyncio.run(run(stack, subscribers, rounds))


def ms(s: dict[str, float]) -> str:
    return f"p50 {s['p50']:.1f} ms  p99 {s['p99']:.1f} ms  max {s['max']:.1f} ms"


def results(quick: bool = False) -> list[dict]:
    subscribers = 1000
    r = measure(subscribers, 5 if quick else 30, 2)
    return [
        {
            "figure": f"pushes: leave sent -> last of {subscribers:,} subscribers (2 processes)",
            "ours": f"p99 {r['to_last']['p99']:.0f} ms (p50 {r['to_last']['p50']:.0f})",
            "anchor": f"p99 {r['floor']['p99']:.0f} ms: the bench client's own floor",
            "ratio": None,
            "target": "p99 <= 50 ms",
        },
        {
            "figure": f"pushes: leave response with {subscribers:,} subscribers vs none",
            "ours": f"p99 {r['response']['p99']:.0f} ms (p50 {r['response']['p50']:.1f})",
            "anchor": f"p99 {r['alone']['p99']:.0f} ms (p50 {r['alone']['p50']:.1f})",
            "ratio": f"{r['response']['p50'] / r['alone']['p50']:.2f}x (p50)",
            "target": "not delayed by the fan-out",
        },
        {
            "figure": "pushes: server RSS per idle websocket",
            "ours": f"{r['kib_per_socket']:.1f} KiB",
            "anchor": f"{BEFORE_KIB_PER_SOCKET} KiB (before)",
            "ratio": f"{r['kib_per_socket'] / BEFORE_KIB_PER_SOCKET:.2f}x",
            "target": "stated; reduced where ours",
        },
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    r = measure(args.subscribers, args.rounds, args.workers)
    print(
        f"{args.subscribers} websocket subscribers to one group, {args.workers} server processes "
        f"(sockets per process: {'/'.join(map(str, r['spread']))}), {args.rounds} leaves, "
        f"message {r['message_size']} bytes; load average {os.getloadavg()[0]:.2f}"
    )
    print(f"  leave sent -> last subscriber has the new generation: {ms(r['to_last'])}")
    print(f"  leave response, {args.subscribers} subscribers:             {ms(r['response'])}")
    print(f"  leave response, no subscribers:                   {ms(r['alone'])}")
    print(f"  bench client floor (minimal broadcast server):    {ms(r['floor'])}")
    print(f"  server RSS per idle websocket: {r['kib_per_socket']:.1f} KiB")


if __name__ == "__main__":
    main()
