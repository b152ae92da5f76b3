"""Ownership of groups and topics, the quotas, and the service-member coupling, tried by a second token
(the attacker) against the token that created things (the victim): every refusal writes nothing."""

from __future__ import annotations

import importlib
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
import time_machine
from django.apps import apps
from django.db import connection, transaction

from groups import topics
from groups.models import GroupMember, RebalanceEvent, ServiceGroup, Topic
from groups.tasks import expire_once
from registry import lease_store
from registry.redis_client import get_redis
from tests.conftest import client_for, service_body

pytestmark = pytest.mark.django_db

T0 = datetime(2026, 8, 1, 10, 0, 0, tzinfo=UTC)


def join(client, member_id, topics=("orders",), group="g1", **extra):
    body = {"member_id": member_id, "service_name": "orders-consumer", "topics": list(topics), **extra}
    return client.post(f"/api/v1/groups/{group}/members/", body, format="json")


def put_topic(client, name, partitions):
    return client.put(f"/api/v1/topics/{name}/", {"partitions": partitions}, format="json")


def member_ids(group="g1"):
    return sorted(GroupMember.objects.filter(group_id=group).values_list("member_id", flat=True))


def sessions():
    return sorted(lease_store.all_sessions(get_redis()))


@pytest.fixture
def victim(owner):
    """(token, API client, key) of the token that creates the group, its topic and member m1."""
    return owner[0], client_for(owner[1]), owner[1]


@pytest.fixture
def attacker(make_token):
    token, key = make_token("attacker")
    return token, client_for(key), key


@pytest.fixture
def staff(make_token):
    token, key = make_token("ops", staff=True)
    return token, client_for(key), key


@pytest.fixture
def victims_group(victim):
    """Group g1, created by the victim's join of m1 over its topic orders (12 partitions)."""
    client = victim[1]
    assert put_topic(client, "orders", 12).status_code == 201
    assert join(client, "m1").status_code == 201
    return ServiceGroup.objects.get(pk="g1")


# --- groups ---------------------------------------------------------------------------------


def test_the_first_join_makes_its_token_the_group_owner(victim, victims_group):
    assert victims_group.owner == victim[0]
    assert join(victim[1], "m2").status_code == 201  # the owner adds more members
    assert member_ids() == ["m1", "m2"]


def test_another_token_cannot_join_the_group_and_nothing_is_written(victims_group, attacker):
    before = (victims_group.generation, victims_group.version, sessions())

    response = join(attacker[1], "intruder", topics=["orders", "brand-new-topic"])

    assert response.status_code == 403
    assert "belongs to another token" in response.json()["detail"]
    assert "grant" in response.json()["detail"]
    group = ServiceGroup.objects.get(pk="g1")
    assert (group.generation, group.version, sessions()) == before
    assert member_ids() == ["m1"]
    assert not Topic.objects.filter(name="brand-new-topic").exists()  # the refused join's topic rolled back
    assert RebalanceEvent.objects.filter(group=group).count() == 1


def test_reads_of_a_group_stay_open_to_every_token(victims_group, attacker):
    body = attacker[1].get("/api/v1/groups/g1/").json()
    assert [m["member_id"] for m in body["members"]] == ["m1"]
    assert attacker[1].get("/api/v1/groups/g1/members/m1/").json()["assigned_partitions"] == {"orders": list(range(12))}


def test_staff_may_join_any_group(victims_group, staff):
    assert join(staff[1], "ops-1").status_code == 201
    assert member_ids() == ["m1", "ops-1"]
    assert ServiceGroup.objects.get(pk="g1").owner_id != staff[0].pk  # joining does not take the group


def test_an_operator_grant_in_the_admin_lets_a_second_token_join(victim, victims_group, attacker, operator):
    assert join(attacker[1], "m2").status_code == 403

    page = operator.get("/admin/groups/servicegroup/g1/change/").content.decode()
    assert 'name="grants"' in page and 'name="owner"' in page
    response = operator.post(
        "/admin/groups/servicegroup/g1/change/", {"owner": victim[0].pk, "grants": [attacker[0].pk]}
    )
    assert response.status_code == 302

    group = ServiceGroup.objects.get(pk="g1")
    assert list(group.grants.all()) == [attacker[0]] and group.owner == victim[0]
    assert group.generation == 1  # the admin wrote the owner and grants only
    assert join(attacker[1], "m2").status_code == 201
    assert member_ids() == ["m1", "m2"]
    # the grant is to the group: the victim's member is still the victim's, even with its epoch right
    epoch = attacker[1].get("/api/v1/groups/g1/members/m1/").json()["member_epoch"]
    assert attacker[1].delete(f"/api/v1/groups/g1/members/m1/?member_epoch={epoch}").status_code == 403

    operator.post("/admin/groups/servicegroup/g1/change/", {"owner": victim[0].pk, "grants": []})
    assert join(attacker[1], "m3").status_code == 403


