"""Service list pages remembered per process (registry.listing.PageCache) are never served once a change
of any service committed: registrations, drains, weights, reported health, deregistrations, a renamed or
deleted owner token, in this process or another; a lapsed lease reads unhealthy at once from a
remembered page, and a health filter is always read from the database. A selector's matches are kept
across changes of health, drain and weight, and read again after a registration or a removal."""

from __future__ import annotations

import time

import httpx
import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from registry import events, lease_store, leases, listing
from registry.models import ApiToken, Service
from registry.redis_client import get_redis
from tests.conftest import client_for, service_body

LIST = "/api/v1/services/?selector=env=prod&page_size=2"


def register(api, sid: str, **extra) -> None:
    body = service_body(sid, **{"service_name": "sink", "labels": {"env": "prod"}, **extra})
    response = api.post("/api/v1/services/", body, format="json")
    assert response.status_code in (200, 201), response.content


def listed(api, query: str = LIST) -> dict:
    response = api.get(query)
    assert response.status_code == 200, response.content
    return response.json()


def queries_of(api, query: str = LIST) -> int:
    with CaptureQueriesContext(connection) as captured:
        listed(api, query)
    return len(captured)


def test_remembered_pages_outlive_no_counter_retry() -> None:
    assert events.RETRY_FOR_SECONDS >= listing.PAGE_CACHE_SECONDS


@pytest.mark.django_db
def test_a_repeated_page_reads_no_rows_until_a_service_changes(api) -> None:
    register(api, "a")
    register(api, "b")
    register(api, "c")
    first = listed(api)
    assert first["count"] == 3 and [s["service_id"] for s in first["results"]] == ["a", "b"]
    assert queries_of(api) <= 1  # the token at most: no count, no page
    assert listed(api) == listed(api)
    assert queries_of(api, LIST + "&page=2") >= 1  # another page is read once ...
    assert queries_of(api, LIST + "&page=2") <= 1  # ... then remembered too

    leases.drain(["a"])
    assert listed(api)["results"][0]["drained"] is True
    leases.set_operator_weight(["b"], 7)
    assert listed(api)["results"][1]["operator_weight"] == 7
    assert api.post("/api/v1/services/b/heartbeat/", {"health": "degraded"}, format="json").status_code == 200
    assert listed(api)["results"][1]["health"] == "degraded"
    register(api, "aa")
    assert [s["service_id"] for s in listed(api)["results"]] == ["a", "aa"]
    assert listed(api)["count"] == 4
    register(api, "aa", labels={"env": "dev"})  # a label change takes it out of the selector
    assert listed(api)["count"] == 3
    assert api.delete("/api/v1/services/a/").status_code == 204
    assert [s["service_id"] for s in listed(api)["results"]] == ["b", "c"]
    assert listed(api)["count"] == 2


@pytest.mark.django_db
def test_the_owner_shown_follows_a_renamed_or_deleted_token(owner, api) -> None:
    register(api, "a")
    assert listed(api)["results"][0]["owner"] == "owner"
    token = ApiToken.objects.get(pk=owner[0].pk)
    token.name = "renamed"
    token.save()
    assert listed(api)["results"][0]["owner"] == "renamed"
    other = ApiToken(name="reader")
    other.set_key("reader-key-0123456789abcdef")
    other.save()
    reader = client_for("reader-key-0123456789abcdef")
    token.delete()
    assert listed(reader)["results"][0]["owner"] is None


@pytest.mark.django_db
def test_a_lapsed_lease_reads_unhealthy_at_once_from_a_remembered_page(api) -> None:
    register(api, "a", lease_duration=1)
    assert listed(api)["results"][0]["health"] == "healthy"
    deadline = lease_store.deadlines(get_redis(), ["a"])["a"] / 1000
    time.sleep(max(0.0, deadline - time.time()) + 0.05)
    assert listed(api)["results"][0]["health"] == "unhealthy"


@pytest.mark.django_db
def test_a_health_filter_and_an_unknown_counter_always_read_the_database(api) -> None:
    register(api, "a")
    health = "/api/v1/services/?health=healthy"
    listed(api, health)
    assert queries_of(api, health) >= 2  # count and page, every time
    get_redis().delete(events.services_membership_key())  # as after a Redis restart
    listed(api)
    assert queries_of(api) >= 2


def label_reads(api, query: str = LIST) -> int:
    """How many statements of the request read the label index (the matches' ids, or their estimate)."""
    with CaptureQueriesContext(connection) as captured:
        listed(api, query)
    return sum("registry_servicelabel" in q["sql"] for q in captured.captured_queries)


