"""10 clients joining, heartbeating and leaving one group from threads, with an observer reading the group
throughout (CI runs it on SQLite and PostgreSQL): generations strictly sequential, no partition ever shown
with two owners, final assignment balanced."""

from __future__ import annotations

import random
import threading
import time

import pytest
from django.db import connection

from groups.models import RebalanceEvent, ServiceGroup
from tests.conftest import client_for

CLIENTS = 10
SECONDS = 4.0
PARTITIONS = 24


def owners_by_partition(body: dict) -> dict[tuple[str, int], list[str]]:
    seen: dict[tuple[str, int], list[str]] = {}
    for member in body["members"]:
        for topic, numbers in member["assigned_partitions"].items():
            for n in numbers:
                seen.setdefault((topic, n), []).append(member["member_id"])
    return seen


@pytest.mark.django_db(transaction=True)
def test_concurrent_joins_and_leaves_keep_generations_sequential_and_owners_unique(owner):
    _, key = owner
    client_for(key).put("/api/v1/topics/orders/", {"partitions": PARTITIONS}, format="json")
    stop_at = time.monotonic() + SECONDS
    failures: list[str] = []
    observations = 0
    lock = threading.Lock()

    def member(n: int) -> None:
        rng = random.Random(n)
        client = client_for(key)
        member_id = f"m{n}"
        epoch = None  # the incarnation this thread is, while it is a member
        try:
            while time.monotonic() < stop_at:
                if epoch is None:
                    joined = client.post(
                        "/api/v1/groups/g1/members/",
                        {"member_id": member_id, "service_name": "c", "topics": ["orders"]},
                        format="json",
                    )
                    if joined.status_code not in (200, 201):
                        failures.append(f"join {joined.status_code} {joined.content!r}")
                        return
                    generation, epoch = joined.json()["generation"], joined.json()["member_epoch"]
                for _ in range(rng.randint(1, 4)):
                    beat = client.post(
                        f"/api/v1/groups/g1/members/{member_id}/heartbeat/",
                        {"generation": generation, "member_epoch": epoch},
                        format="json",
                    )
                    if beat.status_code != 200:
                        failures.append(f"heartbeat {beat.status_code}")
                        return
                    generation = beat.json()["generation"]
                if rng.random() < 0.7 and time.monotonic() < stop_at:
                    left = client.delete(f"/api/v1/groups/g1/members/{member_id}/?member_epoch={epoch}")
                    if left.status_code != 204:
                        failures.append(f"leave {left.status_code}")
                        return
                    epoch = None
            # finish as a member, so the final state has members to balance
            if epoch is None:
                client.post(
                    "/api/v1/groups/g1/members/",
                    {"member_id": member_id, "service_name": "c", "topics": ["orders"]},
                    format="json",
                )
        except Exception as exc:  # noqa: BLE001 - reported below
            failures.append(repr(exc))
        finally:
            connection.close()

    def observer() -> None:
        nonlocal observations
        client = client_for(key)
        last_generation = 0
        try:
            # at least 20 observations even on a starved machine, within a generous cap
            while (time.monotonic() < stop_at + 0.5 or observations < 20) and time.monotonic() < stop_at + 60:
                response = client.get("/api/v1/groups/g1/")
                if response.status_code == 404:
                    continue
                body = response.json()
                doubled = {p: o for p, o in owners_by_partition(body).items() if len(o) > 1}
                if doubled:
                    failures.append(f"generation {body['generation']}: partitions with two owners {doubled}")
                if body["generation"] < last_generation:
                    failures.append(f"generation went back from {last_generation} to {body['generation']}")
                last_generation = body["generation"]
                with lock:
                    observations += 1
        finally:
            connection.close()

    threads = [threading.Thread(target=member, args=(n,)) for n in range(CLIENTS)]
    threads.append(threading.Thread(target=observer))
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert failures == []
    assert observations >= 20
    group = ServiceGroup.objects.get(pk="g1")
    generations = list(
        RebalanceEvent.objects.filter(group=group).order_by("generation").values_list("generation", flat=True)
    )
    assert generations == list(range(1, group.generation + 1))  # none skipped, none repeated
    assert group.generation > CLIENTS  # the run really interleaved many changes

    # every member confirms the final generation; then all 24 partitions are owned, evenly
    client = client_for(key)
    for m, epoch in group.members.values_list("member_id", "member_epoch"):
        body = {"generation": group.generation, "member_epoch": epoch}
        client.post(f"/api/v1/groups/g1/members/{m}/heartbeat/", body, format="json")
    body = client.get("/api/v1/groups/g1/").json()
    seen = owners_by_partition(body)
    assert sorted(seen) == [("orders", n) for n in range(PARTITIONS)]
    assert all(len(o) == 1 for o in seen.values())
    loads = [sum(len(v) for v in m["assigned_partitions"].values()) for m in body["members"]]
    assert len(loads) == CLIENTS and max(loads) - min(loads) <= 1
    assert body["state"] == "stable"
