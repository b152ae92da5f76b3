"""Websocket streams through the project's whole ASGI application (origin check, token auth, consumers)
and the real Redis channel layer: auth, initial state, pushes after commit, acks, bad messages."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from channels.testing.websocket import WebsocketCommunicator
from django.db import connection

from registry_project.asgi import application
from tests.conftest import client_for, service_body

pytestmark = pytest.mark.django_db(transaction=True)


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    async_to_sync(scenario)()


def socket(
    path: str, key: str | None = None, headers: list[tuple[bytes, bytes]] | None = None
) -> WebsocketCommunicator:
    if key is not None:
        path += ("&" if "?" in path else "?") + f"token={key}"
    return WebsocketCommunicator(application, path, headers=headers or [])


async def connected(communicator: WebsocketCommunicator) -> dict[str, Any]:
    ok, _ = await communicator.connect(timeout=5)
    assert ok
    return await communicator.receive_json_from(timeout=5)


async def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run a blocking call (a REST request) off the event loop, closing the thread's connection after."""

    def in_thread() -> Any:
        try:
            return fn(*args, **kwargs)
        finally:
            connection.close()

    return await sync_to_async(in_thread, thread_sensitive=False)()


def join(key: str, member: str, group: str = "g1") -> Any:
    return client_for(key).post(
        f"/api/v1/groups/{group}/members/",
        {"member_id": member, "service_name": "c", "topics": ["orders"]},
        format="json",
    )


def test_no_token_or_a_bad_token_is_closed_with_4401(db):
    async def scenario() -> None:
        for key in (None, "cr_wrong"):
            communicator = socket("/ws/groups/g1/", key)
            ok, _ = await communicator.connect(timeout=5)
            assert ok
            assert await communicator.receive_output(timeout=5) == {"type": "websocket.close", "code": 4401}

    run(scenario)


def test_a_foreign_origin_is_refused_and_no_origin_is_let_in(owner):
    key = owner[1]
    join(key, "m1")

    async def scenario() -> None:
        foreign = socket("/ws/groups/g1/", key, headers=[(b"origin", b"https://evil.example")])
        ok, _ = await foreign.connect(timeout=5)
        assert not ok
        same_site = socket("/ws/groups/g1/", key, headers=[(b"origin", b"http://localhost:8000")])
        assert (await connected(same_site))["type"] == "group.assignment"
        await same_site.disconnect()
        service = socket("/ws/groups/g1/", None, headers=[(b"authorization", f"Bearer {key}".encode())])
        assert (await connected(service))["type"] == "group.assignment"
        await service.disconnect()

    run(scenario)


def test_group_stream_sends_current_state_then_each_new_generation_in_order(owner):
    key = owner[1]
    client_for(key).put("/api/v1/topics/orders/", {"partitions": 12}, format="json")
    join(key, "m1")

    async def scenario() -> None:
        communicator = socket("/ws/groups/g1/", key)
        first = await connected(communicator)
        assert first["generation"] == 1
        assert first["members"] == [
            {
                "member_id": "m1",
                "assigned_partitions": {"orders": list(range(12))},
                "revoking": {},
                "pending": {},
                "member_epoch": 1,
            }
        ]
        await call(join, key, "m2")
        second = await communicator.receive_json_from(timeout=5)
        assert second["generation"] == 2 and second["state"] == "reconciling"
        owned = [p for m in second["members"] for p in m["assigned_partitions"].get("orders", [])]
        assert sorted(owned) == list(range(12))  # m1 still owns all: none shown twice
        await call(client_for(key).delete, "/api/v1/groups/g1/members/m2/?member_epoch=2")
        third = await communicator.receive_json_from(timeout=5)
        assert third["generation"] == 3 and [m["member_id"] for m in third["members"]] == ["m1"]
        await communicator.disconnect()

    run(scenario)


def test_member_stream_and_acks_over_the_socket(owner):
    key = owner[1]
    client_for(key).put("/api/v1/topics/orders/", {"partitions": 12}, format="json")
    join(key, "m1")
    join(key, "m2")

    async def scenario() -> None:
        m1 = socket("/ws/groups/g1/members/m1/?member_epoch=1", key)
        state = await connected(m1)
        assert state["type"] == "member.assignment" and state["generation"] == 2
        assert len(state["revoking"]["orders"]) == 6
        m2 = socket("/ws/groups/g1/members/m2/?member_epoch=2", key)
        assert (await connected(m2))["pending"] == {"orders": list(range(6, 12))}

        await m1.send_json_to({"type": "ack", "generation": 2})  # counts as m1's heartbeat for generation 2
        reply = await m1.receive_json_from(timeout=5)
        assert reply["revoking"] == {} and reply["assigned_partitions"] == {"orders": list(range(6))}
        pushed = await m2.receive_json_from(timeout=5)  # m2 learns at once that the six are now its own
        assert pushed["assigned_partitions"] == {"orders": list(range(6, 12))} and pushed["pending"] == {}
        await m1.disconnect()
        await m2.disconnect()

    run(scenario)


