"""The service list fast path (registry.list_fastpath) answers a remembered page byte for byte as the view
does, with no database query, and leaves to the view everything it cannot answer so: a page not
remembered or remembered before a registration, a removal or a change of one of its services, a revoked
token, a health filter, a page that is not a plain number."""

from __future__ import annotations

import time

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from registry import lease_store, leases, listing
from registry.models import ApiToken, Service
from registry.redis_client import get_redis
from tests.conftest import asgi_request, client_for, service_body

QUERIES = [
    "/api/v1/services/",
    "/api/v1/services/?selector=env=prod",
    "/api/v1/services/?selector=env=prod,zone=a&page_size=2",
    "/api/v1/services/?selector=env=prod,zone=a&page_size=2&page=2",
    "/api/v1/services/?page_size=2&page=3",
    "/api/v1/services/?page_size=2&page=2&unknown=x%20y",
    "/api/v1/services/?name=sink&type=sink",
    "/api/v1/services/?name=nobody",
    "/api/v1/services/?page_size=5000",
    "/api/v1/services/?name=a&name=sink&page_size=1&page=2",
]


def register(api, sid: str, **extra) -> None:
    labels = {"env": "prod", "zone": "a" if sid < "d" else "b", "note": "caf\u00e9\u2028x"}
    body = service_body(sid, **{"service_name": "sink", "service_type": "sink", "labels": labels, **extra})
    response = api.post("/api/v1/services/", body, format="json")
    assert response.status_code in (200, 201), response.content


def get(path: str, key: str) -> tuple[int, bytes, int]:
    """(status, body, queries) of one request through the whole ASGI application."""
    with CaptureQueriesContext(connection) as captured:
        response = asgi_request("GET", path, headers={"Authorization": f"Bearer {key}"})
    return response.status_code, response.content, len(captured)


def read_by_view(path: str, key: str) -> bytes:
    """The view's answer, read from the database (Django's test client: no ASGI fast path)."""
    listing.PAGES.clear()
    response = client_for(key).get(path, HTTP_HOST="127.0.0.1")  # the host asgi_request sends
    assert response.status_code == 200, (path, response.content)
    return response.content


