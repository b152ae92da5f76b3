"""The client's consumer-group member (``conveyor.member``, ``conveyor.aio.member``) against live servers:
two uvicorn processes on the suite's Redis and database, the leader's expiry jobs in a process of their
own, members in this process and in child processes, and a TCP proxy standing for one member's network
path (paused or cut). Listeners record the intervals in which each member held each partition; no
partition may be held by two members (or incarnations) at once. The pure state machine
(``conveyor._member_state``) is tested alone first."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from conveyor import Registry
from conveyor import aio as conveyor_aio
from conveyor._member_state import ASSIGNED, LOST, REVOKED, MemberState, Snapshot, session_deadline
from conveyor.errors import Fenced, Forbidden, InvalidRequest, Unauthorized
from conveyor.listener import TopicPartition
from conveyor.member import GroupMember

from bench import history
from tests.conftest import database_url, wait_for

BASE = Path(__file__).resolve().parent.parent
TOPIC = "orders"
ALL = frozenset(TopicPartition(TOPIC, n) for n in range(12))

# ---------------------------------------------------------------- the pure state machine


def snap(generation: int, version: int, assigned=(), revoking=(), pending=(), epoch: int = 1) -> Snapshot:
    def parts(numbers: Any) -> frozenset[TopicPartition]:
        return frozenset(TopicPartition(TOPIC, n) for n in numbers)

    return Snapshot(generation, version, epoch, parts(assigned), parts(revoking), parts(pending))


def steps(state: MemberState, now: float = 0.0) -> list[tuple[str, list[int], int]]:
    """Run every step due (callbacks that return at once): what the application was told, in order."""
    told = []
    while (step := state.next_step(now)) is not None:
        state.before(step)
        told.append((step.kind, [tp.partition for tp in step.partitions], step.generation))
        state.after(step)
    return told


def test_state_assigns_only_owned_partitions_never_pending_ones() -> None:
    state = MemberState(session_timeout=10, safety_margin=1)
    state.begin(1, snap(1, 1, assigned=[0, 1], pending=[2, 3]), confirmed_until=10)
    assert steps(state) == [(ASSIGNED, [0, 1], 1)]
    assert not state.settled(0)  # 2 and 3 are still another member's
    assert state.offer(snap(1, 2, assigned=[0, 1, 2], pending=[3]))
    assert steps(state) == [(ASSIGNED, [2], 1)]
    assert state.assignment(0) == {TopicPartition(TOPIC, n) for n in (0, 1, 2)}


def test_state_drops_duplicate_stale_and_foreign_snapshots() -> None:
    state = MemberState(session_timeout=10, safety_margin=1)
    state.begin(5, snap(3, 7, assigned=[0], epoch=5), confirmed_until=10)
    assert not state.offer(snap(3, 7, assigned=[0, 1], epoch=5))  # the same version again (an ack's reply)
    assert not state.offer(snap(2, 9, assigned=[], epoch=5))  # an older generation
    assert not state.offer(snap(4, 8, assigned=[], epoch=4))  # another incarnation's
    assert state.offer(snap(3, 8, assigned=[0, 1], epoch=5))
    assert steps(state) == [(ASSIGNED, [0, 1], 3)]


def test_state_confirms_a_generation_only_once_its_revocation_returned() -> None:
    state = MemberState(session_timeout=10, safety_margin=1)
    state.begin(1, snap(1, 1, assigned=[0, 1, 2, 3]), confirmed_until=10)
    steps(state)
    assert state.processed == 1
    state.offer(snap(2, 2, assigned=[0, 1, 2, 3], revoking=[2, 3]))
    step = state.next_step(0)
    assert step is not None and step.kind == REVOKED and [tp.partition for tp in step.partitions] == [2, 3]
    state.before(step)
    # seen, not processed: a heartbeat now confirms 1, and 2 and 3 still count as held (the commit runs)
    assert state.processed == 1 and state.is_owned(TopicPartition(TOPIC, 3), 0) and state.ack_due()
    state.offer(snap(3, 3, assigned=[0, 1, 2, 3], revoking=[1, 2, 3]))  # a newer revocation meanwhile
    state.after(step)
    assert state.processed == 2 and not state.is_owned(TopicPartition(TOPIC, 3), 0)
    assert steps(state) == [(REVOKED, [1], 3)]
    assert state.processed == 3


def test_state_loses_everything_when_the_session_lapses_and_takes_it_back_once_confirmed() -> None:
    state = MemberState(session_timeout=10, safety_margin=1)
    state.begin(1, snap(1, 1, assigned=[0, 1]), confirmed_until=10)
    steps(state, now=0)
    assert state.is_owned(TopicPartition(TOPIC, 0), 8.9)
    assert not state.is_owned(TopicPartition(TOPIC, 0), 9.0)  # the margin: before the server's deadline
    state.offer(snap(2, 2, assigned=[0, 1], revoking=[1]))
    assert steps(state, now=9.5) == [(LOST, [0, 1], 2)]  # not revoked: no commit without a session
    assert state.processed == 2  # nothing is held, so the revocation may be confirmed
    state.confirm(20)
    assert steps(state, now=9.6) == [(ASSIGNED, [0], 2)]


def test_state_loses_what_the_server_no_longer_lists_and_everything_when_the_incarnation_ends() -> None:
    state = MemberState(session_timeout=10, safety_margin=1)
    state.begin(1, snap(1, 1, assigned=[0, 1, 2]), confirmed_until=10)
    steps(state)
    state.offer(snap(2, 2, assigned=[1, 2], revoking=[2]))
    assert steps(state) == [(LOST, [0], 2), (REVOKED, [2], 2)]
    state.end()
    assert state.assignment(0) == frozenset()  # at once, before the callback
    assert steps(state) == [(LOST, [1], 0)]
    with pytest.raises(RuntimeError):
        state.owned = frozenset({TopicPartition(TOPIC, 9)})
        state.begin(2, None, 10)


def test_session_deadline_is_the_earlier_of_send_time_plus_timeout_and_the_servers_word() -> None:
    wall = datetime.fromisoformat("2026-08-01T10:00:00+00:00").timestamp()
    assert session_deadline(100.0, 10, {}, 100.5, wall) == 110.0
    earlier = {"session_expires_at": "2026-08-01T10:00:05Z"}  # the server says 5 s from the answer
    assert session_deadline(100.0, 10, earlier, 100.5, wall) == pytest.approx(105.5)
    later = {"session_expires_at": "2026-08-01T10:00:30Z"}
    assert session_deadline(100.0, 10, later, 100.5, wall) == 110.0


# ---------------------------------------------------------------- live servers


@pytest.fixture
def key(make_token: Callable[..., Any]) -> str:
    return make_token("members")[1]


@pytest.fixture
def staff_key(make_token: Callable[..., Any]) -> str:
    return make_token("ops", staff=True)[1]


@pytest.fixture
def leader(redis_server: Any, servers: list[str]) -> Iterator[None]:
    """The leader's member-expiry and session-reconcile jobs, every 0.5 s, in a process of their own."""
    env = dict(os.environ, REDIS_URL=redis_server.url, DATABASE_URL=database_url(), HISTORY_CLEANUP="0.5")
    process = subprocess.Popen([sys.executable, "-c", history.LEADER_LOOP], cwd=BASE, env=env)
    yield
    process.kill()
    process.wait()


