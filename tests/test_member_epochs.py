"""Member incarnations (KIP-848 member epoch): every join takes a new epoch; heartbeats, acks, sockets and
leaves of another incarnation are refused and change nothing; a dynamic join of a live id is refused; a
static join fences the live incarnation, closes its sockets and hands its partitions to the new one only
after the old session's deadline, so no partition is ever owned by two incarnations."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import time_machine
from django.db import connection

from groups import events, membership
from groups.models import GroupMember, Partition, ServiceGroup
from groups.tasks import expire_once
from registry import lease_store
from registry.redis_client import get_redis
from tests.conftest import client_for
from tests.test_websockets import call, connected, run, socket

T0 = datetime(2026, 8, 1, 10, 0, 0, tzinfo=UTC)


def join(api, member_id, group="g1", **extra):
    body = {"member_id": member_id, "service_name": "c", "topics": ["orders"], **extra}
    return api.post(f"/api/v1/groups/{group}/members/", body, format="json")


def beat(api, member_id, generation, member_epoch, group="g1"):
    body = {"generation": generation, "member_epoch": member_epoch}
    return api.post(f"/api/v1/groups/{group}/members/{member_id}/heartbeat/", body, format="json")


def leave(api, member_id, member_epoch, group="g1"):
    return api.delete(f"/api/v1/groups/{group}/members/{member_id}/?member_epoch={member_epoch}")


def snapshot(group: str = "g1") -> dict[str, Any]:
    """Everything a refused request must leave alone: the group, its members and partitions, and Redis."""
    r = get_redis()
    k = lease_store.keys()
    return {
        "group": ServiceGroup.objects.filter(pk=group)
        .values_list("generation", "version", "member_epochs", "state")
        .first(),
        "members": list(
            GroupMember.objects.filter(group_id=group)
            .order_by("member_id")
            .values_list("member_id", "member_epoch", "acked_generation", "session_timeout", "joined_at")
        ),
        "partitions": list(
            Partition.objects.filter(group_id=group)
            .order_by("topic", "number")
            .values_list("topic", "number", "owner_id", "target_id", "target_generation", "held_until")
        ),
        "sessions": r.zrange(k.sessions, 0, -1, withscores=True),
        "timeouts": r.hgetall(k.timeouts),
        "epochs": r.hgetall(k.epochs),
    }


def owners(group: str = "g1") -> dict[tuple[str, int], str | None]:
    return {
        (t, n): m
        for t, n, m in Partition.objects.filter(group_id=group).values_list("topic", "number", "owner__member_id")
    }


def owned(body: dict) -> set[int]:
    return set(body["assigned_partitions"].get("orders", []))


@pytest.fixture
def orders(api):
    assert api.put("/api/v1/topics/orders/", {"partitions": 12}, format="json").status_code == 201


# --- REST ------------------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_every_join_takes_a_new_epoch_never_reused_after_a_leave(api, orders):
    first = join(api, "m1").json()
    assert join(api, "m2").json()["member_epoch"] == 2
    assert first["member_epoch"] == 1
    assert leave(api, "m1", 1).status_code == 204
    again = join(api, "m1")
    assert again.status_code == 201 and again.json()["member_epoch"] == 3  # the row was gone: no reuse
    assert get_redis().hget(lease_store.keys().epochs, "g1/m1") == b"3"
    member = api.get("/api/v1/groups/g1/").json()["members"][0]
    assert (member["member_id"], member["member_epoch"], member["static"]) == ("m1", 3, False)


def test_a_group_deleted_and_created_again_never_hands_out_an_old_epoch(api, orders):
    assert join(api, "m1").json()["member_epoch"] == 1
    assert join(api, "m2").json()["member_epoch"] == 2
    assert leave(api, "m1", 1).status_code == 204 and leave(api, "m2", 2).status_code == 204
    ServiceGroup.objects.get(pk="g1").delete()  # an operator deletes the empty group in the admin

    again = join(api, "m1")
    assert again.status_code == 201 and again.json()["member_epoch"] == 3
    # a zombie of the first m1 (epoch 1) is still refused by the new group
    assert beat(api, "m1", 0, 1).status_code == 409


@pytest.mark.django_db
def test_a_missing_epoch_is_a_400_naming_it_except_for_an_operators_removal(api, orders, make_token):
    join(api, "m1")
    before = snapshot()
    response = api.post("/api/v1/groups/g1/members/m1/heartbeat/", {"generation": 1}, format="json")
    assert response.status_code == 400 and list(response.json()) == ["member_epoch"]
    response = api.delete("/api/v1/groups/g1/members/m1/")
    assert response.status_code == 400 and list(response.json()) == ["member_epoch"]
    response = api.delete("/api/v1/groups/g1/members/m1/?member_epoch=x")
    assert response.status_code == 400 and list(response.json()) == ["member_epoch"]
    assert snapshot() == before
    _, staff = make_token("ops", staff=True)
    assert client_for(staff).delete("/api/v1/groups/g1/members/m1/").status_code == 204
    assert not GroupMember.objects.exists()


@pytest.mark.django_db
def test_a_dynamic_join_of_a_live_id_is_refused_and_changes_nothing(api, orders):
    with time_machine.travel(T0, tick=False) as clock:
        join(api, "m1", session_timeout=10)
        before = snapshot()
        clock.move_to(T0 + timedelta(seconds=10))  # the session's last valid moment
        refused = join(api, "m1", session_timeout=10)
        assert refused.status_code == 409
        body = refused.json()
        assert body["code"] == "member_id_in_use" and "static" in body["detail"]
        assert body["session_expires_at"] == "2026-08-01T10:00:10Z"
        assert snapshot() == before

        # once the session has lapsed (the expiry job has not run yet) the id may start a new incarnation,
        # and it owns the partitions at once: the old one cannot be consuming any more
        clock.move_to(T0 + timedelta(seconds=10, milliseconds=1))
        taken = join(api, "m1", session_timeout=10)
        assert taken.status_code == 200
        assert taken.json()["member_epoch"] == 2 and owned(taken.json()) == set(range(12))
        assert beat(api, "m1", 1, 1).status_code == 409


@pytest.mark.django_db
def test_a_stale_epoch_is_refused_on_heartbeat_and_leave_and_changes_nothing(api, orders):
    with time_machine.travel(T0, tick=False):
        join(api, "m1", static=True)
        fresh = join(api, "m1", static=True).json()
        assert fresh["member_epoch"] == 2
        before = snapshot()
        for response in (beat(api, "m1", 1, 1), leave(api, "m1", 1), beat(api, "m1", 1, 99)):
            assert response.status_code == 409
            body = response.json()
            assert body["code"] == "fenced_member_epoch" and body["member_epoch"] == 2
            assert "join again" in body["detail"]
        assert snapshot() == before
        assert beat(api, "m1", 1, 2).status_code == 200


@pytest.mark.django_db
def test_a_static_rejoin_hands_the_partitions_over_only_after_the_old_sessions_deadline(api, orders):
    with time_machine.travel(T0, tick=False) as clock:
        join(api, "m1", static=True, session_timeout=10)
        join(api, "m2", session_timeout=10)
        beat(api, "m1", 2, 1)
        beat(api, "m2", 2, 2)
        old_view = beat(api, "m1", 2, 1).json()
        mine, theirs = owned(old_view), owned(beat(api, "m2", 2, 2).json())
        assert len(mine) == 6 and mine.isdisjoint(theirs)

        clock.move_to(T0 + timedelta(seconds=4))
        assert beat(api, "m1", 2, 1).status_code == 200  # the old incarnation's last confirmation: until 14 s
        clock.move_to(T0 + timedelta(seconds=6))
        new = join(api, "m1", static=True, session_timeout=10)
        assert new.status_code == 200
        new_view = new.json()
        assert new_view["member_epoch"] == 3 and new_view["generation"] == 2  # same topics: no rebalance
        assert new_view["assigned_partitions"] == {} and set(new_view["pending"]["orders"]) == mine
        held = Partition.objects.filter(group_id="g1", held_until__isnull=False)
        assert set(held.values_list("number", flat=True)) == mine
        assert all(owners()[("orders", n)] is None for n in mine)  # held: owned by nobody
        assert api.get("/api/v1/groups/g1/").json()["state"] == "reconciling"

        # the old incarnation is refused on every path while it may still be consuming
        assert beat(api, "m1", 2, 1).status_code == 409
        assert leave(api, "m1", 1).status_code == 409

        for moment in (timedelta(seconds=10), timedelta(seconds=14)):  # up to the old deadline itself
            clock.move_to(T0 + moment)
            expire_once()
            view = beat(api, "m1", 2, 3).json()
            assert owned(view) == set() and set(view["pending"]["orders"]) == mine
            assert owned(beat(api, "m2", 2, 2).json()) == theirs

        clock.move_to(T0 + timedelta(seconds=14, milliseconds=1))
        view = beat(api, "m1", 2, 3).json()  # the new incarnation's heartbeat finds the hold over
        assert owned(view) == mine and view["pending"] == {}  # sticky: the same partitions as before
        assert not Partition.objects.filter(held_until__isnull=False).exists()
        final = api.get("/api/v1/groups/g1/").json()
        assert final["state"] == "stable"
        assert sorted(n for m in final["members"] for n in m["assigned_partitions"]["orders"]) == list(range(12))


@pytest.mark.django_db
def test_the_expiry_job_releases_a_hold_and_a_leave_during_it_keeps_the_partitions_held(api, orders):
    with time_machine.travel(T0, tick=False) as clock:
        join(api, "m1", static=True, session_timeout=10)
        join(api, "m2", session_timeout=30)
        beat(api, "m1", 2, 1)
        mine = owned(beat(api, "m1", 2, 1).json())
        clock.move_to(T0 + timedelta(seconds=2))
        join(api, "m1", static=True, session_timeout=10)  # the old one may consume until 10 s
        clock.move_to(T0 + timedelta(seconds=3))
        assert leave(api, "m1", 3).status_code == 204  # the new incarnation leaves during the hold
        m2 = beat(api, "m2", 3, 2).json()
        assert owned(m2).isdisjoint(mine) and set(m2["pending"]["orders"]) >= mine  # still held
        clock.move_to(T0 + timedelta(seconds=10, milliseconds=1))
        expire_once()
        assert owned(beat(api, "m2", 3, 2).json()) == set(range(12))


@pytest.mark.django_db
def test_a_static_rejoin_after_the_old_session_lapsed_takes_the_partitions_at_once(api, orders):
    with time_machine.travel(T0, tick=False) as clock:
        join(api, "m1", static=True, session_timeout=10)
        clock.move_to(T0 + timedelta(seconds=11))
        view = join(api, "m1", static=True, session_timeout=10).json()
        assert owned(view) == set(range(12)) and view["member_epoch"] == 2
        assert not Partition.objects.filter(held_until__isnull=False).exists()


@pytest.mark.django_db
def test_the_service_heartbeat_renews_the_current_incarnations_session(api, owner, orders):
    from tests.conftest import service_body

    with time_machine.travel(T0, tick=False) as clock:
        api.post("/api/v1/services/", service_body("m1", lease_duration=60), format="json")
        join(api, "m1", static=True, session_timeout=10)
        join(api, "m1", static=True, session_timeout=10)
        clock.move_to(T0 + timedelta(seconds=9))
        client_for(owner[1]).post("/api/v1/services/m1/heartbeat/")
        clock.move_to(T0 + timedelta(seconds=15))
        assert expire_once() == []
        assert beat(api, "m1", 0, 2).status_code == 200 and beat(api, "m1", 0, 1).status_code == 409


# --- websockets ------------------------------------------------------------------------------------------


def rest_join(key: str, member: str, **extra: Any) -> dict[str, Any]:
    return join(client_for(key), member, **extra).json()


async def closed_with(communicator: Any) -> tuple[dict[str, Any], int]:
    message = await communicator.receive_json_from(timeout=5)
    closing = await communicator.receive_output(timeout=5)
    assert closing["type"] == "websocket.close"
    return message, closing["code"]


@pytest.mark.django_db(transaction=True)
def test_a_socket_with_a_stale_or_missing_epoch_is_refused(owner):
    key = owner[1]
    rest_join(key, "m1", static=True)
    rest_join(key, "m1", static=True)
    before = snapshot()

    async def scenario() -> None:
        stale = socket("/ws/groups/g1/members/m1/?member_epoch=1", key)
        assert (await stale.connect(timeout=5))[0]
        message, code = await closed_with(stale)
        assert (message["type"], message["code"], message["member_epoch"], code) == (
            "error",
            "fenced_member_epoch",
            2,
            4409,
        )
        missing = socket("/ws/groups/g1/members/m1/", key)
        assert (await missing.connect(timeout=5))[0]
        message, code = await closed_with(missing)
        assert (message["field"], code) == ("member_epoch", 4400)
        by_header = socket("/ws/groups/g1/members/m1/", key, headers=[(b"member-epoch", b"2")])
        assert (await connected(by_header))["member_epoch"] == 2
        await by_header.disconnect()

    run(scenario)
    assert snapshot() == before


@pytest.mark.django_db(transaction=True)
def test_a_static_rejoin_closes_the_old_incarnations_socket_and_not_the_new_ones(owner):
    key = owner[1]
    client_for(key).put("/api/v1/topics/orders/", {"partitions": 12}, format="json")
    rest_join(key, "m1", static=True)

    async def scenario() -> None:
        old = socket("/ws/groups/g1/members/m1/?member_epoch=1", key)
        assert (await connected(old))["member_epoch"] == 1
        fresh = await call(rest_join, key, "m1", static=True)
        message, code = await closed_with(old)
        assert (message["type"], message["reason"], message["member_epoch"], code) == (
            "member.removed",
            "fenced",
            1,
            4409,
        )
        new = socket(f"/ws/groups/g1/members/m1/?member_epoch={fresh['member_epoch']}", key)
        state = await connected(new)
        assert state["member_epoch"] == 2 and state["assigned_partitions"] == {}  # held for the old one
        assert await new.receive_nothing(timeout=0.3)  # the old incarnation's removal did not close it
        await new.disconnect()

    run(scenario)


@pytest.mark.django_db(transaction=True)
def test_member_removed_closes_the_sockets_on_leave_operator_removal_and_expiry(owner):
    key = owner[1]
    client_for(key).put("/api/v1/topics/orders/", {"partitions": 12}, format="json")

    async def removed_by(remove: Any, member: str) -> tuple[dict[str, Any], int]:
        epoch = (await call(rest_join, key, member, session_timeout=5))["member_epoch"]
        communicator = socket(f"/ws/groups/g1/members/{member}/?member_epoch={epoch}", key)
        await connected(communicator)
        await call(remove, epoch)
        return await closed_with(communicator)

    def by_leave(epoch: int) -> None:
        assert leave(client_for(key), "m1", epoch).status_code == 204

    def by_operator(epoch: int) -> None:
        from django.utils import timezone

        membership.leave("g1", "m2", None, timezone.now())  # the admin's "remove member"

    def by_expiry(epoch: int) -> None:
        from django.utils import timezone

        with time_machine.travel(timezone.now() + timedelta(seconds=6)):
            assert expire_once() == [("g1", "m3")]

    async def scenario() -> None:
        for remove, member, reason in (
            (by_leave, "m1", "leave"),
            (by_operator, "m2", "leave"),
            (by_expiry, "m3", "expiry"),
        ):
            message, code = await removed_by(remove, member)
            assert (message["type"], message["member_id"], message["reason"], code) == (
                "member.removed",
                member,
                reason,
                4410,
            )

    run(scenario)


@pytest.mark.django_db(transaction=True)
def test_an_ack_from_a_socket_whose_fencing_message_was_lost_is_refused(owner, monkeypatch):
    key = owner[1]
    client_for(key).put("/api/v1/topics/orders/", {"partitions": 12}, format="json")
    rest_join(key, "m1", static=True)
    rest_join(key, "m2")
    delivered = events.send_now

    async def scenario() -> None:
        old = socket("/ws/groups/g1/members/m1/?member_epoch=1", key)
        state = await connected(old)
        assert state["revoking"] == {"orders": list(range(6, 12))}
        # the channel layer loses every push of the static rejoin (a push failure is only logged)
        monkeypatch.setattr(events, "send_now", lambda group, payload: None)
        await call(rest_join, key, "m1", static=True)
        monkeypatch.setattr(events, "send_now", delivered)
        before = await call(snapshot)
        await old.send_json_to({"type": "ack", "generation": 2})
        message, code = await closed_with(old)
        assert (message["type"], message["code"], message["member_epoch"], code) == (
            "error",
            "fenced_member_epoch",
            3,
            4409,
        )
        assert await call(snapshot) == before  # the revocation was not confirmed for the new incarnation

    run(scenario)


@pytest.mark.django_db(transaction=True)
def test_a_push_from_a_later_incarnation_closes_a_stale_socket(owner):
    from channels.layers import get_channel_layer

    key = owner[1]
    rest_join(key, "m1", static=True)

    async def scenario() -> None:
        old = socket("/ws/groups/g1/members/m1/?member_epoch=1", key)
        await connected(old)
        payload = {"type": "member.assignment", "group_id": "g1", "member_id": "m1", "generation": 1, "version": 9}
        await get_channel_layer().group_send(
            events.member_stream("g1", "m1"), {"type": "push", "payload": {**payload, "member_epoch": 2}}
        )
        message, code = await closed_with(old)
        assert (message["code"], code) == ("fenced_member_epoch", 4409)

    run(scenario)


# --- concurrency (PostgreSQL in CI) ----------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_concurrent_joins_of_one_id_end_with_exactly_one_live_incarnation(owner):
    key = owner[1]
    client_for(key).put("/api/v1/topics/orders/", {"partitions": 12}, format="json")
    rest_join(key, "s1", static=True)
    rounds, threads = 5, 4
    answers: list[tuple[str, int, dict[str, Any]]] = []
    lock = threading.Lock()

    def racer(member: str, static: bool, barrier: threading.Barrier) -> None:
        try:
            barrier.wait(timeout=30)
            response = join(client_for(key), member, static=static)
            with lock:
                answers.append((member, response.status_code, response.json()))
        finally:
            connection.close()

    for n in range(rounds):
        for member, static in ((f"d{n}", False), ("s1", True)):
            barrier = threading.Barrier(threads)
            workers = [threading.Thread(target=racer, args=(member, static, barrier)) for _ in range(threads)]
            for w in workers:
                w.start()
            for w in workers:
                w.join()

    for member in [f"d{n}" for n in range(rounds)]:
        statuses = sorted(status for m, status, _ in answers if m == member)
        assert statuses == [201] + [409] * (threads - 1), member  # one dynamic join wins, the rest are refused
        codes = {body.get("code") for m, status, body in answers if m == member and status == 409}
        assert codes == {"member_id_in_use"}
    static = [body["member_epoch"] for m, status, body in answers if m == "s1"]
    assert len(static) == rounds * threads and all(s == 200 for m, s, _ in answers if m == "s1")
    assert len(set(static)) == len(static)  # every join its own epoch
    live = GroupMember.objects.get(group_id="g1", member_id="s1")
    assert live.member_epoch == max(static)  # the last join is the one live incarnation
    assert get_redis().hget(lease_store.keys().epochs, "g1/s1") == str(max(static)).encode()
    api = client_for(key)
    for epoch in static:
        assert beat(api, "s1", 0, epoch).status_code == (200 if epoch == max(static) else 409)
    numbers = list(Partition.objects.filter(group_id="g1").exclude(owner=None).values_list("number", flat=True))
    assert len(numbers) == len(set(numbers))  # no partition twice