@pytest.mark.django_db(transaction=True)
def test_racing_first_joins_of_two_tokens_make_one_owner_and_refuse_the_other(owner, make_token):
    """Both tokens join the new group g at once, a few times over: one owns it, the other's joins are all
    refused, and every member belongs to the owner."""
    other = make_token("other")
    client_for(owner[1]).put("/api/v1/topics/orders/", {"partitions": 6}, format="json")
    start = threading.Barrier(2)
    statuses: dict[str, list[int]] = {"owner": [], "other": []}

    def racer(name: str, key: str) -> None:
        client = client_for(key)
        try:
            start.wait(30)
            for n in range(3):
                statuses[name].append(join(client, f"{name}-{n}", group="g").status_code)
        finally:
            connection.close()

    threads = [
        threading.Thread(target=racer, args=("owner", owner[1])),
        threading.Thread(target=racer, args=("other", other[1])),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    group = ServiceGroup.objects.get(pk="g")
    winner = "owner" if group.owner == owner[0] else "other"
    loser = "other" if winner == "owner" else "owner"
    assert statuses[winner] == [201, 201, 201] and statuses[loser] == [403, 403, 403], statuses
    assert member_ids("g") == [f"{winner}-{n}" for n in range(3)]
    assert set(GroupMember.objects.filter(group=group).values_list("owner", flat=True)) == {group.owner_id}


def test_an_operator_sets_a_topics_owner_and_grants_in_the_admin(victim, attacker, operator):
    put_topic(victim[1], "orders", 12)
    page = operator.get("/admin/groups/topic/orders/change/").content.decode()
    assert 'name="grants"' in page and 'name="owner"' in page

    response = operator.post(
        "/admin/groups/topic/orders/change/", {"partitions": "12", "owner": victim[0].pk, "grants": [attacker[0].pk]}
    )

    assert response.status_code == 302
    topic = Topic.objects.get(name="orders")
    assert (topic.owner, list(topic.grants.all()), topic.partitions) == (victim[0], [attacker[0]], 12)
    assert put_topic(attacker[1], "orders", 13).status_code == 200
    operator.post("/admin/groups/topic/orders/change/", {"partitions": "13", "owner": attacker[0].pk})
    topic = Topic.objects.get(name="orders")
    assert (topic.owner, list(topic.grants.all())) == (attacker[0], [])
    assert put_topic(victim[1], "orders", 14).status_code == 403


def test_an_ownerless_group_is_for_staff_and_granted_tokens_only(victims_group, victim, attacker, staff):
    ServiceGroup.objects.filter(pk="g1").update(owner=None)  # a group from before, or its owner was deleted

    assert join(victim[1], "m2").status_code == 403
    assert join(attacker[1], "m3").status_code == 403
    assert join(staff[1], "m4").status_code == 201
    ServiceGroup.objects.get(pk="g1").grants.add(attacker[0])
    assert join(attacker[1], "m3").status_code == 201
    assert member_ids() == ["m1", "m3", "m4"]


def test_the_migration_gives_a_group_from_before_its_first_members_token(victim, attacker):
    migration = importlib.import_module("groups.migrations.0003_ownership")
    g1 = ServiceGroup.objects.create(group_id="old")
    ServiceGroup.objects.create(group_id="empty")
    GroupMember.objects.create(group=g1, member_id="b", service_name="s", joined_at=T0, owner=attacker[0])
    GroupMember.objects.create(group=g1, member_id="a", service_name="s", joined_at=T0 - timedelta(1), owner=None)
    GroupMember.objects.create(group=g1, member_id="c", service_name="s", joined_at=T0 + timedelta(1), owner=victim[0])

    migration.owners_from_first_members(apps, None)

    assert ServiceGroup.objects.get(pk="old").owner == attacker[0]  # the earliest member that has a token
    assert ServiceGroup.objects.get(pk="empty").owner is None


# --- topics ---------------------------------------------------------------------------------


def test_creating_a_topic_is_open_and_the_creator_owns_it(victim, attacker):
    assert put_topic(attacker[1], "theirs", 3).status_code == 201
    assert Topic.objects.get(name="theirs").owner == attacker[0]


def test_a_join_creates_unknown_topics_owned_by_the_joining_token(victim):
    assert join(victim[1], "m1", topics=["fresh"]).status_code == 201
    topic = Topic.objects.get(name="fresh")
    assert (topic.owner, topic.partitions) == (victim[0], 12)


def test_another_token_cannot_grow_a_topic(victims_group, attacker):
    response = put_topic(attacker[1], "orders", 10000)

    assert response.status_code == 403
    assert "belongs to another token" in response.json()["detail"]
    assert Topic.objects.get(name="orders").partitions == 12
    assert ServiceGroup.objects.get(pk="g1").generation == 1  # no rebalance
    # a PUT of the count it has changes nothing and is open to all (create-if-absent)
    assert put_topic(attacker[1], "orders", 12).status_code == 200


def test_the_owner_a_granted_token_and_staff_may_grow_a_topic(victim, victims_group, attacker, staff):
    assert put_topic(victim[1], "orders", 14).status_code == 200
    assert put_topic(staff[1], "orders", 16).status_code == 200
    Topic.objects.get(name="orders").grants.add(attacker[0])
    assert put_topic(attacker[1], "orders", 18).status_code == 200
    assert Topic.objects.get(name="orders").partitions == 18
    assert Topic.objects.get(name="orders").owner == victim[0]
    assert ServiceGroup.objects.get(pk="g1").generation == 4


def test_a_topic_a_group_reads_is_not_deleted_409(victim, victims_group):
    response = victim[1].delete("/api/v1/topics/orders/")

    assert response.status_code == 409
    body = response.json()
    assert body["code"] == "topic_in_use" and body["groups"] == ["g1"]
    assert "g1" in body["detail"]
    assert Topic.objects.filter(name="orders").exists()
    assert victim[1].get("/api/v1/groups/g1/members/m1/").json()["assigned_partitions"] == {"orders": list(range(12))}


def test_an_unread_topic_is_deleted_by_its_owner_204_then_404(victim, victims_group):
    assert put_topic(victim[1], "spare", 4).status_code == 201
    assert victim[1].delete("/api/v1/topics/spare/").status_code == 204
    assert not Topic.objects.filter(name="spare").exists()
    response = victim[1].delete("/api/v1/topics/spare/")
    assert response.status_code == 404 and "spare" in response.json()["detail"]
    # once the group stops reading it, the read topic goes too
    epoch = victim[1].get("/api/v1/groups/g1/members/m1/").json()["member_epoch"]
    assert victim[1].delete(f"/api/v1/groups/g1/members/m1/?member_epoch={epoch}").status_code == 204
    assert victim[1].delete("/api/v1/topics/orders/").status_code == 204


def test_another_token_cannot_delete_a_topic_but_staff_can(victim, attacker, staff):
    put_topic(victim[1], "spare", 4)
    response = attacker[1].delete("/api/v1/topics/spare/")
    assert response.status_code == 403 and "delete" in response.json()["detail"]
    assert Topic.objects.filter(name="spare").exists()
    assert staff[1].delete("/api/v1/topics/spare/").status_code == 204


def test_a_topic_from_before_has_no_owner_and_only_staff_may_grow_it(victim, staff):
    Topic.objects.create(name="legacy", partitions=3)
    assert put_topic(victim[1], "legacy", 4).status_code == 403
    assert victim[1].delete("/api/v1/topics/legacy/").status_code == 403
    assert put_topic(staff[1], "legacy", 4).status_code == 200


@pytest.mark.django_db(transaction=True)
def test_a_delete_racing_a_join_onto_the_topic_waits_and_then_refuses(owner):
    """The join's share lock on its topics: a delete that finds no reader cannot slip in before the join
    that makes the group one commits (without it, the group would read a topic that is gone)."""
    if connection.vendor != "postgresql":
        pytest.skip("row locks: SQLite runs one writing transaction at a time")
    assert put_topic(client_for(owner[1]), "t", 4).status_code == 201
    subscribed, release = threading.Event(), threading.Event()
    outcome: list[object] = []

    def joiner() -> None:
        try:
            with transaction.atomic():
                topics.ensure_topics(["t"], owner[0])
                ServiceGroup.objects.create(group_id="g", owner=owner[0], topics=["t"])
                subscribed.set()
                release.wait(30)
        finally:
            connection.close()

    def deleter() -> None:
        try:
            outcome.append(topics.delete_topic("t"))
        except topics.TopicInUse as exc:
            outcome.append(exc)
        finally:
            connection.close()

    join_thread = threading.Thread(target=joiner)
    join_thread.start()
    assert subscribed.wait(30)
    delete_thread = threading.Thread(target=deleter)
    delete_thread.start()
    for _ in range(300):  # until the delete waits on a row lock (or, without the share lock, has finished)
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'")
            if cursor.fetchone()[0] or outcome:
                break
        time.sleep(0.05)
    release.set()
    join_thread.join(30)
    delete_thread.join(30)

    assert len(outcome) == 1 and isinstance(outcome[0], topics.TopicInUse), outcome
    assert outcome[0].readers == ["g"]
    assert Topic.objects.filter(name="t").exists()


# --- quotas ---------------------------------------------------------------------------------


def test_partitions_per_topic_quota(victim, settings):
    settings.REGISTRY_MAX_PARTITIONS_PER_TOPIC = 100

    response = put_topic(victim[1], "big", 101)

    assert response.status_code == 400
    assert list(response.json()) == ["partitions"]
    assert "REGISTRY_MAX_PARTITIONS_PER_TOPIC" in response.json()["partitions"][0]
    assert not Topic.objects.filter(name="big").exists()
    assert put_topic(victim[1], "big", 100).status_code == 201
    assert put_topic(victim[1], "big", 101).status_code == 400
    assert Topic.objects.get(name="big").partitions == 100


def test_topics_per_join_quota(victim, settings):
    settings.REGISTRY_MAX_TOPICS_PER_JOIN = 2

    response = join(victim[1], "m1", topics=["a", "b", "c"])

    assert response.status_code == 400
    assert list(response.json()) == ["topics"]
    assert "REGISTRY_MAX_TOPICS_PER_JOIN" in response.json()["topics"][0]
    assert not Topic.objects.exists() and not ServiceGroup.objects.exists() and sessions() == []
    assert join(victim[1], "m1", topics=["a", "b", "b"]).status_code == 201  # duplicates count once


def test_members_per_group_quota(victim, victims_group, settings):
    settings.REGISTRY_MAX_MEMBERS_PER_GROUP = 2
    assert join(victim[1], "m2").status_code == 201

    response = join(victim[1], "m3")

    assert response.status_code == 400
    assert list(response.json()) == ["member_id"]
    assert "REGISTRY_MAX_MEMBERS_PER_GROUP" in response.json()["member_id"][0]
    assert member_ids() == ["m1", "m2"]
    assert ServiceGroup.objects.get(pk="g1").generation == 2
    assert ("g1", "m3") not in sessions()
    # a (static) rejoin of a member adds nobody: not refused by the quota
    assert join(victim[1], "m2", topics=["orders", "more"], static=True).status_code == 200


# --- service-member coupling ---------------------------------------------------------------


def test_another_token_cannot_evict_a_member_by_deregistering_a_service_of_its_id(
    victims_group, attacker, django_capture_on_commit_callbacks
):
    assert attacker[1].post("/api/v1/services/", service_body("m1"), format="json").status_code == 201

    with django_capture_on_commit_callbacks(execute=True):
        assert attacker[1].delete("/api/v1/services/m1/").status_code == 204

    assert member_ids() == ["m1"]
    assert ServiceGroup.objects.get(pk="g1").generation == 1
    assert ("g1", "m1") in sessions()


def test_another_token_cannot_evict_a_member_by_letting_a_service_of_its_id_expire(
    victim, attacker, django_capture_on_commit_callbacks
):
    from registry.tasks import cleanup_once

    with time_machine.travel(T0, tick=False) as clock:
        put_topic(victim[1], "orders", 12)
        join(victim[1], "m1", session_timeout=3600)
        body = service_body("m1", lease_duration=5, deregister_after=0)
        assert attacker[1].post("/api/v1/services/", body, format="json").status_code == 201
        clock.move_to(T0 + timedelta(seconds=6))
        with django_capture_on_commit_callbacks(execute=True):
            assert cleanup_once() == ["m1"]
    assert member_ids() == ["m1"]


def test_the_owner_deregistering_its_service_still_removes_its_member(
    victim, attacker, staff, django_capture_on_commit_callbacks
):
    """The coupling holds where one token owns both, also when staff deregisters the service."""
    put_topic(victim[1], "orders", 12)
    join(victim[1], "m1")
    join(victim[1], "m1", group="g2")
    ServiceGroup.objects.get(pk="g1").grants.add(attacker[0])
    assert join(attacker[1], "m1", group="g3").status_code == 201  # the attacker's own m1 elsewhere
    victim[1].post("/api/v1/services/", service_body("m1"), format="json")

    with django_capture_on_commit_callbacks(execute=True):
        assert staff[1].delete("/api/v1/services/m1/").status_code == 204

    assert member_ids("g1") == [] and member_ids("g2") == []
    assert member_ids("g3") == ["m1"]  # joined by another token: not the service's


def test_another_tokens_service_heartbeat_does_not_keep_a_member_alive(victim, attacker, heartbeat):
    with time_machine.travel(T0, tick=False) as clock:
        put_topic(victim[1], "orders", 12)
        join(victim[1], "m1", session_timeout=10)
        body = service_body("m1", lease_duration=60)
        assert attacker[1].post("/api/v1/services/", body, format="json").status_code == 201
        clock.move_to(T0 + timedelta(seconds=9))
        status, body = heartbeat("m1", attacker[2])
        assert status == 200, body  # the attacker's service is renewed...
        clock.move_to(T0 + timedelta(seconds=10, milliseconds=1))
        assert expire_once() == [("g1", "m1")]  # ...the victim's member is not


def test_the_owners_service_heartbeat_keeps_its_member_alive(victim, heartbeat):
    with time_machine.travel(T0, tick=False) as clock:
        put_topic(victim[1], "orders", 12)
        join(victim[1], "m1", session_timeout=10)
        victim[1].post("/api/v1/services/", service_body("m1", lease_duration=60), format="json")
        clock.move_to(T0 + timedelta(seconds=9))
        assert heartbeat("m1", victim[2])[0] == 200
        clock.move_to(T0 + timedelta(seconds=15))
        assert expire_once() == []
        clock.move_to(T0 + timedelta(seconds=19, milliseconds=1))
        assert expire_once() == [("g1", "m1")]


def test_a_staff_heartbeat_of_the_owners_service_renews_only_the_owners_member(victim, attacker, staff, heartbeat):
    with time_machine.travel(T0, tick=False) as clock:
        put_topic(victim[1], "orders", 12)
        join(victim[1], "m1", group="g1", session_timeout=10)
        assert join(attacker[1], "m1", group="g2", session_timeout=10).status_code == 201
        victim[1].post("/api/v1/services/", service_body("m1", lease_duration=60), format="json")
        clock.move_to(T0 + timedelta(seconds=9))
        assert heartbeat("m1", staff[2])[0] == 200
        clock.move_to(T0 + timedelta(seconds=10, milliseconds=1))
        assert expire_once() == [("g2", "m1")]  # the attacker's m1 was not renewed by the victim's service


def test_a_session_entry_without_an_owner_renews_and_couples_to_nothing(victim, owner, heartbeat):
    """An entry written before owners were recorded ("<timeout_ms>") still works for the member itself."""
    r = get_redis()
    t0_ms = lease_store.to_ms(T0)
    with time_machine.travel(T0, tick=False) as clock:
        put_topic(victim[1], "orders", 12)
        epoch = join(victim[1], "m1", session_timeout=10).json()["member_epoch"]
        assert r.hget(lease_store.keys().timeouts, "g1/m1").decode() == f"10000:{owner[0].pk}"
        r.hset(lease_store.keys().timeouts, "g1/m1", "10000")
        victim[1].post("/api/v1/services/", service_body("m1", lease_duration=60), format="json")
        clock.move_to(T0 + timedelta(seconds=9))
        assert heartbeat("m1", victim[2])[0] == 200  # no owner in the entry: the service renews nothing
        assert lease_store.session_deadlines(r, [("g1", "m1")]) == {("g1", "m1"): t0_ms + 10000}
    # the member's own renewal and the outage grace read the timeout alike
    assert lease_store.renew_session(r, "g1", "m1", t0_ms + 9000, epoch) == t0_ms + 19000
    assert lease_store.grant_grace(r, t0_ms + 20000)[1] == 1
    assert lease_store.session_deadlines(r, [("g1", "m1")]) == {("g1", "m1"): t0_ms + 30000}
