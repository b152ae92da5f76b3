"""The push fast path of registry.consumers: a push written straight to the socket's transport when the
socket has nothing of its own in flight, the task path otherwise, the same rules on both, order kept, and
a socket too far behind closed without holding memory. Consumers are driven here with a stand-in for
uvicorn's websockets protocol; tests/test_websockets_e2e.py runs the same paths over real servers."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from websockets.protocol import CLOSING, OPEN

from groups.consumers import GroupConsumer, MemberConsumer
from registry import consumers
from registry.consumers import DirectSend, PushConsumer, ServicesConsumer, push_frame
from registry.push import push_message


class FakeTransport:
    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.frames.append(data)

    def is_closing(self) -> bool:
        return self.aborted

    def abort(self) -> None:
        self.aborted = True


class FakeConn:
    def __init__(self) -> None:
        self.state = OPEN
        self.expect_continuation_frame = False
        self.extensions: list[Any] = []
        self.writes: list[bytes] = []


class FakeProtocol:
    """The attributes of uvicorn's WebSocketsSansIOProtocol that DirectSend reads."""

    def __init__(self) -> None:
        self.writable = asyncio.Event()
        self.writable.set()
        self.disconnected = False
        self.close_sent = False
        self.handshake_complete = True
        self.initial_response = None
        self.conn = FakeConn()
        self.transport = FakeTransport()


def text_of(frame: bytes) -> str:
    assert frame[0] == 0x81  # FIN + text, one frame
    length, start = frame[1], 2
    assert length & 0x80 == 0  # a server frame is never masked
    if length == 126:
        length, start = int.from_bytes(frame[2:4], "big"), 4
    return frame[start : start + length].decode()


def group_push(generation: int, version: int = 0, padding: int = 0) -> dict[str, Any]:
    payload = {"type": "group.assignment", "generation": generation, "version": version, "pad": "x" * padding}
    return push_message(payload)


def consumer(cls: type[PushConsumer] = GroupConsumer) -> tuple[PushConsumer, FakeProtocol, list[str]]:
    """A consumer as its __call__ sets it up, with a stand-in socket; the list gets what went through the
    ASGI send (the task path)."""
    protocol = FakeProtocol()
    through_asgi: list[str] = []
    gate = asyncio.Event()
    gate.set()

    async def asgi_send(message: dict[str, Any]) -> None:
        await gate.wait()
        through_asgi.append(message["text"])

    c = cls()
    c.scope = {"url_route": {"kwargs": {}}, "query_string": b""}
    c.base_send = asgi_send
    c.turn = asyncio.Lock()
    c.backlog = None
    c.socket = DirectSend(protocol)
    c.direct = c.socket if c.direct_pushes else None
    c.gate = gate  # type: ignore[attr-defined]
    return c, protocol, through_asgi


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


def test_only_consumers_whose_rules_news_tells_take_the_fast_path() -> None:
    assert GroupConsumer.direct_pushes
    assert ServicesConsumer.direct_pushes
    assert not MemberConsumer.direct_pushes  # its forward closes sockets and answers acks: task path

    class Changed(GroupConsumer):
        async def forward(self, payload: dict[str, Any], text: str | None = None) -> None:
            await super().forward(payload, text)

    assert not Changed.direct_pushes


def test_direct_send_is_found_through_wrappers_and_only_for_uvicorns_protocol() -> None:
    from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

    protocol = WebSocketsSansIOProtocol.__new__(WebSocketsSansIOProtocol)
    assert DirectSend.of(protocol.send) is None  # not connected
    stand_in = FakeProtocol()
    protocol.conn, protocol.transport, protocol.writable = stand_in.conn, stand_in.transport, stand_in.writable

    async def wrapper(message: dict[str, Any]) -> None:
        await protocol.send(message)

    wrapper.__wrapped__ = protocol.send  # type: ignore[attr-defined]
    found = DirectSend.of(wrapper)
    assert found is not None and found.protocol is protocol
    assert DirectSend.of(protocol.send) is not None

    async def opaque(message: dict[str, Any]) -> None:
        pass

    assert DirectSend.of(opaque) is None  # a test communicator, another server: the ASGI send


def test_a_push_is_written_to_the_transport_at_once_and_encoded_once() -> None:
    async def scenario() -> None:
        a, pa, asgi_a = consumer()
        b, pb, asgi_b = consumer()
        event = group_push(3, padding=300)  # a frame with a 2-byte length
        a.deliver(event)
        b.deliver(event)
        assert a.backlog is None and b.backlog is None  # no task
        assert pa.transport.frames == pb.transport.frames == [push_frame(event)]
        assert pa.transport.frames[0] is pb.transport.frames[0]
        assert json.loads(text_of(pa.transport.frames[0])) == event["payload"]
        assert asgi_a == asgi_b == []
        # not news (older than what the socket has): dropped, as forward would
        a.deliver(group_push(2))
        assert len(pa.transport.frames) == 1
        a.deliver(group_push(3, 1))
        assert [json.loads(text_of(f))["version"] for f in pa.transport.frames] == [0, 1]

    asyncio.run(scenario())


