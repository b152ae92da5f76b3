"""Websocket fan-out benchmark, 2 server processes (issue 13, target 4).

In one launch:
  - leave response time with no subscribers (leave sent -> response), over ``--rounds`` leaves;
  - ``--subscribers`` websockets on /ws/groups/fanout/, spread over both server processes (counted);
    server RSS per idle websocket = (RSS with N idle sockets - RSS with none) / N over the server processes;
  - the same leaves with every socket subscribed: leave sent -> the last subscriber has the new generation
    (p50/p99), and the leave's own response time, to compare with the figure without subscribers;
  - the server processes' CPU time per leave (from /proc, so the machine's load does not blur it), with
    and without subscribers: the difference is the CPU cost of one fan-out to every socket;
  - the bench client's own floor: the same sockets on a minimal `websockets` server in another process
    that broadcasts a message of the same size, trigger sent -> last socket has it.

The subscribers are one asyncio loop (uvloop when installed) of plain protocol objects that parse RFC 6455
frames themselves (``RawSocket``: handshake checked, frames reassembled, pings answered) and stamp the
arrival of a frame that holds the awaited generation; ``--client websockets`` uses the `websockets`
library instead (a task and a queue per socket: several times the client's CPU per message). The client
shares the 2 cores with the servers, so its floor bounds what the figures above can show.

    SECRET_KEY=dev .venv/bin/python bench/fanout.py [--subscribers 1000] [--rounds 30] [--workers 2]
        [--client raw|websockets]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import os
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

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


def cpu_ms(pids: list[int]) -> float:
    """User + system CPU time of ``pids`` so far, in ms."""
    ticks = 0
    for pid in pids:
        with contextlib.suppress(FileNotFoundError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])
    return ticks * 1000 / os.sysconf("SC_CLK_TCK")


WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class RawSocket(asyncio.Protocol):
    """A websocket client connection that parses frames itself and hands each whole text message, with
    the time its last bytes arrived, to ``on_message``; pings are answered, a close ends it."""

    def __init__(self, key: bytes, on_message: Any) -> None:
        self.key = key
        self.on_message = on_message
        self.buffer = b""
        self.upgraded: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: Any = None
        self.fragments: list[bytes] = []

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.upgraded.done():
            self.upgraded.set_exception(exc or ConnectionError("closed during the handshake"))
        if not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        buffer = self.buffer + data if self.buffer else data
        if not self.upgraded.done():
            head, sep, buffer = buffer.partition(b"\r\n\r\n")
            if not sep:
                self.buffer = head
                return
            accept = base64.b64encode(hashlib.sha1(self.key + WS_GUID).digest())
            if not head.startswith(b"HTTP/1.1 101") or accept not in head:
                self.upgraded.set_exception(ConnectionError(head.split(b"\r\n")[0].decode("latin-1")))
                self.transport.close()
                return
            self.upgraded.set_result(None)
        while len(buffer) >= 2:
            first, second = buffer[0], buffer[1]
            length, start = second & 0x7F, 2
            if length == 126:
                if len(buffer) < 4:
                    break
                length, start = struct.unpack_from("!H", buffer, 2)[0], 4
            elif length == 127:
                if len(buffer) < 10:
                    break
                length, start = struct.unpack_from("!Q", buffer, 2)[0], 10
            if second & 0x80:
                raise ConnectionError("a server frame must not be masked")
            if len(buffer) < start + length:
                break
            payload, buffer = buffer[start : start + length], buffer[start + length :]
            opcode = first & 0x0F
            if opcode in (1, 0):  # text, continuation
                if first & 0x80:
                    self.on_message(b"".join([*self.fragments, payload]) if self.fragments else payload, now)
                    self.fragments = []
                else:
                    self.fragments.append(payload)
            elif opcode == 9:  # ping
                self.send_frame(0xA, payload)
            elif opcode == 8:  # close
                self.send_frame(0x8, payload[:2])
                self.transport.close()
        self.buffer = buffer

    def send_frame(self, opcode: int, payload: bytes) -> None:
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.transport.write(bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + masked)

    def close(self) -> None:
        if not self.transport.is_closing():
            self.send_frame(0x8, struct.pack("!H", 1000))
            self.transport.close()


async def raw_connect(url: str, on_message: Any, headers: dict[str, str] | None = None) -> RawSocket:
    parts = urlsplit(url)
    key = base64.b64encode(os.urandom(16))
    _, protocol = await asyncio.get_running_loop().create_connection(
        lambda: RawSocket(key, on_message), parts.hostname, parts.port
    )
    lines = [
        f"GET {parts.path or '/'}{'?' + parts.query if parts.query else ''} HTTP/1.1",
        f"Host: {parts.netloc}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key.decode()}",
        "Sec-WebSocket-Version: 13",
        *(f"{k}: {v}" for k, v in (headers or {}).items()),
    ]
    protocol.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    await asyncio.wait_for(protocol.upgraded, 30)
    return protocol


class Subscribers:
    """N websockets that stamp the arrival of the awaited generation, nothing more: the `websockets`
    library's (a listener task each) or ``RawSocket``s (see the module docstring)."""

    def __init__(self, n: int) -> None:
        self.sockets: list[Any] = []
        self.raw = True
        self.arrived = [0.0] * n
        self.marker = b""
        self.remaining = 0
        self.done = asyncio.Event()
        self.first = [asyncio.get_running_loop().create_future() for _ in range(n)]
        self.tasks: list[asyncio.Task[None]] = []

    async def connect(self, url: str, client: str, headers: dict[str, str] | None = None) -> Subscribers:
        n = len(self.first)
        for start in range(0, n, 50):  # in batches, as a fleet would
            batch = range(start, min(start + 50, n))
            if client == "raw":
                self.sockets += await asyncio.gather(*(raw_connect(url, self.receiver(i), headers) for i in batch))
            else:
                self.raw = False
                sockets = await asyncio.gather(
                    *(
                        websockets.connect(url, max_queue=None, ping_interval=None, additional_headers=headers)
                        for _ in batch
                    )
                )
                self.tasks += [asyncio.create_task(self.listen(i, ws)) for i, ws in zip(batch, sockets, strict=True)]
                self.sockets += sockets
        return self

    def receiver(self, i: int) -> Any:
        def received(raw: bytes, now: float) -> None:
            self.arrival(i, raw, now)

        return received

    def arrival(self, i: int, raw: bytes, now: float) -> None:
        if not self.first[i].done():
            self.first[i].set_result(raw)
        if self.marker and not self.arrived[i] and self.marker in raw:
            self.arrived[i] = now
            self.remaining -= 1
            if self.remaining == 0:
                self.done.set()

    async def listen(self, i: int, ws: Any) -> None:
        try:
            async for raw in ws:
                self.arrival(i, raw.encode() if isinstance(raw, str) else raw, time.perf_counter())
        except websockets.ConnectionClosed:
            pass

    def expect(self, marker: str) -> None:
        self.arrived = [0.0] * len(self.sockets)
        self.marker = marker.encode()
        self.remaining = len(self.sockets)
        self.done.clear()

    async def wait(self, timeout: float = 30) -> float:
        """The arrival time of the last socket."""
        await asyncio.wait_for(self.done.wait(), timeout)
        return max(self.arrived)

    async def close(self) -> None:
        if self.raw:
            for ws in self.sockets:
                ws.close()
            await asyncio.wait_for(asyncio.gather(*(ws.closed for ws in self.sockets)), 30)
            return
        await asyncio.gather(*(ws.close() for ws in self.sockets), return_exceptions=True)
        for task in self.tasks:
            task.cancel()


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