@pytest.fixture
def topic(servers: list[str], key: str) -> str:
    httpx.put(f"{servers[0]}/api/v1/topics/{TOPIC}/", json={"partitions": 12}, headers=auth(key)).raise_for_status()
    return TOPIC


@pytest.fixture
def members(servers: list[str], leader: None) -> Iterator[list[GroupMember]]:
    """Members made by a test, closed at its end (before the servers stop)."""
    made: list[GroupMember] = []
    yield made
    for member in made:
        member.close()


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@dataclass
class Held:
    partition: str
    holder: str
    start: float
    end: float = math.inf


class Book:
    """The intervals in which each member held each partition, from its listener's callbacks on one
    clock (``time.monotonic()``, shared with child processes): from ``on_partitions_assigned`` until
    ``on_partitions_revoked`` returned (the commit is part of holding) or ``on_partitions_lost`` began."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.intervals: list[Held] = []
        self.calls: list[tuple[str, str, list[str]]] = []

    def listener(self, holder: str, commit: float = 0.0, at_commit: Callable[[list[str]], None] | None = None) -> Any:
        return Recorder(self, holder, commit, at_commit)

    def open(self, holder: str, partitions: list[TopicPartition], at: float) -> None:
        with self.lock:
            self.calls.append((holder, ASSIGNED, [str(p) for p in partitions]))
            self.intervals += [Held(str(p), holder, at) for p in partitions]

    def close(self, holder: str, kind: str, partitions: list[TopicPartition], at: float) -> None:
        names = {str(p) for p in partitions}
        with self.lock:
            self.calls.append((holder, kind, sorted(names)))
            for held in self.intervals:
                if held.holder == holder and held.partition in names and held.end == math.inf:
                    held.end = at

    def held_by(self, holder: str) -> set[str]:
        with self.lock:
            return {h.partition for h in self.intervals if h.holder == holder and h.end == math.inf}

    def kinds(self, holder: str) -> list[str]:
        with self.lock:
            return [kind for who, kind, _ in self.calls if who == holder]

    def overlaps(self, extra: list[Held] = ()) -> list[str]:  # type: ignore[assignment]
        with self.lock:
            intervals = [*self.intervals, *extra]
        found = []
        for p in sorted({h.partition for h in intervals}):
            mine = sorted((h for h in intervals if h.partition == p), key=lambda h: h.start)
            for i, a in enumerate(mine):
                found += [f"{p}: {a} and {b}" for b in mine[i + 1 :] if b.start < a.end]
        return found

    def moved(self) -> int:
        """How many partitions had more than one holder."""
        with self.lock:
            holders: dict[str, set[str]] = {}
            for h in self.intervals:
                holders.setdefault(h.partition, set()).add(h.holder)
        return sum(1 for names in holders.values() if len(names) > 1)


class Recorder:
    def __init__(self, book: Book, holder: str, commit: float, at_commit: Callable[[list[str]], None] | None) -> None:
        self.book, self.holder, self.commit, self.at_commit = book, holder, commit, at_commit
        self.revoking = threading.Event()

    def on_partitions_assigned(self, partitions: list[TopicPartition]) -> None:
        self.book.open(self.holder, partitions, time.monotonic())

    def on_partitions_revoked(self, partitions: list[TopicPartition]) -> None:
        self.revoking.set()
        time.sleep(self.commit)  # committing offsets takes a while
        if self.at_commit is not None:
            self.at_commit([str(p) for p in partitions])
        self.book.close(self.holder, REVOKED, partitions, time.monotonic())
        self.revoking.clear()

    def on_partitions_lost(self, partitions: list[TopicPartition]) -> None:
        self.book.close(self.holder, LOST, partitions, time.monotonic())


class Proxy:
    """One member's network path: a TCP proxy in front of a server. ``pause()`` drops everything both
    ways (connections stay open and new ones are accepted, so requests hang until they time out);
    ``resume()`` resets the connections that saw the pause, as a healed network would, and lets new
    ones through; ``cut()`` resets every connection at once. ``websockets`` counts upgrade requests."""

    def __init__(self, target: str) -> None:
        self.target = ("127.0.0.1", int(target.rsplit(":", 1)[1]))
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.paused = False
        self.websockets = 0
        self.connections: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self) -> None:
        while True:
            try:
                downstream, _ = self.server.accept()
                upstream = socket.create_connection(self.target)
            except OSError:
                return
            with self.lock:
                self.connections += [downstream, upstream]
            threading.Thread(target=self.pump, args=(downstream, upstream, True), daemon=True).start()
            threading.Thread(target=self.pump, args=(upstream, downstream, False), daemon=True).start()

    def pump(self, source: socket.socket, sink: socket.socket, from_client: bool) -> None:
        first = from_client
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if first and data.startswith(b"GET /ws/"):
                    self.websockets += 1
                first = False
                if not self.paused:
                    sink.sendall(data)
        for s in (source, sink):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        with self.lock:
            connections, self.connections = self.connections, []
        for s in connections:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.cut()
        self.paused = False

    def close(self) -> None:
        self.server.close()
        self.cut()


@pytest.fixture
def proxy(servers: list[str]) -> Iterator[Proxy]:
    p = Proxy(servers[0])
    yield p
    p.close()


def group_members(url: str, key: str, group: str = "g") -> dict[str, dict[str, Any]]:
    body = httpx.get(f"{url}/api/v1/groups/{group}/", headers=auth(key), timeout=10).json()
    return {m["member_id"]: m for m in body.get("members", [])}


def owned_on_server(url: str, key: str, member_id: str, group: str = "g") -> set[str]:
    member = group_members(url, key, group).get(member_id, {})
    return {f"{t}:{n}" for t, numbers in member.get("assigned_partitions", {}).items() for n in numbers}


def member(made: list[GroupMember], url: str, key: str, member_id: str, listener: Any, **kwargs: Any) -> GroupMember:
    kwargs.setdefault("session_timeout", 6)
    m = Registry(url, key).group_member("g", topics=[TOPIC], member_id=member_id, listener=listener, **kwargs)
    made.append(m)
    return m


async def until(check: Callable[[], Any], seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"not true within {seconds}s"
        await asyncio.sleep(0.02)


def split(*ms: GroupMember) -> list[int]:
    return sorted(len(m.wait_for_assignment(60)) for m in ms)


@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(180)
def test_a_revocation_is_confirmed_only_after_a_slow_commit_and_owners_never_overlap(servers, key, topic, members):
    a_url, b_url = servers
    book = Book()
    seen_at_commit: list[tuple[set[str], set[str]]] = []

    def at_commit(partitions: list[str]) -> None:
        # the end of a's commit, just before its callback returns: the server must still list them as a's
        seen_at_commit.append((set(partitions), owned_on_server(b_url, key, "a")))

    a = member(members, a_url, key, "a", book.listener("a", commit=1.5, at_commit=at_commit))
    assert a.wait_for_assignment(30) == ALL
    b = member(members, b_url, key, "b", book.listener("b", commit=1.5))
    c = member(members, a_url, key, "c", book.listener("c", commit=1.5))
    wait_for(lambda: split(a, b, c) == [4, 4, 4], 60)
    assert a.assignment | b.assignment | c.assignment == ALL

    a.close()  # revokes (a commits), then leaves
    # b and c hold their old 4 each until the new generation reaches them: wait for the 6/6 split itself
    wait_for(lambda: split(b, c) == [6, 6], 60)

    assert book.overlaps() == []
    assert book.moved() >= 8  # from a to b and c, then a's 4 again
    assert seen_at_commit and all(revoked <= on_server for revoked, on_server in seen_at_commit)
    kinds = book.kinds("a")
    assert kinds[0] == ASSIGNED and set(kinds[1:]) == {REVOKED} and len(kinds) >= 3
    assert LOST not in book.kinds("a") + book.kinds("b") + book.kinds("c")


@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(180)
def test_a_peer_killed_with_sigkill_gives_its_partitions_up_after_its_session(servers, key, topic, members, tmp_path):
    a_url, b_url = servers
    book = Book()
    a = member(members, a_url, key, "a", book.listener("a"), session_timeout=4)
    assert a.wait_for_assignment(30) == ALL
    out = tmp_path / "peer.jsonl"
    peer = subprocess.Popen(
        [sys.executable, str(BASE / "bench" / "history_client_member.py"), "--url", b_url, "--token", key,
         "--group", "g", "--member-id", "peer", "--topics", TOPIC, "--session-timeout", "4", "--out", str(out)],
        cwd=BASE,
    )  # fmt: skip
    try:
        wait_for(lambda: out.exists() and len(history.read_histories([out], {}, time.monotonic()).intervals) == 6, 30)
        wait_for(lambda: split(a) == [6], 60)
        peer.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        peer.wait()
    finally:
        peer.kill()
    wait_for(lambda: a.assignment == ALL, 60)  # once the server expired the peer's session

    peer_intervals = history.read_histories([out], {out.name: killed_at}, killed_at).intervals
    peers = [Held(i.partition, "peer", i.start, i.end) for i in peer_intervals]
    assert len(peers) == 6 and all(h.end <= killed_at for h in peers)
    assert book.overlaps(peers) == []
    # each of the peer's partitions went to a after the peer stopped holding it (on a slow machine the
    # peer may have lost its session, and a taken them over, just before the kill)
    for held in peers:
        assert any(h.partition == held.partition and h.start >= held.end for h in book.intervals), held
    assert "peer" not in group_members(a_url, key)


@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(180)
def test_a_member_whose_session_cannot_be_confirmed_stops_before_the_servers_deadline(
    servers, key, topic, proxy, members
):
    _, b_url = servers
    book = Book()
    lost_at: list[tuple[float, frozenset[TopicPartition]]] = []
    listener = book.listener("a")
    record_loss = listener.on_partitions_lost

    def on_lost(partitions: list[TopicPartition]) -> None:
        lost_at.append((time.time(), a.assignment))
        record_loss(partitions)

    listener.on_partitions_lost = on_lost
    a = member(members, proxy.url, key, "a", listener, session_timeout=5)
    b = member(members, b_url, key, "b", book.listener("b"), session_timeout=5)
    wait_for(lambda: split(a, b) == [6, 6], 60)
    epoch = a.member_epoch

    proxy.pause()  # a's network path: nothing passes
    deadlines = []  # the server's session deadline for a, as it shows it
    while not lost_at:
        shown = group_members(b_url, key).get("a", {}).get("session_expires_at")
        deadlines += [datetime.fromisoformat(shown.replace("Z", "+00:00")).timestamp()] if shown else []
        time.sleep(0.05)
    lost_wall, held_then = lost_at[0]
    assert deadlines and lost_wall < deadlines[-1]  # it stopped before the server's deadline...
    assert held_then == frozenset() and a.assignment == frozenset()  # ...and held nothing from then on
    assert book.held_by("a") == set()

    wait_for(lambda: b.assignment == ALL, 60)  # the server removed a when its session ran out
    assert book.overlaps() == []

    proxy.resume()  # a learns it was removed (404), joins again as a new incarnation
    wait_for(lambda: a.member_epoch > epoch, 30)
    wait_for(lambda: split(a, b) == [6, 6], 60)
    assert book.overlaps() == []
    assert book.kinds("a")[:3] == [ASSIGNED, REVOKED, LOST]  # all, then half to b, then lost


@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(180)
def test_a_connection_cut_in_the_middle_of_a_revocation_changes_nothing(servers, key, topic, proxy, members):
    a_url, b_url = servers
    book = Book()
    slow = book.listener("a", commit=2.0)
    a = member(members, proxy.url, key, "a", slow)
    assert a.wait_for_assignment(30) == ALL
    wait_for(lambda: proxy.websockets == 1, 30)
    epoch, sockets = a.member_epoch, proxy.websockets

    b = member(members, b_url, key, "b", book.listener("b"))
    wait_for(slow.revoking.is_set, 30)
    proxy.cut()  # a's socket and its keep-alive HTTP connection, while it commits
    wait_for(lambda: split(a, b) == [6, 6], 60)
    wait_for(lambda: proxy.websockets > sockets, 30)  # the socket came back

    c = member(members, a_url, key, "c", book.listener("c"))
    wait_for(lambda: split(a, b, c) == [4, 4, 4], 60)  # followed over the new socket
    assert a.member_epoch == epoch  # never removed or fenced
    assert book.kinds("a") == [ASSIGNED, REVOKED, REVOKED]  # each revocation once, nothing lost
    assert book.overlaps() == []


@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(180)
def test_a_static_member_fenced_by_a_second_incarnation_loses_everything_and_stops(servers, key, topic, members):
    a_url, b_url = servers
    book = Book()
    first = member(members, a_url, key, "s", book.listener("first"), static=True, session_timeout=4)
    assert first.wait_for_assignment(30) == ALL
    second = member(members, b_url, key, "s", book.listener("second"), static=True, session_timeout=4)
    assert second.wait_for_assignment(60) == ALL  # once the first incarnation's session deadline passed

    wait_for(lambda: first.error is not None, 30)
    assert isinstance(first.error, Fenced)
    assert first.member_epoch == 0 and first.assignment == frozenset()
    assert book.kinds("first") == [ASSIGNED, LOST]
    assert book.overlaps() == []
    assert group_members(a_url, key)["s"]["member_epoch"] == second.member_epoch  # the first did not come back


@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(180)
def test_a_dynamic_member_whose_id_is_in_use_joins_once_the_other_incarnation_left(servers, key, topic, members):
    a_url, b_url = servers
    book = Book()
    first = member(members, a_url, key, "d", book.listener("first"))
    assert first.wait_for_assignment(30) == ALL
    second = member(members, b_url, key, "d", book.listener("second"))  # refused (member_id_in_use): retries
    assert second.member_epoch == 0 and second.assignment == frozenset()
    first.close()
    assert second.wait_for_assignment(60) == ALL
    assert book.kinds("first") == [ASSIGNED, REVOKED]
    assert book.overlaps() == []


@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(180)
def test_a_member_removed_by_an_operator_loses_its_partitions_and_joins_again(servers, key, staff_key, topic, members):
    a_url, b_url = servers
    book = Book()
    a = member(members, a_url, key, "a", book.listener("a"))
    assert a.wait_for_assignment(30) == ALL
    epoch = a.member_epoch
    httpx.delete(f"{b_url}/api/v1/groups/g/members/a/", headers=auth(staff_key)).raise_for_status()
    wait_for(lambda: a.member_epoch > epoch, 30)
    assert a.wait_for_assignment(30) == ALL
    assert book.kinds("a") == [ASSIGNED, LOST, ASSIGNED]
    assert book.overlaps() == []


@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(180)
def test_the_asyncio_member_has_the_same_names_and_awaits_async_callbacks(servers, key, topic, leader):
    a_url, b_url = servers
    book = Book()
    loop_threads: set[int] = set()

    class AsyncRecorder:
        def __init__(self, holder: str) -> None:
            self.holder = holder

        async def on_partitions_assigned(self, partitions: list[TopicPartition]) -> None:
            loop_threads.add(threading.get_ident())
            book.open(self.holder, partitions, time.monotonic())

        async def on_partitions_revoked(self, partitions: list[TopicPartition]) -> None:
            await asyncio.sleep(1.0)  # an async commit
            book.close(self.holder, REVOKED, partitions, time.monotonic())

        async def on_partitions_lost(self, partitions: list[TopicPartition]) -> None:
            book.close(self.holder, LOST, partitions, time.monotonic())

    async def scenario() -> list[int]:
        async with conveyor_aio.Registry(a_url, key) as reg_a, conveyor_aio.Registry(b_url, key) as reg_b:
            kwargs = {"topics": [TOPIC], "session_timeout": 6}
            async with reg_a.group_member("g", member_id="a", listener=AsyncRecorder("a"), **kwargs) as a:
                assert await a.wait_for_assignment(30) == ALL
                async with reg_b.group_member("g", member_id="b", listener=AsyncRecorder("b"), **kwargs) as b:
                    await b.wait_for_assignment(60)
                    # a holds all 12 until its revocation's commit returns; then each holds 6
                    await until(lambda: len(a.assignment) == 6 and len(b.assignment) == 6)
                    sizes = sorted([len(a.assignment), len(b.assignment)])
                    assert a.is_owned(next(iter(a.assignment))) and not a.is_owned((TOPIC, 99))
                await until(lambda: a.assignment == ALL)  # b left
        return sizes

    assert asyncio.run(scenario()) == [6, 6]
    assert loop_threads == {threading.get_ident()}  # coroutine callbacks run on the member's loop
    assert book.kinds("a") == [ASSIGNED, REVOKED, ASSIGNED, REVOKED]
    assert book.overlaps() == []


@pytest.mark.timeout(240)
def test_short_history_with_client_members_has_no_violation(tmp_path: Path) -> None:
    faults = ["kill", "freeze", "duplicate", "leave", "redis"]
    args = history.parser().parse_args(
        ["--client", "--seed", "7", "--slack", "8", "--seconds", "15", "--faults", *faults]
    )
    figures = history.run_history(args, tmp_path)
    assert figures["violations"] == {"overlap": 0, "unowned": 0, "generation": 0}, figures["violation_lines"]
    assert set(figures["faults"]) == set(faults)
    assert figures["partitions"] == len(history.ALL_PARTITIONS)
    assert figures["incarnations"] > 6


@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(60)
def test_a_join_refused_for_good_raises_from_the_constructor(servers, key, make_token, topic, members):
    a_url, _ = servers
    member(members, a_url, key, "a", None)  # the group is key's now
    other = make_token("other")[1]
    with pytest.raises(Forbidden):
        Registry(a_url, other).group_member("g", topics=[TOPIC], member_id="b")
    with pytest.raises(Unauthorized):
        Registry(a_url, "not-a-token").group_member("g", topics=[TOPIC], member_id="b")
    with pytest.raises(InvalidRequest) as refused:
        Registry(a_url, key).group_member("g", topics=["no spaces allowed"], member_id="b")
    assert "topics" in refused.value.fields
    assert set(group_members(a_url, key)) == {"a"}  # none of them joined