def test_an_ack_gets_exactly_one_message_and_the_hand_over_still_reaches_every_other_socket(owner):
    key = owner[1]
    client_for(key).put("/api/v1/topics/orders/", {"partitions": 12}, format="json")
    join(key, "m1")
    join(key, "m2")

    async def scenario() -> None:
        m1 = socket("/ws/groups/g1/members/m1/?member_epoch=1", key)
        state = await connected(m1)
        assert (state["generation"], state["version"], len(state["revoking"]["orders"])) == (2, 2, 6)
        m1_again = socket("/ws/groups/g1/members/m1/?member_epoch=1", key)  # a second socket of m1
        await connected(m1_again)
        m2 = socket("/ws/groups/g1/members/m2/?member_epoch=2", key)
        await connected(m2)
        group = socket("/ws/groups/g1/", key)
        await connected(group)

        # given an ack that hands over m1's revoked partitions (the group's version moves on)
        await m1.send_json_to({"type": "ack", "generation": 2})
        # then m1's socket gets its answer, and not the broadcast of the same view after it
        answer = await m1.receive_json_from(timeout=5)
        assert (answer["type"], answer["generation"], answer["version"]) == ("member.assignment", 2, 3)
        assert answer["revoking"] == {} and answer["assigned_partitions"] == {"orders": list(range(6))}
        assert await m1.receive_nothing(timeout=0.5)
        # and every other socket learns of the hand-over
        assert (await m1_again.receive_json_from(timeout=5))["version"] == 3
        assert (await m2.receive_json_from(timeout=5))["assigned_partitions"] == {"orders": list(range(6, 12))}
        assert (await group.receive_json_from(timeout=5))["version"] == 3

        # an ack that changes nothing is answered once too, with the session's new deadline
        before = datetime.now(UTC)
        await m1.send_json_to({"type": "ack", "generation": 2})
        answer = await m1.receive_json_from(timeout=5)
        after = datetime.now(UTC)
        assert answer["version"] == 3
        deadline = datetime.fromisoformat(answer["session_expires_at"])  # ISO 8601 UTC, "Z"
        assert answer["session_expires_at"].endswith("Z")
        timeout = timedelta(seconds=30)  # the join's default session_timeout
        assert before + timeout - timedelta(milliseconds=1) <= deadline <= after + timeout
        assert await m1.receive_nothing(timeout=0.5)
        assert await m2.receive_nothing(timeout=0.1)
        for communicator in (m1, m1_again, m2, group):
            await communicator.disconnect()

    run(scenario)


def test_bad_messages_get_an_error_and_the_connection_survives(owner):
    key = owner[1]
    join(key, "m1")

    async def scenario() -> None:
        communicator = socket("/ws/groups/g1/members/m1/?member_epoch=1", key)
        await connected(communicator)
        await communicator.send_to(text_data="{not json")
        assert "malformed JSON" in (await communicator.receive_json_from(timeout=5))["detail"]
        await communicator.send_json_to({"type": "subscribe"})
        assert "unknown message type" in (await communicator.receive_json_from(timeout=5))["detail"]
        await communicator.send_json_to({"type": "ack", "generation": "one"})
        assert "integer generation" in (await communicator.receive_json_from(timeout=5))["detail"]
        await communicator.send_to(text_data=json.dumps([1, 2]))
        assert (await communicator.receive_json_from(timeout=5))["type"] == "error"
        await communicator.send_json_to({"type": "ack", "generation": 1})
        assert (await communicator.receive_json_from(timeout=5))["type"] == "member.assignment"  # still alive
        await communicator.disconnect()

    run(scenario)


def test_unknown_member_and_other_owners_acks(owner, make_token):
    key = owner[1]
    join(key, "m1")
    _, other = make_token("other")

    async def scenario() -> None:
        missing = socket("/ws/groups/g1/members/nobody/?member_epoch=1", key)
        assert (await connected(missing))["type"] == "error"
        assert await missing.receive_output(timeout=5) == {"type": "websocket.close", "code": 4404}
        intruder = socket("/ws/groups/g1/members/m1/?member_epoch=1", other)
        await connected(intruder)  # reading is allowed to every token
        await intruder.send_json_to({"type": "ack", "generation": 1})
        assert "another token" in (await intruder.receive_json_from(timeout=5))["detail"]
        assert await intruder.receive_output(timeout=5) == {"type": "websocket.close", "code": 4403}

    run(scenario)