@pytest.mark.django_db
def test_the_matches_are_kept_across_health_drain_and_weight_and_read_again_after_a_registration(api) -> None:
    for sid in ("a", "b", "c"):
        register(api, sid)
    assert label_reads(api) >= 1  # the matches' ids read, and remembered
    leases.drain(["a"])
    assert label_reads(api) == 0  # only the page's rows read again
    assert listed(api)["results"][0]["drained"] is True
    leases.set_operator_weight(["b"], 7)
    assert label_reads(api) == 0 and listed(api)["results"][1]["operator_weight"] == 7
    assert api.post("/api/v1/services/b/heartbeat/", {"health": "degraded"}, format="json").status_code == 200
    assert label_reads(api) == 0 and listed(api)["results"][1]["health"] == "degraded"

    register(api, "aa")  # a registration can change the matches: read again
    assert label_reads(api) >= 1
    assert [s["service_id"] for s in listed(api)["results"]] == ["a", "aa"] and listed(api)["count"] == 4
    register(api, "aa", labels={"env": "dev"})
    assert label_reads(api) >= 1 and listed(api)["count"] == 3
    register(api, "0", service_name="aardvark")  # a new name sorts first
    assert [s["service_id"] for s in listed(api)["results"]] == ["0", "a"]
    assert api.delete("/api/v1/services/a/").status_code == 204
    assert label_reads(api) >= 1
    assert [s["service_id"] for s in listed(api)["results"]] == ["0", "b"] and listed(api)["count"] == 3


@pytest.mark.django_db
def test_a_service_gone_without_its_count_is_never_listed_from_remembered_matches(api) -> None:
    for sid in ("a", "b", "c"):
        register(api, sid)
    listed(api)
    Service.objects.filter(pk="b").delete()  # no event, no counter: as if the bump were lost
    get_redis().incr(events.name_version_key("sink"))  # a change of another service: the page is read again
    body = listed(api)
    assert body["count"] == 2 and [s["service_id"] for s in body["results"]] == ["a", "c"]


@pytest.mark.django_db
def test_a_change_of_a_service_on_another_page_leaves_this_page_remembered(api) -> None:
    register(api, "a")
    register(api, "b")
    register(api, "z", service_name="zz-other")  # sorts last: alone on page 2
    listed(api)
    listed(api, LIST + "&page=2")
    assert queries_of(api) <= 1 and queries_of(api, LIST + "&page=2") <= 1  # the token at most
    leases.set_operator_weight(["z"], 3)
    assert queries_of(api) <= 1  # none of page 1's services changed
    assert queries_of(api, LIST + "&page=2") >= 2  # page 2's rows read again (not its matches)
    assert listed(api, LIST + "&page=2")["results"][0]["operator_weight"] == 3
    leases.set_operator_weight(["a"], 4)
    assert listed(api)["results"][0]["operator_weight"] == 4


@pytest.mark.django_db
def test_rows_read_while_the_registry_changed_are_not_remembered() -> None:
    r = get_redis()
    r.set(events.services_version_key(), 5)
    r.set(events.name_version_key("sink"), 11)
    rows = [("a", "sink"), ("b", "sink"), ("c", "other")]
    assert listing.stamps_after(rows, b"5") == (("other", ""), ("sink", "11"))
    r.incr(events.services_version_key())  # a change committed (and counted) while the rows were read
    assert listing.stamps_after(rows, b"5") is None
    assert listing.moved_names((("other", ""), ("sink", "11"))) == set()
    r.incr(events.name_version_key("other"))
    assert listing.moved_names((("other", ""), ("sink", "11"))) == {"other"}


@pytest.mark.django_db(transaction=True)
def test_no_process_serves_a_page_a_change_in_another_made_stale(servers, owner) -> None:
    api = client_for(owner[1])
    register(api, "a")
    register(api, "b")
    clients = [httpx.Client(base_url=url, headers={"Authorization": f"Bearer {owner[1]}"}) for url in servers]

    def pages() -> list[list[tuple[str, bool]]]:
        return [[(s["service_id"], s["drained"]) for s in c.get(LIST).json()["results"]] for c in clients]

    assert pages() == [[("a", False), ("b", False)]] * 2
    assert pages() == [[("a", False), ("b", False)]] * 2  # remembered by both
    leases.drain(["a"])
    assert pages() == [[("a", True), ("b", False)]] * 2
    assert clients[0].delete("/api/v1/services/a/").status_code == 204
    assert pages() == [[("b", False)]] * 2
    register(api, "c")
    assert pages() == [[("b", False), ("c", False)]] * 2


@pytest.mark.django_db
def test_remembered_rows_stay_within_the_budget_least_recently_used_dropped_first() -> None:
    get_redis().set(events.services_membership_key(), 7)
    cache = listing.PageCache(entries=10, rows=5)
    first = cache.entry(("first",)).memo
    cache.add_page(first, (1, 3), [("a",), ("b",), ("c",)], ())
    second = cache.entry(("second",)).memo
    cache.add_page(second, (1, 2), [("d",), ("e",)], ())
    assert cache.total == 5 and cache.remembered_now(("first",)) is first
    cache.add_page(second, (2, 2), [("f",)], ())  # over the budget: the least recently used entry goes
    assert cache.remembered_now(("first",)) is None
    assert cache.remembered_now(("second",)) is second and cache.total == 3
    cache.add_page(second, (2, 2), [("f",), ("g",)], ())  # a page read again replaces its rows
    assert cache.total == 4
    roomy = listing.PageCache(entries=10, rows=100)
    matches = roomy.entry(("selector",)).memo
    roomy.add_ids(matches, [str(i) for i in range(30)])  # ids weigh a tenth of a row
    assert roomy.total == 30 // listing.IDS_PER_ROW + 1 and matches.ids is not None
