"""The group protocol over the REST API: generations, revoke-before-assign, leave, expiry, stale generations."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import time_machine

from groups.models import GroupMember, RebalanceEvent, ServiceGroup, Topic
from groups.tasks import expire_once
from tests.conftest import client_for, service_body

pytestmark = pytest.mark.django_db

T0 = datetime(2026, 8, 1, 10, 0, 0, tzinfo=UTC)


def join(api, member_id, topics=("orders",), group="g1", **extra):
    body = {"member_id": member_id, "service_name": "orders-consumer", "topics": list(topics), **extra}
    return api.post(f"/api/v1/groups/{group}/members/", body, format="json")


def current_epoch(member_id, group="g1"):
    """The member's current incarnation (tests of incarnations are in tests/test_member_epochs.py)."""
    epoch = GroupMember.objects.filter(group_id=group, member_id=member_id).values_list("member_epoch", flat=True)
    return epoch.first() or 1


def beat(api, member_id, generation, group="g1"):
    body = {"generation": generation, "member_epoch": current_epoch(member_id, group)}
    return api.post(f"/api/v1/groups/{group}/members/{member_id}/heartbeat/", body, format="json")


def leave(api, member_id, group="g1"):
    return api.delete(f"/api/v1/groups/{group}/members/{member_id}/?member_epoch={current_epoch(member_id, group)}")


def owned_everywhere(api, group="g1"):
    """Every (topic, partition) the group view shows as owned, with its owners."""
    body = api.get(f"/api/v1/groups/{group}/").json()
    seen: dict[tuple[str, int], list[str]] = {}
    for member in body["members"]:
        for topic, numbers in member["assigned_partitions"].items():
            for n in numbers:
                seen.setdefault((topic, n), []).append(member["member_id"])
    return body, seen


def assert_no_partition_twice(api, group="g1"):
    _, seen = owned_everywhere(api, group)
    doubled = {p: owners for p, owners in seen.items() if len(owners) > 1}
    assert doubled == {}
    return seen


@pytest.fixture
def orders(api):
    assert api.put("/api/v1/topics/orders/", {"partitions": 12}, format="json").status_code == 201


def test_three_members_join_one_after_another(api, orders):
    first = join(api, "m1")
    assert first.status_code == 201
    assert first.json() == {
        "group_id": "g1",
        "member_id": "m1",
        "generation": 1,
        "assigned_partitions": {"orders": list(range(12))},
        "revoking": {},
        "pending": {},
        "version": 1,
        "member_epoch": 1,
    }

    second = join(api, "m2").json()
    assert second["generation"] == 2
    assert second["assigned_partitions"] == {}  # withheld until m1 gives them up
    assert second["pending"] == {"orders": list(range(6, 12))}
    seen = assert_no_partition_twice(api)
    assert len(seen) == 12  # m1 still owns all twelve

    m1 = beat(api, "m1", 1).json()  # a stale generation: told what to give up, nothing handed over
    assert m1["generation"] == 2 and len(m1["revoking"]["orders"]) == 6
    assert len(assert_no_partition_twice(api)) == 12

    m1 = beat(api, "m1", 2).json()  # m1 confirms generation 2: the six go to m2
    assert m1["revoking"] == {} and len(m1["assigned_partitions"]["orders"]) == 6
    m2 = beat(api, "m2", 2).json()
    assert len(m2["assigned_partitions"]["orders"]) == 6

    third = join(api, "m3").json()
    assert third["generation"] == 3
    assert_no_partition_twice(api)
    for member in ("m1", "m2"):
        beat(api, member, 3)
        assert_no_partition_twice(api)

    body, seen = owned_everywhere(api)
    assert body["generation"] == 3 and body["state"] == "stable"
    assert sorted(seen) == [("orders", n) for n in range(12)]
    assert {m["member_id"]: len(m["assigned_partitions"]["orders"]) for m in body["members"]} == {
        "m1": 4,
        "m2": 4,
        "m3": 4,
    }
    history = list(RebalanceEvent.objects.order_by("generation").values_list("generation", "reason"))
    assert history == [(1, "join"), (2, "join"), (3, "join")]


def settle(api, members, group="g1"):
    generation = ServiceGroup.objects.get(pk=group).generation
    for m in members:
        beat(api, m, generation, group)


def test_a_leaving_members_partitions_go_to_the_others_and_nothing_else_moves(api, orders):
    for m in ("m1", "m2", "m3"):
        join(api, m)
        settle(api, ["m1", "m2", "m3"][: int(m[1])])
    _, before = owned_everywhere(api)

    assert leave(api, "m2").status_code == 204
    body, after = owned_everywhere(api)
    assert body["generation"] == 4
    assert sorted(after) == [("orders", n) for n in range(12)]  # nobody to revoke from: handed over at once
    for partition, owners in before.items():
        if owners != ["m2"]:
            assert after[partition] == owners  # nothing else moved
    assert {m["member_id"]: len(m["assigned_partitions"]["orders"]) for m in body["members"]} == {"m1": 6, "m3": 6}
    event = RebalanceEvent.objects.get(generation=4)
    assert (event.reason, event.members_before, event.members_after, event.partitions_moved) == (
        "leave",
        ["m1", "m2", "m3"],
        ["m1", "m3"],
        4,
    )
    assert beat(api, "m2", 4).status_code == 404