def test_services_watch(owner):
    key = owner[1]
    api = client_for(key)
    api.post("/api/v1/services/", service_body("s1"), format="json")
    api.post("/api/v1/services/", service_body("other", service_name="other"), format="json")

    async def scenario() -> None:
        watch = socket("/ws/services/?name=kafka-source", key)
        first = await connected(watch)
        assert (first["type"], first["service_id"], first["health"]) == ("service.registered", "s1", "healthy")
        revision = first["revision"]
        await call(api.post, "/api/v1/services/", service_body("s2"), format="json")
        registered = await watch.receive_json_from(timeout=5)
        assert (registered["type"], registered["service_id"]) == ("service.registered", "s2")
        assert registered["revision"] > revision
        await call(api.post, "/api/v1/services/s2/heartbeat/", {"health": "degraded"}, format="json")
        health = await watch.receive_json_from(timeout=5)
        assert (health["type"], health["service_id"], health["health"]) == ("service.health", "s2", "degraded")
        await call(api.delete, "/api/v1/services/s1/")
        gone = await watch.receive_json_from(timeout=5)
        assert (gone["type"], gone["service_id"], gone["reason"]) == ("service.deregistered", "s1", "deregistered")
        assert gone["revision"] > health["revision"] > registered["revision"]
        await call(api.post, "/api/v1/services/", service_body("x", service_name="other"), format="json")
        assert await watch.receive_nothing(timeout=0.5)  # another name's events are not sent here
        await watch.disconnect()

    run(scenario)


def test_a_lapsed_lease_and_its_recovery_are_announced_by_the_cleanup_job(owner):
    import time_machine
    from django.utils import timezone

    from registry.tasks import cleanup_once

    key = owner[1]
    api = client_for(key)
    api.post("/api/v1/services/", service_body("s1", lease_duration=2, deregister_after=600), format="json")

    async def scenario() -> None:
        watch = socket("/ws/services/?name=kafka-source", key)
        assert (await connected(watch))["health"] == "healthy"
        later = timezone.now() + timedelta(seconds=3)
        with time_machine.travel(later, tick=False):
            await call(cleanup_once)
            lapsed = await watch.receive_json_from(timeout=5)
            assert (lapsed["type"], lapsed["service_id"], lapsed["health"]) == ("service.health", "s1", "unhealthy")
            await call(cleanup_once)
            assert await watch.receive_nothing(timeout=0.3)  # announced once
            await call(api.post, "/api/v1/services/s1/heartbeat/")
            await call(cleanup_once)
            back = await watch.receive_json_from(timeout=5)
            assert (back["type"], back["health"]) == ("service.health", "healthy")
        await watch.disconnect()

    run(scenario)


def test_messages_are_ordered_by_generation_then_version(owner):
    from channels.layers import get_channel_layer

    from groups.events import member_stream

    key = owner[1]
    client_for(key).put("/api/v1/topics/orders/", {"partitions": 12}, format="json")
    join(key, "m1")
    join(key, "m2")

    async def scenario() -> None:
        m2 = socket("/ws/groups/g1/members/m2/?member_epoch=2", key)
        state = await connected(m2)
        assert (state["generation"], state["version"]) == (2, 2)
        layer = get_channel_layer()

        async def push(generation: int, version: int) -> None:
            payload = {
                "type": "member.assignment",
                "group_id": "g1",
                "member_id": "m2",
                "generation": generation,
                "version": version,
                "assigned_partitions": {},
                "revoking": {},
                "pending": {},
            }
            await layer.group_send(member_stream("g1", "m2"), {"type": "push", "payload": payload})

        await push(2, 1)  # same generation, older version: a late hand-over view
        await push(1, 9)  # older generation
        assert await m2.receive_nothing(timeout=0.5)
        await push(2, 3)  # a hand-over within generation 2
        assert (await m2.receive_json_from(timeout=5))["version"] == 3
        await m2.disconnect()

    run(scenario)


def test_an_operator_drain_and_undrain_reach_service_watchers(owner):
    from registry import leases

    key = owner[1]
    api = client_for(key)
    api.post("/api/v1/services/", service_body("s1", weight=40), format="json")

    async def scenario() -> None:
        watch = socket("/ws/services/?name=kafka-source", key)
        first = await connected(watch)
        assert (first["weight"], first["drained"]) == (40, False)
        await call(leases.drain, ["s1"])
        drained = await watch.receive_json_from(timeout=5)
        assert (drained["type"], drained["weight"], drained["drained"]) == ("service.updated", 0, True)
        await call(leases.undrain, ["s1"])
        back = await watch.receive_json_from(timeout=5)
        assert (back["type"], back["weight"], back["drained"]) == ("service.updated", 40, False)
        assert back["revision"] > drained["revision"]
        await watch.disconnect()

    run(scenario)
