"""The service list's paging (registry.listing): a page read through the ids of every match answers exactly
what a page plus a separate count answers (bodies, links, 404s for pages that do not exist), rows read on a
plain cursor are the ORM's values, and an id set (registry.id_sets) takes any text as data on either
database."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import time_machine
from django.db import connection
from django.db.models import F, Q
from django.test.utils import CaptureQueriesContext

from registry import leases, listing
from registry.id_sets import InIdSet, array_literal
from registry.models import ApiToken, Service
from tests.conftest import service_body

pytestmark = pytest.mark.django_db

T0 = datetime(2026, 7, 1, 9, 0, 0, tzinfo=UTC)


def register(api: Any, service_id: str, **overrides: Any) -> None:
    response = api.post("/api/v1/services/", service_body(service_id, **overrides), format="json")
    assert response.status_code in (200, 201), response.content


@pytest.fixture
def fleet(api: Any) -> None:
    """25 services: env prod/dev alternating, zone a for every third, short leases for every fifth."""
    with time_machine.travel(T0, tick=False):
        for i in range(25):
            register(
                api,
                f"f-{i:02}",
                service_name=f"name-{i % 4}",
                labels={"env": "prod" if i % 2 else "dev", "zone": "a" if i % 3 == 0 else "b", "n": str(i)},
                lease_duration=5 if i % 5 == 0 else 60,
                health="degraded" if i % 7 == 0 else "healthy",
            )
    leases.drain(["f-03"])
    leases.set_operator_weight(["f-04"], 9)
    Service.objects.filter(pk="f-06").update(owner=None)


QUERIES = [
    "",
    "?selector=env=prod",
    "?selector=env=prod,zone=a",
    "?selector=zone=a&health=healthy",
    "?selector=zone=a&health=unhealthy",
    "?selector=env=prod&page_size=3",
    "?selector=env=prod&page_size=3&page=2",
    "?selector=env=prod&page_size=3&page=5",
    "?selector=env=prod&page_size=3&page=last",
    "?selector=env=prod,zone=a&page_size=2&page=last",
    "?selector=zone=a&page_size=4&page=2",
    "?selector=env=prod&page_size=3&page=6",  # past the end: 404
    "?selector=env=prod&page_size=3&page=0",
    "?selector=env=prod&page_size=3&page=-1",
    "?selector=env=prod&page_size=3&page=abc",
    "?selector=env=prod&page_size=3&page=1.0",
    "?selector=env=nowhere",
    "?selector=env=nowhere&page=2",
    "?selector=env=prod&page_size=0",
    "?selector=env=prod&page_size=5000",
    "?selector=env=prod&name=name-1",
    "?selector=env",  # a bad selector: 400 naming the field
    "?selector=env=prod&type=nonsense",
]


def answers(api: Any, fuse_at_most: float, monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, Any]]:
    monkeypatch.setattr(listing, "FUSE_AT_MOST", fuse_at_most)
    out = []
    with time_machine.travel(T0 + timedelta(seconds=30), tick=False):
        for query in QUERIES:
            listing.PAGES.clear()  # every answer read from the database, not remembered from the other way
            response = api.get(f"/api/v1/services/{query}")
            assert response.status_code != 500, query
            out.append((response.status_code, response.json()))
    return out


def test_a_page_read_by_ids_answers_as_a_page_and_a_count(
    api: Any, fleet: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    fused = answers(api, float("inf"), monkeypatch)
    apart = answers(api, -1, monkeypatch)
    assert fused == apart
    statuses = dict(zip(QUERIES, (status for status, _ in fused), strict=True))
    assert statuses["?selector=env=prod&page_size=3&page=6"] == 404
    assert statuses["?selector=env=prod&page_size=3&page=abc"] == 404
    assert statuses["?selector=env=nowhere"] == 200
    assert statuses["?selector=env"] == 400
    assert "selector" in fused[QUERIES.index("?selector=env")][1]
    # and what they answer is right
    body = fused[QUERIES.index("?selector=env=prod&page_size=3&page=2")][1]
    prod = sorted((f"name-{i % 4}", f"f-{i:02}") for i in range(25) if i % 2)
    assert body["count"] == len(prod) == 12
    assert [s["service_id"] for s in body["results"]] == [sid for _, sid in prod[3:6]]
    assert "page=3" in body["next"] and "page_size=3" in body["next"]
    last = fused[QUERIES.index("?selector=env=prod&page_size=3&page=last")][1]
    assert [s["service_id"] for s in last["results"]] == [sid for _, sid in prod[9:]] and last["next"] is None
    short = fused[QUERIES.index("?selector=zone=a&health=unhealthy")][1]
    assert {s["service_id"] for s in short["results"]} == {f"f-{i:02}" for i in range(0, 25, 15)}


def test_a_selective_selector_reads_its_matches_ids_then_the_page_by_id(api: Any, fleet: None) -> None:
    def queries(query: str) -> list[str]:
        with CaptureQueriesContext(connection) as captured:
            assert api.get(f"/api/v1/services/{query}").status_code == 200
        return [q["sql"] for q in captured.captured_queries if 'registry_apitoken"."key_hash' not in q["sql"]]

    listing.PAGES.clear()
    listing._estimates.clear()
    selective = queries("?selector=env=prod,zone=a,n=3")
    estimate, ids, rows = selective
    assert "registry_servicelabel" in estimate and "registry_servicelabel" not in rows
    # the matches' ids come from the label index alone, already in the list's order: no service row is read
    assert '"registry_service"' not in ids and "ORDER BY" in ids
    assert ("INTERSECT" if connection.vendor == "sqlite" else "EXISTS") in ids
    if connection.vendor == "sqlite":  # a merge of the index ranges: nothing is sorted
        with connection.cursor() as cursor:
            cursor.execute(f"EXPLAIN QUERY PLAN {listing._label_statement(3, False)}", ["env", "prod"] * 3)
            plan = " ".join(str(row) for row in cursor.fetchall())
        assert "MERGE (INTERSECT)" in plan and "TEMP B-TREE" not in plan, plan
    assert not any("COUNT(*) AS" in sql for sql in selective)  # the count is the number of ids
    assert queries("?selector=env=prod,zone=a,n=3") == []  # remembered
    # after a change of a listed service the ids are kept (the matches cannot have changed): only the
    # page's rows are read again
    leases.set_operator_weight(["f-03"], 5)
    (again,) = queries("?selector=env=prod,zone=a,n=3")
    assert "registry_servicelabel" not in again
    # no selector: a page that stops after its rows, and a count
    listing.PAGES.clear()
    plain = queries("")
    assert len(plain) == 2 and any("COUNT(*)" in sql for sql in plain)


def test_rows_read_on_a_plain_cursor_are_the_orm_values(owner: tuple[ApiToken, str], api: Any, fleet: None) -> None:
    register(api, "odd", labels={"ü-€": "日本", "empty": "", "quote": '"'}, group_id="g-1", health="unknown")
    Service.objects.filter(pk="f-07").update(weight=0, operator_weight=0)
    every = Service.objects.order_by("service_name", "service_id")
    orm = list(every.annotate(owner_name=F("owner__name")).values_list(*listing.COLUMNS))
    assert len(orm) == 26
    assert listing.page_rows(every, 0, 100) == orm
    # the times are the ORM's to their time zone objects, not only the same instants (PostgreSQL's C loader)
    zones = [(row[10].tzinfo, row[13].tzinfo) for row in orm]
    assert [(row[10].tzinfo, row[13].tzinfo) for row in listing.rows_of([row[0] for row in orm])] == zones
    assert listing.page_rows(every, 5, 3) == orm[5:8]
    assert listing.rows_of([row[0] for row in orm[::-1]]) == orm[::-1]
    assert listing.rows_of(["f-01", "gone"]) is None  # a stale id list is noticed


def test_the_selector_estimate_is_the_label_counts_taken_as_independent(
    owner: tuple[ApiToken, str], api: Any, fleet: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    listing._estimates.clear()  # another test's fleet may have been estimated
    # one pair: its count, whatever the service count (env=prod: 12 of 25)
    monkeypatch.setattr(listing, "FUSE_AT_MOST", 12)
    assert listing.fuse_selector({"env": "prod"})
    monkeypatch.setattr(listing, "FUSE_AT_MOST", 11.9)
    assert not listing.fuse_selector({"env": "prod"})
    assert listing.fuse_selector({"env": "nowhere"})
    assert not listing.fuse_selector({})
    if connection.vendor == "sqlite":  # PostgreSQL takes the service count from its statistics
        # 25 services: env=prod 12, zone=a 9 -> 12 * 9 / 25 = 4.32 expected
        monkeypatch.setattr(listing, "FUSE_AT_MOST", 4.4)
        assert listing.fuse_selector({"env": "prod", "zone": "a"})
        monkeypatch.setattr(listing, "FUSE_AT_MOST", 4.3)
        assert not listing.fuse_selector({"env": "prod", "zone": "a"})


ODD_IDS = ['x" OR "1"="1', "back\\slash", "a,b", "{c}", "NULL", "", " sp ace ", 'q"', "ü-€", "'"]


def test_an_id_set_takes_any_text_as_data(owner: tuple[ApiToken, str]) -> None:
    for sid in [*ODD_IDS, "plain-1", "plain-2"]:
        Service.objects.create(
            service_id=sid,
            service_name="odd",
            service_type="source",
            endpoint="10.0.0.1:1",
            lease_duration=30,
            deregister_after=60,
            registered_at=T0,
            lease_expires_at=T0,
            owner=owner[0],
        )
    assert [row[0] for row in listing.rows_of(ODD_IDS[::-1])] == ODD_IDS[::-1]  # rows by id, in the order asked
    for chosen in (ODD_IDS, ODD_IDS[:1], ["plain-1", "nope", '"'], ["NULL"], [""], ["\\"]):
        found = set(Service.objects.filter(InIdSet("pk", chosen)).values_list("pk", flat=True))
        assert found == {sid for sid in chosen if sid in [*ODD_IDS, "plain-1", "plain-2"]}, chosen
        rest = set(Service.objects.filter(~Q(InIdSet("pk", chosen))).values_list("pk", flat=True))
        assert found | rest == {*ODD_IDS, "plain-1", "plain-2"} and not found & rest


def test_the_array_literal_quotes_every_element() -> None:
    assert array_literal(["a", "b"]) == '{"a","b"}'
    assert array_literal(['q"', "b\\c", "NULL", ""]) == '{"q\\"","b\\\\c","NULL",""}'
    assert array_literal(['a","b']) == '{"a\\",\\"b"}'  # a quoted separator inside an id is escaped too


def test_an_empty_list_is_one_count_and_no_page_query(api: Any, fleet: None) -> None:
    with CaptureQueriesContext(connection) as captured:
        body = api.get("/api/v1/services/?name=nobody").json()
    assert body == {"count": 0, "next": None, "previous": None, "results": []}
    reads = [q["sql"] for q in captured.captured_queries if '"registry_service"' in q["sql"]]
    assert len(reads) == 1 and "COUNT(*)" in reads[0]


def test_a_new_name_rewrites_the_label_rows_and_moves_the_service_in_a_selectors_list(api: Any, fleet: None) -> None:
    """Label rows carry their service's name (a selector's ids are read from them in the list's order): a
    re-registration that changes only the name rewrites them, so the name filter and the order follow."""
    from registry.models import ServiceLabel

    def listed(query: str) -> list[str]:
        listing.PAGES.clear()
        return [s["service_id"] for s in api.get(f"/api/v1/services/?{query}").json()["results"]]

    assert "f-01" in listed("selector=env=prod&name=name-1")
    with time_machine.travel(T0 + timedelta(seconds=1), tick=False):
        register(api, "f-01", service_name="a-first-name", labels={"env": "prod", "zone": "b", "n": "1"})
    assert set(ServiceLabel.objects.filter(service_id="f-01").values_list("service_name", flat=True)) == {
        "a-first-name"
    }
    assert "f-01" not in listed("selector=env=prod&name=name-1")
    assert listed("selector=env=prod,zone=b&name=a-first-name") == ["f-01"]
    in_order = Service.objects.filter(labels__env="prod").order_by("service_name", "service_id")
    assert listed("selector=env=prod") == [s.service_id for s in in_order][:100]
    assert listed("selector=env=prod")[0] == "f-01"  # its new name sorts first


@pytest.mark.django_db(transaction=True)
def test_the_migration_gives_existing_label_rows_their_services_name() -> None:
    from django.db.migrations.executor import MigrationExecutor

    before, after = [("registry", "0009_query_indexes")], [("registry", "0010_label_service_name")]
    executor = MigrationExecutor(connection)
    executor.migrate(before)
    old = executor.loader.project_state(before).apps
    OldService, OldLabel = old.get_model("registry", "Service"), old.get_model("registry", "ServiceLabel")
    for i, name in enumerate(["pay", "pay", "ship"]):
        OldService.objects.create(
            service_id=f"m-{i}",
            service_name=name,
            service_type="sink",
            endpoint="10.0.0.1:1",
            labels={"env": "prod"},
            lease_duration=10,
            deregister_after=60,
            registered_at=T0,
            lease_expires_at=T0,
        )
        OldLabel.objects.create(service_id=f"m-{i}", key="env", value="prod")
    executor = MigrationExecutor(connection)
    executor.migrate(after)
    new = executor.loader.project_state(after).apps.get_model("registry", "ServiceLabel")
    assert sorted(new.objects.values_list("service_id", "service_name")) == [
        ("m-0", "pay"),
        ("m-1", "pay"),
        ("m-2", "ship"),
    ]
    executor = MigrationExecutor(connection)
    executor.migrate(executor.loader.graph.leaf_nodes())


def test_the_view_reads_again_only_the_rows_of_the_name_that_changed(api: Any, fleet: None) -> None:
    path = "/api/v1/services/?selector=env=prod"
    listing.PAGES.clear()
    with time_machine.travel(T0 + timedelta(seconds=30), tick=False):
        api.get(path)
        with CaptureQueriesContext(connection) as captured:
            api.get(path)
        assert not [q for q in captured.captured_queries if "registry_service" in q["sql"]]  # remembered
        leases.set_operator_weight(["f-03"], 5)  # a name-3
        with CaptureQueriesContext(connection) as captured:
            partly = api.get(path).json()
        (rows,) = [q["sql"] for q in captured.captured_queries if "registry_service" in q["sql"]]
        assert "f-03" in rows and "f-07" in rows and "f-01" not in rows  # name-3's rows alone
        listing.PAGES.clear()
        assert api.get(path).json() == partly  # as read afresh


def test_a_selector_of_the_most_pairs_a_service_can_carry_is_answered(api: Any, fleet: None) -> None:
    """64 pairs: one statement of 64 ranges (SQLite's compound SELECT allows 500 terms), no 500."""
    labels = {f"k{i:02}": f"v{i}" for i in range(64)}
    register(api, "wide", labels=labels)
    selector = ",".join(f"{k}={v}" for k, v in labels.items())
    for query, found in (("", ["wide"]), ("&name=kafka-source", ["wide"]), ("&name=payments", [])):
        listing.PAGES.clear()
        response = api.get(f"/api/v1/services/?selector={selector}{query}")
        assert response.status_code == 200, response.content[:300]
        assert [s["service_id"] for s in response.json()["results"]] == found
    too_many = selector + ",k64=v64"
    response = api.get(f"/api/v1/services/?selector={too_many}")
    assert response.status_code == 400 and "selector" in response.json()
