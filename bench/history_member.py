"""A consumer-group member process for the history checker (bench/history.py), and nothing else: it
joins a group, follows its assignment over the member websocket, "consumes" exactly what it may, and
writes every consumption interval to a JSON-lines history with time.monotonic() timestamps.

The rules it keeps are the README's:

- it consumes a partition while the newest assignment on its socket lists it under
  ``assigned_partitions`` and not under ``revoking``, and while its session is confirmed: the send
  time of its last member heartbeat answered 200 (or of its join) plus ``session_timeout`` has not
  passed. The send time, not the answer's arrival: the server's deadline is never earlier;
- revoking stops consumption first, then the heartbeat confirms the generation (the ack);
- fenced (409, close 4409), removed (404, close 4410) or a lost socket: it stops at once.

Consumption is a tick loop: a partition "was consumed at t" for each tick t that included it, and an
interval is [first tick, last tick]. A process stopped by SIGSTOP consumes nothing while stopped, and
on SIGCONT its first tick sees the lapsed deadline and closes its intervals at the tick before.

Signals: SIGTERM leaves cleanly (stop, DELETE, exit 0); SIGUSR1 leaves and joins again. A static
member that is fenced exits (another process took its id); any other ended incarnation joins again.
``--broken`` keeps consuming revoked partitions for 2 s after acking them: a client that breaks the
protocol, so that the checker can be shown to catch it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import time
from typing import Any

import httpx
import websockets

TICK = 0.05


def parts(mapping: dict[str, list[int]] | None) -> set[str]:
    return {f"{topic}:{n}" for topic, numbers in (mapping or {}).items() for n in numbers}


class Member:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = open(args.out, "a", buffering=1)  # noqa: SIM115 - line-buffered for the process's life
        self.http = httpx.AsyncClient(
            base_url=args.url, headers={"Authorization": f"Bearer {args.token}"}, timeout=args.session_timeout
        )
        self.inc = ""  # "member_id:epoch" of the current incarnation
        self.epoch = 0
        self.owned: set[str] = set()
        self.revoking: set[str] = set()
        self.deadline = 0.0  # monotonic time until which the session is confirmed
        self.consuming: set[str] = set()
        self.last_tick = 0.0
        self.linger: dict[str, float] = {}  # --broken: revoked partitions consumed until then
        self.confirmed = 0
        self.ack_now = asyncio.Event()
        self.ended: asyncio.Future[str] | None = None
        self.stopping = ""  # "leave" (SIGTERM) or "rejoin" (SIGUSR1)
        self.held: list[str] = []  # what it consumed when told to leave

    def log(self, event: str, **fields: Any) -> None:
        self.out.write(json.dumps({"ev": event, "inc": self.inc, "pid": _pid(), **fields}) + "\n")

    def tick(self) -> None:
        """Consume one tick: start and stop intervals so that ``consuming`` is what may be consumed now."""
        now = time.monotonic()
        live = self.ended is not None and not self.ended.done()
        allowed = self.owned - self.revoking if live and now < self.deadline else set()
        if self.args.broken:
            allowed |= {p for p, until in self.linger.items() if now < until}
        for p in sorted(self.consuming - allowed):
            self.log("stop", p=p, t=self.last_tick)
        for p in sorted(allowed - self.consuming):
            self.log("start", p=p, t=now)
        self.consuming = allowed
        self.last_tick = now

    def end(self, why: str) -> None:
        """The incarnation is over: consume nothing from now on."""
        if self.ended is not None and not self.ended.done():
            self.ended.set_result(why)
        self.owned, self.revoking = set(), set()
        self.tick()

    async def join(self) -> bool:
        body = {
            "member_id": self.args.member_id,
            "service_name": "history",
            "topics": self.args.topics,
            "session_timeout": self.args.session_timeout,
            "static": self.args.static,
        }
        sent = time.monotonic()
        try:
            answer = await self.http.post(f"/api/v1/groups/{self.args.group}/members/", json=body)
        except httpx.HTTPError:
            return False
        if answer.status_code not in (200, 201):
            return False
        self.epoch = answer.json()["member_epoch"]
        self.inc = f"{self.args.member_id}:{self.epoch}"
        self.deadline = sent + self.args.session_timeout
        self.confirmed = 0
        self.log("join", t=sent, static=self.args.static)
        return True

    async def heartbeats(self) -> None:
        interval = max(0.2, self.args.session_timeout / 5)
        path = f"/api/v1/groups/{self.args.group}/members/{self.args.member_id}/heartbeat/"
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.ack_now.wait(), interval)
            self.ack_now.clear()
            sent, generation = time.monotonic(), self.confirmed
            try:
                answer = await self.http.post(path, json={"generation": generation, "member_epoch": self.epoch})
            except httpx.HTTPError:
                continue  # unconfirmed: the deadline runs out on its own
            if answer.status_code == 200:
                self.deadline = max(self.deadline, sent + self.args.session_timeout)
            elif answer.status_code == 409:
                self.end("fenced")
                return
            elif answer.status_code == 404:
                self.end("removed")
                return

    async def follow(self) -> None:
        url = self.args.url.replace("http", "ws", 1)
        url += f"/ws/groups/{self.args.group}/members/{self.args.member_id}/?member_epoch={self.epoch}"
        headers = {"Authorization": f"Bearer {self.args.token}"}
        while True:
            try:
                async with websockets.connect(url, additional_headers=headers, open_timeout=5) as ws:
                    async for raw in ws:
                        self.on_message(json.loads(raw))
            except websockets.ConnectionClosed as exc:
                code = exc.rcvd.code if exc.rcvd else None
                if code == 4409:
                    self.end("fenced")
                    return
                if code in (4410, 4404):
                    self.end("removed")
                    return
            except (OSError, TimeoutError, websockets.InvalidStatus):
                pass
            # the socket was lost: nothing is known about the assignment until it is back
            self.owned, self.revoking = set(), set()
            self.tick()
            await asyncio.sleep(0.2)

    def on_message(self, message: dict[str, Any]) -> None:
        if message.get("type") != "member.assignment":
            if message.get("code") == "fenced_member_epoch":
                self.end("fenced")
            return
        generation = message["generation"]
        self.log("gen", g=generation, v=message.get("version"), t=time.monotonic())
        owned, revoking = parts(message.get("assigned_partitions")), parts(message.get("revoking"))
        if self.args.broken:
            until = time.monotonic() + 2
            for p in (self.owned - owned) | revoking:
                self.linger.setdefault(p, until)
            revoking = set()
        self.owned, self.revoking = owned, revoking
        self.tick()  # revoked partitions stop here, before the ack below
        if generation > self.confirmed:
            self.confirmed = generation
            if message.get("revoking"):
                self.ack_now.set()

    async def consume(self) -> None:
        while True:
            self.tick()
            await asyncio.sleep(TICK)

    async def incarnation(self) -> str:
        loop = asyncio.get_running_loop()
        self.ended = loop.create_future()
        tasks = [asyncio.create_task(c) for c in (self.heartbeats(), self.follow(), self.consume())]
        why = await self.ended
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.ended = None
        self.tick()
        return why

    async def leave(self) -> None:
        self.end("leave")
        self.log("leave", t=time.monotonic(), held=self.held)
        with contextlib.suppress(httpx.HTTPError):
            await self.http.delete(
                f"/api/v1/groups/{self.args.group}/members/{self.args.member_id}/", params={"member_epoch": self.epoch}
            )

    def on_signal(self, what: str) -> None:
        self.stopping = what
        self.held = sorted(self.consuming)
        if self.ended is not None and not self.ended.done():
            self.ended.set_result(what)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.on_signal, "leave")
        loop.add_signal_handler(signal.SIGUSR1, self.on_signal, "rejoin")
        self.log("process", t=time.monotonic(), member_id=self.args.member_id)
        for _attempt in range(600):  # bounded: a dynamic id waits for its previous session to end
            if self.stopping == "leave":
                break
            self.stopping = ""
            if not await self.join():
                await asyncio.sleep(0.3)
                continue
            # a signal during the join: act on it now (the incarnation would not see it)
            why = self.stopping or await self.incarnation()
            self.log("end", why=why, t=time.monotonic())
            if why in ("leave", "rejoin"):
                await self.leave()
                if why == "leave":
                    break
                await asyncio.sleep(1)
            elif why == "fenced" and self.args.static:
                break  # another process took this static id
        self.tick()
        await self.http.aclose()
        self.out.close()


def _pid() -> int:
    return os.getpid()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--member-id", required=True)
    parser.add_argument("--topics", nargs="+", required=True)
    parser.add_argument("--session-timeout", type=int, default=4)
    parser.add_argument("--static", action="store_true")
    parser.add_argument("--broken", action="store_true")
    parser.add_argument("--out", required=True)
    asyncio.run(Member(parser.parse_args()).run())


if __name__ == "__main__":
    main()