def test_a_silent_member_is_removed_after_its_session_and_the_group_rebalances(api, orders):
    with time_machine.travel(T0, tick=False) as clock:
        join(api, "m1", session_timeout=10)
        join(api, "m2", session_timeout=10)
        settle(api, ["m1", "m2"])
        clock.move_to(T0 + timedelta(seconds=8))
        beat(api, "m1", 2)  # m1 keeps its session; m2 says nothing

        clock.move_to(T0 + timedelta(seconds=10))
        assert expire_once() == []  # m2's session ends at 10 s exactly: not yet past
        clock.move_to(T0 + timedelta(seconds=10, milliseconds=1))
        assert expire_once() == [("g1", "m2")]

        body, seen = owned_everywhere(api)
        assert body["generation"] == 3
        assert {m["member_id"] for m in body["members"]} == {"m1"}
        assert sorted(seen) == [("orders", n) for n in range(12)] and all(o == ["m1"] for o in seen.values())
        assert RebalanceEvent.objects.get(generation=3).reason == "expiry"
        assert beat(api, "m2", 3).status_code == 404


def test_a_stale_generation_gets_the_current_assignment(api, orders):
    join(api, "m1")
    join(api, "m2")
    response = beat(api, "m2", 0)
    assert response.status_code == 200
    assert response.json()["generation"] == 2
    assert response.json()["assigned_partitions"] == {}
    # a generation from the future is not applied either
    response = beat(api, "m1", 99)
    assert response.json()["generation"] == 2 and len(response.json()["revoking"]["orders"]) == 6


def test_unknown_topics_are_created_with_the_default_partition_count(api):
    body = join(api, "m1", topics=["fresh"]).json()
    assert Topic.objects.get(name="fresh").partitions == 12
    assert body["assigned_partitions"] == {"fresh": list(range(12))}


def test_growing_a_topic_rebalances_its_groups_and_shrinking_is_400(api, orders):
    join(api, "m1")
    response = api.put("/api/v1/topics/orders/", {"partitions": 16}, format="json")
    assert response.status_code == 200 and response.json()["partitions"] == 16
    body, seen = owned_everywhere(api)
    assert body["generation"] == 2 and len(seen) == 16
    assert RebalanceEvent.objects.get(generation=2).reason == "topic_change"
    shrink = api.put("/api/v1/topics/orders/", {"partitions": 4}, format="json")
    assert shrink.status_code == 400 and "never shrink" in shrink.json()["partitions"][0]
    assert api.get("/api/v1/topics/orders/").json()["partitions"] == 16


def test_a_static_rejoin_with_the_same_topics_keeps_the_generation(api, orders):
    join(api, "m1", static=True)
    again = join(api, "m1", static=True)
    assert again.status_code == 200
    assert (again.json()["generation"], again.json()["member_epoch"]) == (1, 2)


def test_a_service_heartbeat_renews_the_membership_of_the_same_id(api, owner, orders):
    with time_machine.travel(T0, tick=False) as clock:
        api.post("/api/v1/services/", service_body("m1", lease_duration=60), format="json")
        join(api, "m1", session_timeout=10)
        clock.move_to(T0 + timedelta(seconds=9))
        client_for(owner[1]).post("/api/v1/services/m1/heartbeat/")
        clock.move_to(T0 + timedelta(seconds=15))
        assert expire_once() == []
        clock.move_to(T0 + timedelta(seconds=19, milliseconds=1))
        assert expire_once() == [("g1", "m1")]


def test_a_member_heartbeat_answers_with_the_session_deadline_it_set(api, orders):
    from registry import lease_store
    from registry.redis_client import get_redis

    with time_machine.travel(T0, tick=False) as clock:
        join(api, "m1", session_timeout=10)
        clock.move_to(T0 + timedelta(seconds=4))
        answer = beat(api, "m1", 1)
        assert answer.status_code == 200
        assert answer.json()["session_expires_at"] == "2026-08-01T10:00:14Z"
        # the deadline it names is the one the expiry job goes by
        clock.move_to(T0 + timedelta(seconds=14))
        assert expire_once() == []
        # a session Redis lost is restored by the heartbeat, from that heartbeat's time
        lease_store.remove_session(get_redis(), "g1", "m1")
        assert beat(api, "m1", 1).json()["session_expires_at"] == "2026-08-01T10:00:24Z"
        clock.move_to(T0 + timedelta(seconds=24, milliseconds=1))
        assert expire_once() == [("g1", "m1")]
    # only answers to heartbeats carry it: the member's assignment (GET) does not
    assert "session_expires_at" not in join(api, "m2").json()