async def client_floor(n: int, rounds: int, size: int, client: str) -> dict[str, list[float]]:
    """Trigger sent -> last of ``n`` sockets has a ``size``-byte broadcast from a minimal server."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", FLOOR_SERVER, str(port)], stdout=subprocess.PIPE)
    try:
        assert server.stdout is not None
        await asyncio.to_thread(server.stdout.readline)
        subs = await Subscribers(n).connect(f"ws://127.0.0.1:{port}/", client)
        control = await websockets.connect(f"ws://127.0.0.1:{port}/control")
        await asyncio.sleep(0.5)
        samples, client_cpu = [], []
        for _ in range(rounds):
            subs.expect("x" * 8)
            cpu = time.process_time()
            sent = time.perf_counter()
            await control.send(str(size))
            samples.append((await subs.wait() - sent) * 1000)
            client_cpu.append((time.process_time() - cpu) * 1000)
            await asyncio.sleep(0.05)
        await control.close()
        await subs.close()
        return {"to_last": samples, "client_cpu": client_cpu}
    finally:
        server.terminate()
        server.wait(timeout=10)


async def run(stack: Stack, subscribers: int, rounds: int, client: str) -> dict[str, Any]:
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

        pids = [p for p in stack.server_pids() if p != stack.server.pid] or stack.server_pids()
        await leaves(rest, epochs, 3, None)  # warm up
        cpu = cpu_ms(pids)
        alone = await leaves(rest, epochs, rounds, None)
        cpu_alone = (cpu_ms(pids) - cpu) / rounds / 2  # a leave and a join per round

        await asyncio.sleep(0.5)
        rss_before = rss_kib(pids)
        sockets_before = {pid: socket_count(pid) for pid in pids}
        subs = await Subscribers(subscribers).connect(ws_url, client, headers)
        first = await asyncio.wait_for(asyncio.gather(*subs.first), 60)
        message_size = len(first[0])
        await asyncio.sleep(1.0)
        rss_idle = rss_kib(pids)
        spread = [socket_count(pid) - sockets_before[pid] for pid in pids]

        await leaves(rest, epochs, 2, subs)  # warm up
        cpu = cpu_ms(pids)
        loaded = await leaves(rest, epochs, rounds, subs)
        cpu_loaded = (cpu_ms(pids) - cpu) / rounds / 2
        await subs.close()
    floor = await client_floor(subscribers, rounds, message_size, client)
    return {
        "alone": stats(alone["response"]),
        "response": stats(loaded["response"]),
        "to_last": stats(loaded["to_last"]),
        "floor": stats(floor["to_last"]),
        "floor_client_cpu": stats(floor["client_cpu"]),
        "cpu_alone": cpu_alone,
        "cpu_loaded": cpu_loaded,
        "kib_per_socket": (rss_idle - rss_before) / subscribers,
        "spread": spread,
        "message_size": message_size,
    }


def measure(subscribers: int, rounds: int, workers: int, client: str = "raw") -> dict[str, Any]:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    with Stack(workers=workers) as stack:
        return asyncio.run(run(stack, subscribers, rounds, client))


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
            "figure": f"pushes: server CPU for one fan-out to {subscribers:,} subscribers (both processes)",
            "ours": f"{r['cpu_loaded'] - r['cpu_alone']:.1f} ms",
            "anchor": f"{r['floor_client_cpu']['p50']:.1f} ms: the bench client's CPU to receive one broadcast",
            "ratio": None,
            "target": "stated",
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
    parser.add_argument("--client", choices=["raw", "websockets"], default="raw")
    args = parser.parse_args()
    r = measure(args.subscribers, args.rounds, args.workers, args.client)
    print(
        f"{args.subscribers} websocket subscribers to one group, {args.workers} server processes "
        f"(sockets per process: {'/'.join(map(str, r['spread']))}), {args.rounds} leaves, "
        f"message {r['message_size']} bytes; load average {os.getloadavg()[0]:.2f}"
    )
    print(f"  leave sent -> last subscriber has the new generation: {ms(r['to_last'])}")
    print(f"  leave response, {args.subscribers} subscribers:             {ms(r['response'])}")
    print(f"  leave response, no subscribers:                   {ms(r['alone'])}")
    print(f"  bench client floor (minimal broadcast server):    {ms(r['floor'])}")
    print(f"  bench client CPU per broadcast ({args.client} client):  {ms(r['floor_client_cpu'])}")
    print(
        f"  server CPU per leave or join (both processes): {r['cpu_loaded']:.1f} ms with "
        f"{args.subscribers} subscribers, {r['cpu_alone']:.1f} ms without"
    )
    print(f"  server RSS per idle websocket: {r['kib_per_socket']:.1f} KiB")


if __name__ == "__main__":
    main()
