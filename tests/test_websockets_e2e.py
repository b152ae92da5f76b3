"""End to end with real processes: uvicorn servers started here on free ports against the suite's Redis
and database, a real websocket client, changes made through the REST API."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import websockets

from registry.models import ApiToken

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def key(db: object) -> str:
    key = ApiToken.generate_key()
    token = ApiToken(name="e2e", is_staff=False)
    token.set_key(key)
    token.save()
    return key


def test_join_and_leave_reach_subscribers_of_both_servers_in_order(servers, key):
    a, b = servers
    headers = {"Authorization": f"Bearer {key}"}
    rest = httpx.Client(base_url=a, headers=headers, timeout=10)
    rest.put("/api/v1/topics/orders/", json={"partitions": 12}).raise_for_status()
    rest.post("/api/v1/groups/g1/members/", json={"member_id": "m1", "service_name": "c", "topics": ["orders"]})

    async def scenario() -> list[tuple[str, int, list[str]]]:
        seen = []
        ws_a = await websockets.connect(f"{a.replace('http', 'ws')}/ws/groups/g1/?token={key}")
        ws_b = await websockets.connect(f"{b.replace('http', 'ws')}/ws/groups/g1/", additional_headers=headers)
        for ws in (ws_a, ws_b):
            first = json.loads(await asyncio.wait_for(ws.recv(), 10))
            assert first["generation"] == 1

        async def change() -> None:
            await asyncio.to_thread(
                rest.post,
                "/api/v1/groups/g1/members/",
                json={"member_id": "m2", "service_name": "c", "topics": ["orders"]},
            )
            await asyncio.to_thread(rest.delete, "/api/v1/groups/g1/members/m1/?member_epoch=1")

        await change()
        for name, ws in (("a", ws_a), ("b", ws_b)):
            for _ in range(2):
                message = json.loads(await asyncio.wait_for(ws.recv(), 10))
                seen.append((name, message["generation"], [m["member_id"] for m in message["members"]]))
            await ws.close()
        return seen

    seen = asyncio.run(scenario())
    assert seen == [
        ("a", 2, ["m1", "m2"]),
        ("a", 3, ["m2"]),
        ("b", 2, ["m1", "m2"]),
        ("b", 3, ["m2"]),  # made through server a, pushed by server b
    ]


def test_refused_handshakes_over_a_real_connection(servers, key):
    a, _ = servers

    async def scenario() -> tuple[int | None, int | None]:
        ws = await websockets.connect(f"{a.replace('http', 'ws')}/ws/groups/g1/")
        try:
            await asyncio.wait_for(ws.recv(), 10)
        except websockets.ConnectionClosed as closed:
            no_token = closed.rcvd.code if closed.rcvd else None
        try:
            await websockets.connect(
                f"{a.replace('http', 'ws')}/ws/groups/g1/?token={key}", origin="https://evil.example"
            )
            foreign = None
        except websockets.InvalidStatus as refused:
            foreign = refused.response.status_code
        return no_token, foreign

    assert asyncio.run(scenario()) == (4401, 403)


def test_member_streams_on_one_server_get_changes_made_through_the_other_in_order(servers, key):
    """Each server process fans a push out to its own sockets: a member's socket on server a sees every
    change made through server b, and never an older view after a newer one."""
    a, b = servers
    headers = {"Authorization": f"Bearer {key}"}
    rest_b = httpx.Client(base_url=b, headers=headers, timeout=10)
    rest_b.put("/api/v1/topics/orders/", json={"partitions": 12}).raise_for_status()
    m1 = rest_b.post("/api/v1/groups/g1/members/", json={"member_id": "m1", "service_name": "c", "topics": ["orders"]})
    epoch = m1.json()["member_epoch"]

    async def scenario() -> list[tuple[int, int]]:
        url = f"{a.replace('http', 'ws')}/ws/groups/g1/members/m1/?member_epoch={epoch}"
        sockets = [await websockets.connect(url, additional_headers=headers) for _ in range(3)]
        for ws in sockets:
            assert json.loads(await asyncio.wait_for(ws.recv(), 10))["generation"] == 1
        # given three members joining, then leaving, through server b: six changes, one after the other
        for n in range(2, 5):
            await asyncio.to_thread(
                rest_b.post,
                "/api/v1/groups/g1/members/",
                json={"member_id": f"m{n}", "service_name": "c", "topics": ["orders"]},
            )
        for n in range(2, 5):
            await asyncio.to_thread(rest_b.delete, f"/api/v1/groups/g1/members/m{n}/?member_epoch={n}")
        # then every socket on server a has every generation, in order, up to the last
        seen = []
        for ws in sockets:
            orders = []
            while not orders or orders[-1][0] < 7:
                message = json.loads(await asyncio.wait_for(ws.recv(), 10))
                assert message["type"] == "member.assignment" and message["member_id"] == "m1"
                orders.append((message["generation"], message["version"]))
            seen.append(orders)
            await ws.close()
        return seen

    seen = asyncio.run(scenario())
    for orders in seen:
        assert orders == sorted(set(orders))  # strictly increasing: nothing repeated, nothing older after newer
        assert [g for g, _ in orders] == list(range(2, 8))  # each change made through b, once
    assert seen[0] == seen[1] == seen[2]


def test_a_services_watch_with_the_client_librarys_handshake_gets_changes_made_through_the_other_server(servers, key):
    """The client library's handshake (token and ``conveyor.v1`` as subprotocols) on server a, changes made
    through server b: every event once, in order, with rising revisions, through the push fast path."""
    a, b = servers
    rest_b = httpx.Client(base_url=b, headers={"Authorization": f"Bearer {key}"}, timeout=10)
    body = {"service_name": "kafka-source", "service_type": "source", "endpoint": "10.0.0.1:50051"}
    rest_b.post("/api/v1/services/", json={**body, "service_id": "s1"}).raise_for_status()

    async def scenario() -> list[tuple[str, str, int]]:
        ws = await websockets.connect(
            f"{a.replace('http', 'ws')}/ws/services/?name=kafka-source", subprotocols=["conveyor.v1", f"token.{key}"]
        )
        assert ws.subprotocol == "conveyor.v1"
        first = json.loads(await asyncio.wait_for(ws.recv(), 10))
        seen = [(first["type"], first["service_id"], first["revision"])]
        steps = [
            ("post", "/api/v1/services/", {**body, "service_id": "s2"}),
            ("post", "/api/v1/services/s2/heartbeat/", {"health": "degraded"}),
            ("post", "/api/v1/services/", {**body, "service_id": "x", "service_name": "other"}),
            ("delete", "/api/v1/services/s1/", None),
        ]
        for method, path, payload in steps:
            kwargs = {"json": payload} if payload is not None else {}
            (await asyncio.to_thread(getattr(rest_b, method), path, **kwargs)).raise_for_status()
        while len(seen) < 4:
            message = json.loads(await asyncio.wait_for(ws.recv(), 10))
            seen.append((message["type"], message["service_id"], message["revision"]))
        await ws.close()
        return seen

    seen = asyncio.run(scenario())
    assert [(kind, service) for kind, service, _ in seen] == [
        ("service.registered", "s1"),
        ("service.registered", "s2"),
        ("service.health", "s2"),
        ("service.deregistered", "s1"),
    ]
    revisions = [revision for _, _, revision in seen]
    assert revisions[1:] == sorted(revisions[1:]) and len(set(revisions)) == 4