def test_deregistering_a_service_removes_it_from_its_groups(api, orders, django_capture_on_commit_callbacks):
    api.post("/api/v1/services/", service_body("m1"), format="json")
    join(api, "m1")
    join(api, "m2")
    with django_capture_on_commit_callbacks(execute=True):
        assert api.delete("/api/v1/services/m1/").status_code == 204
    body = api.get("/api/v1/groups/g1/").json()
    assert [m["member_id"] for m in body["members"]] == ["m2"]
    assert body["generation"] == 3


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"service_name": "s", "topics": ["t"]}, "member_id"),
        ({"member_id": "bad id", "service_name": "s", "topics": ["t"]}, "member_id"),
        ({"member_id": "m", "service_name": "s", "topics": []}, "topics"),
        ({"member_id": "m", "service_name": "s", "topics": ["a/b"]}, "topics"),
        ({"member_id": "m", "service_name": "s", "topics": ["t"], "session_timeout": 0}, "session_timeout"),
        ({"member_id": "m", "service_name": "s", "topics": ["t"], "session_timeout": 3601}, "session_timeout"),
    ],
)
def test_join_rejects_bad_input_naming_the_field(api, body, field):
    response = api.post("/api/v1/groups/g1/members/", body, format="json")
    assert response.status_code == 400
    assert list(response.json()) == [field]
    assert not ServiceGroup.objects.exists()


def test_other_validation_and_ownership_rules(api, make_token, orders):
    assert api.post("/api/v1/groups/bad%20group/members/", {}, format="json").status_code in (400, 404)
    join(api, "m1")
    assert beat(api, "m1", -1).status_code == 400
    assert api.post("/api/v1/groups/g1/members/m1/heartbeat/", {}, format="json").json() == {
        "generation": ["This field is required."],
        "member_epoch": ["This field is required."],
    }
    assert api.put("/api/v1/topics/t2/", {"partitions": 0}, format="json").status_code == 400
    assert api.put("/api/v1/topics/t2/", {"partitions": 10001}, format="json").status_code == 400
    _, other_key = make_token("other")
    other = client_for(other_key)
    assert other.delete("/api/v1/groups/g1/members/m1/?member_epoch=1").status_code == 403
    assert beat(other, "m1", 1).status_code == 403
    assert join(other, "m1").status_code == 403
    assert other.get("/api/v1/groups/g1/members/m1/").status_code == 200
    _, staff_key = make_token("ops", staff=True)
    assert client_for(staff_key).delete("/api/v1/groups/g1/members/m1/").status_code == 204
    assert client_for(None).get("/api/v1/groups/").status_code == 401


def test_an_expired_service_leaves_its_groups(api, orders, django_capture_on_commit_callbacks):
    from registry.tasks import cleanup_once

    with time_machine.travel(T0, tick=False) as clock:
        api.post("/api/v1/services/", service_body("m1", lease_duration=5, deregister_after=0), format="json")
        join(api, "m1", session_timeout=3600)
        join(api, "m2", session_timeout=3600)
        clock.move_to(T0 + timedelta(seconds=6))
        with django_capture_on_commit_callbacks(execute=True):
            assert cleanup_once() == ["m1"]
    body = api.get("/api/v1/groups/g1/").json()
    assert [m["member_id"] for m in body["members"]] == ["m2"]
    assert RebalanceEvent.objects.get(generation=3).reason == "expiry"


def test_group_and_member_reads(api, orders):
    join(api, "m1")
    listed = api.get("/api/v1/groups/").json()
    assert listed["count"] == 1
    group = listed["results"][0]
    assert (group["group_id"], group["generation"], group["state"], group["topics"]) == ("g1", 1, "stable", ["orders"])
    member = group["members"][0]
    assert member["member_id"] == "m1" and member["service_name"] == "orders-consumer"
    assert member["assigned_partitions"] == {"orders": list(range(12))}
    assert member["session_timeout"] == 30 and member["session_expires_at"] is not None
    one = api.get("/api/v1/groups/g1/members/m1/").json()
    assert one == {
        "group_id": "g1",
        "member_id": "m1",
        "generation": 1,
        "assigned_partitions": {"orders": list(range(12))},
        "revoking": {},
        "pending": {},
        "version": 1,
        "member_epoch": 1,
    }
    assert api.get("/api/v1/groups/g1/members/nobody/").status_code == 404
    assert api.get("/api/v1/groups/nope/").status_code == 404
    assert api.get("/api/v1/topics/").json()["results"][0]["name"] == "orders"
