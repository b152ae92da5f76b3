"""Limits before work: a large request body is refused with 413 before it is read (through the ASGI
application and against a live server), the heartbeat fast path keeps its own cap, websocket messages are
capped, JSON depth is bounded, and the optional per-token throttle answers 429 with Retry-After."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from channels.testing.websocket import WebsocketCommunicator
from django.core.exceptions import ImproperlyConfigured

from registry.fastpath import MAX_BODY as HEARTBEAT_MAX_BODY
from registry.models import Service
from registry.redis_client import get_redis
from registry_project import limits
from registry_project.asgi import application
from registry_project.embedded_redis import free_port
from registry_project.localserver import start_server
from tests.conftest import asgi_request, client_for, database_url, service_body

FIFTY_MB = 50 * 1024 * 1024
CHUNK = 64 * 1024


class Client:
    """Drives the ASGI application by hand: a body of ``total`` bytes in ``CHUNK``-sized messages, and a
    count of how many of them the application asked for."""

    def __init__(self, total: int, declare: bool) -> None:
        self.total = total
        self.declare = declare
        self.chunks_read = 0
        self.sent: list[dict[str, Any]] = []

    def scope(self, path: str) -> dict[str, Any]:
        headers = [(b"host", b"127.0.0.1"), (b"content-type", b"application/json")]
        if self.declare:
            headers.append((b"content-length", str(self.total).encode()))
        return {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": headers,
            "client": ("127.0.0.1", 40000),
            "server": ("127.0.0.1", 80),
        }

    async def receive(self) -> dict[str, Any]:
        offset = self.chunks_read * CHUNK
        self.chunks_read += 1
        size = max(0, min(CHUNK, self.total - offset))
        return {"type": "http.request", "body": b" " * size, "more_body": offset + size < self.total}

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    def post(self, path: str) -> tuple[int, dict[str, Any]]:
        async_to_sync(application)(self.scope(path), self.receive, self.send)
        status = self.sent[0]["status"]
        return status, json.loads(b"".join(m.get("body", b"") for m in self.sent[1:]))


@pytest.mark.parametrize("path", ["/api/v1/services/", "/api/v1/groups/g1/members/", "/admin/login/"])
def test_a_declared_large_body_is_refused_before_a_byte_is_read(db, path):
    client = Client(FIFTY_MB, declare=True)
    status, body = client.post(path)
    assert status == 413
    assert body == {"detail": "Request body is larger than 1048576 bytes (REGISTRY_MAX_BODY_BYTES).", "limit": 1048576}
    assert client.chunks_read == 0
    assert (b"connection", b"close") in client.sent[0]["headers"]


def test_a_streamed_large_body_is_cut_off_at_the_limit(db):
    client = Client(FIFTY_MB, declare=False)
    status, body = client.post("/api/v1/services/")
    assert status == 413
    assert body["limit"] == 1048576
    # The chunk that passed 1 MiB is the last one read: 17 of the 800 on offer.
    assert client.chunks_read == 1048576 // CHUNK + 1


@pytest.mark.parametrize("declare", [True, False], ids=["declared", "streamed"])
def test_the_heartbeat_fast_path_keeps_its_own_smaller_cap(db, declare):
    client = Client(HEARTBEAT_MAX_BODY + 1, declare=declare)
    status, body = client.post("/api/v1/services/svc-1/heartbeat/")
    assert status == 413
    assert body["limit"] == HEARTBEAT_MAX_BODY
    assert client.chunks_read == (0 if declare else 2)


@pytest.mark.django_db(transaction=True)
def test_a_body_at_the_limit_is_served_and_one_byte_more_is_not(api, owner, settings):
    settings.REGISTRY_MAX_BODY_BYTES = 4096
    headers = {"authorization": f"Bearer {owner[1]}", "content-type": "application/json"}
    body = json.dumps(service_body()).encode()
    padded = body + b" " * (4096 - len(body))
    assert asgi_request("POST", "/api/v1/services/", content=padded, headers=headers).status_code == 201
    too_big = asgi_request("POST", "/api/v1/services/", content=padded + b" ", headers=headers)
    assert too_big.status_code == 413
    assert too_big.json()["detail"] == "Request body is larger than 4096 bytes (REGISTRY_MAX_BODY_BYTES)."


@pytest.fixture(scope="module")
def uvicorn_port(django_db_setup: Any, django_db_blocker: Any, redis_server: Any) -> Iterator[int]:
    with django_db_blocker.unblock():
        env = dict(os.environ, REDIS_URL=redis_server.url, DATABASE_URL=database_url(), LOG_LEVEL="WARNING")
    port = free_port()
    process = start_server(port, env)
    try:
        yield port
    finally:
        process.terminate()
        process.wait(timeout=20)


def read_response(sock: socket.socket) -> tuple[int, dict[str, Any]]:
    data = b""
    while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def _length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def test_a_uvicorn_port_answers_413_to_a_declared_50_mb_body_that_was_never_sent(uvicorn_port):
    with socket.create_connection(("127.0.0.1", uvicorn_port), timeout=10) as sock:
        sock.sendall(
            b"POST /api/v1/services/ HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % FIFTY_MB
        )
        status, body = read_response(sock)  # answered with no body byte sent
    assert status == 413
    assert body["limit"] == 1048576


def test_a_uvicorn_port_cuts_off_a_streaming_sender(uvicorn_port):
    sent = 0
    with socket.create_connection(("127.0.0.1", uvicorn_port), timeout=10) as sock:
        sock.sendall(
            b"POST /api/v1/services/ HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b"%x\r\n%s\r\n" % (CHUNK, b" " * CHUNK)
        try:
            while sent < FIFTY_MB:
                sock.sendall(chunk)
                sent += CHUNK
        except OSError:
            pass  # the server answered and closed the connection: the sender is cut off
        status, body = read_response(sock)
    assert status == 413
    assert body["limit"] == 1048576
    assert sent < FIFTY_MB // 2  # what the socket buffers took before the server closed


# --- websocket messages ----------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_websocket_message_over_the_cap_closes_with_1009_and_one_at_the_cap_is_read(owner, settings):
    settings.REGISTRY_MAX_WS_MESSAGE_BYTES = 2048
    key = owner[1]
    assert client_for(key).post("/api/v1/services/", service_body(), format="json").status_code == 201

    async def scenario() -> None:
        communicator = WebsocketCommunicator(application, f"/ws/services/?token={key}")
        ok, _ = await communicator.connect(timeout=5)
        assert ok
        assert (await communicator.receive_json_from(timeout=5))["type"] == "service.registered"
        at_cap = '{"type": "x"}' + " " * (2048 - 13)
        await communicator.send_to(text_data=at_cap)
        assert "unknown message type" in (await communicator.receive_json_from(timeout=5))["detail"]
        # bytes are counted, not characters: 1,100 characters of two bytes each
        over_cap = json.dumps({"type": "x", "pad": "é" * 1100}, ensure_ascii=False)
        assert len(over_cap) < 2048 < len(over_cap.encode())
        await communicator.send_to(text_data=over_cap)
        error = await communicator.receive_json_from(timeout=5)
        assert error == {
            "type": "error",
            "detail": "message is larger than 2048 bytes (REGISTRY_MAX_WS_MESSAGE_BYTES)",
            "limit": 2048,
        }
        assert await communicator.receive_output(timeout=5) == {"type": "websocket.close", "code": 1009}

    async_to_sync(scenario)()


# --- JSON depth ------------------------------------------------------------------------------------------


def test_json_as_deep_as_the_bound_is_read_and_one_level_more_is_not():
    depth = limits.MAX_JSON_DEPTH
    assert limits.loads("[" * depth + "]" * depth) is not None
    assert limits.loads('{"a":' * (depth - 1) + "[]" + "}" * (depth - 1)) is not None
    for text in ["[" * (depth + 1) + "]" * (depth + 1), '{"a":' * depth + "[]" + "}" * depth, "[" * 10**6]:
        with pytest.raises(limits.JSONTooDeep):
            limits.loads(text)
    with pytest.raises(ValueError, match="NaN"):
        limits.loads('{"a": NaN}')


# --- throttling ------------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_throttling_is_off_by_default(api):
    assert all(api.get("/api/v1/services/").status_code == 200 for _ in range(20))
    assert not get_redis().keys("*throttle*")


@pytest.mark.django_db
def test_a_token_past_its_rate_gets_429_with_retry_after_and_other_tokens_do_not(api, make_token, settings):
    settings.REGISTRY_THROTTLE_RATE = (3, 3600)
    assert [api.get("/api/v1/services/").status_code for _ in range(3)] == [200, 200, 200]
    refused = api.post("/api/v1/services/", service_body(), format="json")
    assert refused.status_code == 429
    assert 1 <= int(refused["Retry-After"]) <= 3600
    assert "Expected available in" in refused.json()["detail"]
    assert not Service.objects.exists()  # refused before the work
    other = client_for(make_token("other")[1])
    assert other.get("/api/v1/services/").status_code == 200


@pytest.mark.parametrize("raw", ["100", "0/second", "ten/minute", "5/fortnight", "9" * 5000 + "/s"])
def test_a_bad_throttle_rate_stops_startup_naming_the_setting(monkeypatch, raw):
    from registry_project.settings import _rate

    monkeypatch.setenv("REGISTRY_THROTTLE_RATE", raw)
    with pytest.raises(ImproperlyConfigured, match="REGISTRY_THROTTLE_RATE"):
        _rate("REGISTRY_THROTTLE_RATE")


def test_throttle_rates_are_read_in_every_spelling(monkeypatch):
    from registry_project.settings import _rate

    for raw, expected in [("100/second", (100, 1)), ("6000/min", (6000, 60)), ("5/h", (5, 3600)), ("", None)]:
        monkeypatch.setenv("REGISTRY_THROTTLE_RATE", raw)
        assert _rate("REGISTRY_THROTTLE_RATE") == expected
