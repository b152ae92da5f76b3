"""A consumer-group member process for the history checker (bench/history.py --client), built on the
client library (``conveyor.member.GroupMember``) instead of the raw protocol of
bench/history_member.py. Same command line, same JSON-lines history, same signals:

- it consumes, tick by tick, exactly what ``member.assignment`` holds at that tick (the client's
  local state: assigned, not yet revoked or lost, and only while its session is confirmed), under the
  incarnation ``member_id:member_epoch`` it belongs to;
- SIGTERM closes the member (revoke, then leave) and exits; SIGUSR1 closes it and starts a new one;
- a static member that is fenced stops (the client does, with ``Fenced``) and the process exits; any
  other ended incarnation is joined again by the client itself.

``--commit-seconds`` makes ``on_partitions_revoked`` take that long, as a commit would.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from conveyor import Registry
from conveyor.listener import TopicPartition
from conveyor.member import GroupMember

TICK = 0.05


class Committer:
    """The listener: a revocation "commits" for ``seconds``. The ticks follow ``member.assignment``;
    an assignment or a loss also ticks at once, as an application starts or stops consuming there."""

    def __init__(self, seconds: float, tick: Callable[[], None]) -> None:
        self.seconds = seconds
        self.tick = tick

    def on_partitions_revoked(self, partitions: list[TopicPartition]) -> None:
        time.sleep(self.seconds)

    def on_partitions_assigned(self, partitions: list[TopicPartition]) -> None:
        self.tick()

    def on_partitions_lost(self, partitions: list[TopicPartition]) -> None:
        self.tick()


class Process:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = open(args.out, "a", buffering=1)  # noqa: SIM115 - line-buffered for the process's life
        self.lock = threading.Lock()
        self.registry = Registry(args.url, args.token, timeout=args.session_timeout)
        self.member: GroupMember | None = None
        self.inc = ""
        self.generation = 0
        self.consuming: set[str] = set()
        self.last_tick = 0.0
        self.stopping = ""  # "leave" (SIGTERM) or "rejoin" (SIGUSR1)

    def log(self, event: str, **fields: Any) -> None:
        self.out.write(json.dumps({"ev": event, "inc": self.inc, "pid": os.getpid(), **fields}) + "\n")

    def tick(self) -> None:
        """Consume one tick: what the member holds now, under the incarnation it holds it for."""
        with self.lock:
            now = time.monotonic()
            member, inc, allowed, generation = self.member, "", set(), 0
            if member is not None:
                epoch = member.member_epoch
                held = member.assignment
                generation = member.generation
                if epoch and member.member_epoch == epoch:  # no new incarnation between the two reads
                    inc, allowed = f"{member.member_id}:{epoch}", {str(tp) for tp in held}
            if inc and inc != self.inc:
                self.stop_all()
                self.inc = inc
                self.generation = 0
                self.log("join", t=now, static=self.args.static)
            if inc and generation and generation != self.generation:
                self.generation = generation
                self.log("gen", g=generation, t=now)
            for p in sorted(self.consuming - allowed):
                self.log("stop", p=p, t=self.last_tick)
            for p in sorted(allowed - self.consuming):
                self.log("start", p=p, t=now)
            self.consuming = allowed
            self.last_tick = now

    def stop_all(self) -> None:
        for p in sorted(self.consuming):
            self.log("stop", p=p, t=self.last_tick)
        self.consuming = set()

    def join(self) -> GroupMember:
        return self.registry.group_member(
            self.args.group,
            topics=self.args.topics,
            listener=Committer(self.args.commit_seconds, self.tick),
            member_id=self.args.member_id,
            service_name="history",
            static=self.args.static,
            session_timeout=self.args.session_timeout,
        )

    def close(self, member: GroupMember) -> None:
        """Close ``member`` in a thread while the ticks go on, so they record its revocation."""
        closer = threading.Thread(target=member.close)
        closer.start()
        while closer.is_alive():
            self.tick()
            time.sleep(TICK)
        self.tick()

    def on_signal(self, signum: int, _frame: Any) -> None:
        self.stopping = "leave" if signum == signal.SIGTERM else "rejoin"

    def run(self) -> None:
        signal.signal(signal.SIGTERM, self.on_signal)
        signal.signal(signal.SIGUSR1, self.on_signal)
        self.log("process", t=time.monotonic(), member_id=self.args.member_id)
        while self.stopping != "leave":
            self.stopping = ""
            self.member = self.join()
            while not self.stopping and self.member.error is None:
                self.tick()
                time.sleep(TICK)
            if self.member.error is not None:
                # the client stopped by itself: a static id fenced by another process, or refused
                self.log("end", why=type(self.member.error).__name__, t=time.monotonic())
                self.member.close()
                self.tick()
                break
            with self.lock:
                held = sorted(self.consuming)
            self.log("end", why=self.stopping, t=time.monotonic())
            self.log("leave", t=time.monotonic(), held=held)
            self.close(self.member)
            if self.stopping == "rejoin":
                time.sleep(1)
        self.tick()
        self.registry.close()
        self.out.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--member-id", required=True)
    parser.add_argument("--topics", nargs="+", required=True)
    parser.add_argument("--session-timeout", type=int, default=4)
    parser.add_argument("--static", action="store_true")
    parser.add_argument("--commit-seconds", type=float, default=0.0)
    parser.add_argument("--broken", action="store_true", help="refused: the client keeps the protocol")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.broken:
        parser.error("--broken: a member built on the client cannot keep consuming revoked partitions")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    Process(args).run()


if __name__ == "__main__":
    main()