def fast_path_read(path: str, key: str) -> bytes:
    """The fast path's answer, read from the database: the token is checked in Redis, not read."""
    listing.PAGES.clear()
    with CaptureQueriesContext(connection) as captured:
        response = asgi_request("GET", path, headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 200, (path, response.content)
    assert captured and not any('"key_hash"' in q["sql"] for q in captured.captured_queries), path
    return response.content


@pytest.mark.django_db
def test_a_page_is_answered_as_the_view_answers_it_and_then_without_the_database(owner, api) -> None:
    for sid in ("a", "b", "c", "d", "e"):
        register(api, sid)
    for path in QUERIES:
        by_view = read_by_view(path, owner[1])
        assert fast_path_read(path, owner[1]) == by_view, path  # read and remembered by the fast path
        status, fast, queries = get(path, owner[1])
        assert (status, queries) == (200, 0), path  # answered before Django, from memory
        assert fast == by_view, path


@pytest.mark.django_db
def test_changes_lapses_and_revocations_are_never_answered_from_memory(owner, api) -> None:
    register(api, "a", lease_duration=1)
    register(api, "b")
    path = "/api/v1/services/?selector=env=prod"
    get(path, owner[1])
    assert get(path, owner[1])[2] == 0  # remembered
    leases.drain(["a"])
    _, body, queries = get(path, owner[1])
    assert queries >= 1 and b'"drained":true' in body  # read again after the change
    assert get(path, owner[1])[2] == 0
    deadline = lease_store.deadlines(get_redis(), ["a"])["a"] / 1000
    time.sleep(max(0.0, deadline - time.time()) + 0.05)
    _, body, queries = get(path, owner[1])
    assert queries == 0 and b'"service_id":"a","service_name":"sink"' in body
    assert body.count(b'"health":"unhealthy"') == 1  # a's lease lapsed: unhealthy at once, from memory too
    token = ApiToken.objects.get(pk=owner[0].pk)
    token.is_active = False
    token.save()
    assert get(path, owner[1])[0] == 401


@pytest.mark.django_db
def test_a_page_stays_on_the_fast_path_until_one_of_its_services_or_the_membership_changes(owner, api) -> None:
    register(api, "a")
    register(api, "b")
    register(api, "z", service_name="zz-other")  # alone on page 2
    first, second = "/api/v1/services/?page_size=2", "/api/v1/services/?page_size=2&page=2"
    for path in (first, second):
        get(path, owner[1])
        assert get(path, owner[1])[2] == 0
    leases.set_operator_weight(["z"], 3)  # a service on page 2 only
    assert get(first, owner[1])[2] == 0  # page 1 is still answered from memory
    _, body, queries = get(second, owner[1])
    assert queries >= 1 and b'"operator_weight":3' in body
    assert get(second, owner[1])[2] == 0
    register(api, "c", service_name="zz-other")  # a registration: the count may change, every page is read
    _, body, queries = get(first, owner[1])
    assert queries >= 1 and b'"count":4' in body


@pytest.mark.django_db
def test_after_a_change_of_a_listed_service_the_fast_path_reads_only_the_rows(owner, api) -> None:
    for sid in ("a", "b", "c", "e"):
        register(api, sid)
    path = "/api/v1/services/?selector=env=prod,zone=a&page_size=2"
    get(path, owner[1])  # the view reads the matches' ids and the page
    assert get(path, owner[1])[2] == 0
    leases.set_operator_weight(["a"], 3)
    status, fast, queries = get(path, owner[1])
    assert (status, queries) == (200, 1) and b'"operator_weight":3' in fast  # the rows alone: no token, no labels
    assert get(path, owner[1])[2] == 0  # remembered again
    assert read_by_view(path, owner[1]) == fast
    # a page not read yet, of remembered ids: its rows read by the fast path, as the view reads them
    status, fast, queries = get(path + "&page=2", owner[1])
    assert (status, queries) == (200, 1) and b'"service_id":"c"' in fast
    assert read_by_view(path + "&page=2", owner[1]) == fast
    get(path, owner[1])
    assert get(path + "&page=3", owner[1])[0] == 404  # past the end: the view's answer
    # a removal that was not counted: the rows read show it, and the view answers afresh
    Service.objects.filter(pk="b").delete()
    leases.set_operator_weight(["a"], 4)
    status, body, _ = get(path, owner[1])
    assert status == 200 and b'"count":2' in body and b'"service_id":"b"' not in body


@pytest.mark.django_db
def test_after_a_change_of_a_listed_service_only_the_rows_of_its_name_are_read_again(owner, api) -> None:
    for sid, name in (("a", "pay"), ("b", "pay"), ("c", "ship"), ("d", "ship")):
        register(api, sid, service_name=name, labels={"env": "prod"})
    path = "/api/v1/services/?selector=env=prod"
    get(path, owner[1])
    assert get(path, owner[1])[2] == 0
    leases.set_operator_weight(["c"], 3)  # a "ship"
    with CaptureQueriesContext(connection) as captured:
        response = asgi_request("GET", path, headers={"Authorization": f"Bearer {owner[1]}"})
    (query,) = captured.captured_queries
    assert '"c"' in query["sql"] and '"d"' in query["sql"] and '"a"' not in query["sql"]  # ship's rows alone
    assert b'"operator_weight":3' in response.content
    assert read_by_view(path, owner[1]) == response.content
    assert get(path, owner[1])[2] == 0  # remembered again, with ship's new counter and pay's old one
    leases.set_operator_weight(["a"], 4)  # then a "pay": its rows alone, ship's kept as read above
    _, body, queries = get(path, owner[1])
    assert queries == 1 and b'"operator_weight":4' in body and b'"operator_weight":3' in body
    assert read_by_view(path, owner[1]) == body


@pytest.mark.django_db
@pytest.mark.parametrize(
    "query", ["?health=healthy", "?page=last", "?page=0", "?page=9", "?page_size=0&page=1", "?format=json"]
)
def test_what_the_view_reads_its_own_way_goes_to_the_view(owner, api, query) -> None:
    register(api, "a")
    path = "/api/v1/services/" + query
    first = get(path, owner[1])
    again = get(path, owner[1])
    assert again[2] >= 1, query  # the view answered again
    assert again[:2] == first[:2]
    assert again[:2] == (client_for(owner[1]).get(path).status_code, again[1])