@pytest.mark.parametrize(
    "block",
    [
        lambda p: p.writable.clear(),  # backpressure: the transport is paused
        lambda p: setattr(p, "close_sent", True),
        lambda p: setattr(p.conn, "state", CLOSING),
        lambda p: p.conn.extensions.append(object()),  # compression negotiated
        lambda p: p.conn.writes.append(b"queued"),
    ],
)
def test_a_socket_that_would_make_the_send_wait_takes_the_task_path_in_order(block: Any) -> None:
    async def scenario() -> None:
        c, protocol, through_asgi = consumer()
        block(protocol)
        c.deliver(group_push(1))
        assert protocol.transport.frames == [] and c.backlog is not None
        protocol.writable.set()  # unblocked: later pushes still queue behind the running task
        protocol.close_sent = False
        protocol.conn.__init__()
        c.deliver(group_push(2))
        assert protocol.transport.frames == []
        await settle()
        assert [json.loads(t)["generation"] for t in through_asgi] == [1, 2]
        assert c.backlog is None
        c.deliver(group_push(3))  # nothing in flight again: fast path
        assert [json.loads(text_of(f))["generation"] for f in protocol.transport.frames] == [3]

    asyncio.run(scenario())


def test_a_push_waits_for_the_sockets_own_message_being_answered() -> None:
    async def scenario() -> None:
        c, protocol, through_asgi = consumer()
        await c.turn.acquire()  # an ack or the connect is being handled
        c.deliver(group_push(5))
        assert protocol.transport.frames == []
        await c.send(text_data='{"type": "answer"}')
        c.turn.release()
        await settle()
        assert through_asgi == ['{"type": "answer"}', push_message(group_push(5)["payload"])["text"]]

    asyncio.run(scenario())


def test_services_watch_rules_on_the_fast_path() -> None:
    async def scenario() -> None:
        c, protocol, through_asgi = consumer(ServicesConsumer)
        c.revisions = {}
        for revision in (2, 1, 2, 3):
            c.deliver(push_message({"type": "service.health", "service_id": "s1", "revision": revision}))
        c.deliver(push_message({"type": "service.registered", "service_id": "s2", "revision": 1}))
        sent = [json.loads(text_of(f)) for f in protocol.transport.frames]
        assert [(m["service_id"], m["revision"]) for m in sent] == [("s1", 2), ("s1", 3), ("s2", 1)]
        assert through_asgi == []

    asyncio.run(scenario())


def test_a_socket_too_far_behind_is_dropped_and_holds_no_backlog(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(consumers, "PUSH_BACKLOG_LIMIT", 5)

    async def scenario() -> None:
        slow, sp, _ = consumer()
        fast, fp, _ = consumer()
        sp.writable.clear()  # the client stopped reading
        slow.gate.clear()  # type: ignore[attr-defined]  # its ASGI send waits too
        for generation in range(1, 20):
            for c in (slow, fast):
                c.deliver(group_push(generation))
        assert sp.transport.aborted and slow.closed
        assert slow.backlog is not None and len(slow.backlog) == 0
        assert len(fp.transport.frames) == 19  # the others are not held up
        slow.deliver(group_push(20))  # later pushes are dropped
        assert slow.backlog is not None and len(slow.backlog) == 0

    asyncio.run(scenario())


def test_without_a_direct_send_a_socket_too_far_behind_is_closed_with_1013(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(consumers, "PUSH_BACKLOG_LIMIT", 3)

    async def scenario() -> None:
        c, _, _ = consumer()
        c.socket = c.direct = None
        closes: list[dict[str, Any]] = []
        gate = asyncio.Event()

        async def asgi_send(message: dict[str, Any]) -> None:
            if message["type"] == "websocket.close":
                closes.append(message)
                return
            await gate.wait()

        c.base_send = asgi_send
        for generation in range(1, 10):
            c.deliver(group_push(generation))
        await settle()
        assert closes == [{"type": "websocket.close", "code": 1013}]
        assert c.closed

    asyncio.run(scenario())


def test_a_member_socket_too_far_behind_is_dropped_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(consumers, "PUSH_BACKLOG_LIMIT", 3)

    async def scenario() -> None:
        c, protocol, _ = consumer(MemberConsumer)
        assert c.direct is None and c.socket is not None  # every push takes the task path
        c.gate.clear()  # type: ignore[attr-defined]
        for generation in range(1, 10):
            c.deliver(push_message({"type": "member.assignment", "generation": generation, "member_epoch": 0}))
        assert protocol.transport.aborted and c.closed

    asyncio.run(scenario())
