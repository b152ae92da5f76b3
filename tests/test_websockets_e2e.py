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
