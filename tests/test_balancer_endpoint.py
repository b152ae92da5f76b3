"""GET /api/v1/balancer/select/: shared rotation state in Redis, errors, and the admin's drain.

Every test runs through both front doors: the DRF view (Django's test client) and the whole ASGI
application, where balancer.fastpath answers selects itself.
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest
import time_machine

from tests.conftest import asgi_request, client_for, service_body

pytestmark = pytest.mark.django_db


class Door:
    """GETs through the DRF view or through the ASGI application (the fast path), answering alike."""

    def __init__(self, via: str) -> None:
        self.via = via

    def client(self, key: str | None):
        if self.via == "drf":
            return client_for(key)
        door = self

        class AsgiClient:
            def get(self, path: str):
                headers = {"Authorization": f"Bearer {key}"} if key else {}
                return asgi_request("GET", path, headers=headers)

            def post(self, *args, **kwargs):
                return client_for(key).post(*args, **kwargs)

        assert door.via == "asgi"
        return AsgiClient()


@pytest.fixture(params=["drf", "asgi"])
def door(request: pytest.FixtureRequest) -> Door:
    return Door(request.param)


@pytest.fixture
def api(owner, door):
    """The owner's client through the test's front door (registrations always go through the API)."""
    return door.client(owner[1])


def register(api, sid, **extra):
    assert (
        api.post("/api/v1/services/", service_body(sid, service_name="sink", **extra), format="json").status_code == 201
    )


def select(api, query: str):
    return api.get(f"/api/v1/balancer/select/?name=sink{query}")


def test_round_robin_is_one_sequence_across_clients(api, owner, make_token, door):
    for sid in ("a", "b", "c"):
        register(api, sid)
    other = door.client(make_token("other")[1])
    chosen = [select(client, "").json()["service_id"] for client in [api, other] * 15]
    assert chosen == ["a", "b", "c"] * 10  # two clients on separate connections share one rotation


def test_weighted_exact_counts_and_nginx_sequence(api):
    register(api, "a", weight=5)
    register(api, "b", weight=1)
    register(api, "c", weight=1)
    sequence = [select(api, "&strategy=weighted").json()["service_id"] for _ in range(7)]
    assert sequence == ["a", "a", "b", "a", "c", "a", "a"]
    assert Counter(select(api, "&strategy=weighted").json()["service_id"] for _ in range(70)) == {
        "a": 50,
        "b": 10,
        "c": 10,
    }


def test_hash_maps_a_key_to_the_same_instance(api):
    for sid in ("a", "b", "c", "d"):
        register(api, sid)
    first = select(api, "&strategy=hash&key=customer-42").json()["service_id"]
    assert {select(api, "&strategy=hash&key=customer-42").json()["service_id"] for _ in range(5)} == {first}


def test_selector_and_random(api):
    register(api, "a", labels={"zone": "x"})
    register(api, "b", labels={"zone": "y"})
    assert {select(api, "&strategy=random&selector=zone=y").json()["service_id"] for _ in range(10)} == {"b"}


def test_eligibility_drain_lapse_and_degraded(api, owner):
    t0 = datetime(2026, 9, 1, tzinfo=UTC)
    with time_machine.travel(t0, tick=False) as clock:
        register(api, "a", weight=0)
        register(api, "b", lease_duration=5)
        register(api, "c", health="degraded", lease_duration=60)
        assert {select(api, "").json()["service_id"] for _ in range(6)} == {"b"}  # degraded only as a fallback
        clock.move_to(t0 + timedelta(seconds=6))  # b's lease lapsed: unhealthy
        assert {select(api, "").json()["service_id"] for _ in range(4)} == {"c"}
        client_for(owner[1]).post("/api/v1/services/c/heartbeat/", {"health": "unhealthy"}, format="json")
        response = select(api, "")
        assert response.status_code == 503
        assert "no healthy or degraded instance" in response.json()["detail"]


@pytest.mark.parametrize(
    ("query", "status", "field"),
    [
        ("?name=sink&strategy=fastest", 400, "strategy"),
        ("?name=sink&strategy=hash", 400, "key"),
        ("?strategy=round_robin", 400, "name"),
        ("?name=bad%20name", 400, "name"),
        ("?name=sink&selector=novalue", 400, "selector"),
    ],
)
def test_bad_queries_are_400_naming_the_parameter(api, query, status, field):
    register(api, "a")
    response = api.get(f"/api/v1/balancer/select/{query}")
    assert response.status_code == status
    assert list(response.json()) == [field]


def test_a_name_never_registered_is_404(api):
    response = api.get("/api/v1/balancer/select/?name=nobody")
    assert response.status_code == 404
    assert "nobody" in response.json()["detail"]


def test_select_needs_a_token(db, door):
    response = door.client(None).get("/api/v1/balancer/select/?name=sink")
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="api"'
    assert response.json() == {"detail": "Authentication credentials were not provided."}


def test_an_unknown_token_is_401(db, door):
    response = door.client("cr_not-a-token").get("/api/v1/balancer/select/?name=sink")
    assert response.status_code == 401
    assert response.json() == {"detail": "Invalid token."}


@pytest.mark.django_db(transaction=True)
def test_two_server_processes_alternating_produce_one_round_robin_sequence(servers, owner):
    import httpx

    key = owner[1]
    api = client_for(key)
    for sid in ("a", "b", "c", "d"):
        register(api, sid)
    clients = [httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}) for url in servers]
    chosen = [clients[n % 2].get("/api/v1/balancer/select/?name=sink").json()["service_id"] for n in range(20)]
    assert chosen == ["a", "b", "c", "d"] * 5
    weighted = [
        clients[n % 2].get("/api/v1/balancer/select/?name=sink&strategy=weighted").json()["service_id"]
        for n in range(8)
    ]
    assert Counter(weighted) == {"a": 2, "b": 2, "c": 2, "d": 2}


def test_a_revoked_token_stops_selecting_at_once(api, owner):
    register(api, "a")
    assert select(api, "").status_code == 200  # the token is in the token cache now
    token = owner[0]
    token.is_active = False
    token.save()
    response = select(api, "")
    assert response.status_code == 401
    assert response.json() == {"detail": "Invalid token."}


def test_with_a_request_rate_set_selects_go_through_the_view_and_its_throttle(owner, settings):
    # given: a rate of 2 requests per minute per token, which only the DRF view counts
    settings.REGISTRY_THROTTLE_RATE = (2, 60)
    client_for(owner[1]).post("/api/v1/services/", service_body("a", service_name="sink"), format="json")
    answers = [
        asgi_request("GET", "/api/v1/balancer/select/?name=sink", headers={"Authorization": f"Bearer {owner[1]}"})
        for _ in range(3)
    ]
    assert [r.status_code for r in answers] == [200, 429, 429]  # the registration counted too
    assert all("Vary" in r.headers for r in answers)  # Django answered


def test_a_repeated_query_gets_the_same_answers_each_time(api, db, door):
    # The fast path remembers what a query string reads as: a second sight must answer as the first did.
    register(api, "a")
    for _ in range(2):
        response = api.get("/api/v1/balancer/select/?name=sink&strategy=fastest")
        assert (response.status_code, list(response.json())) == (400, ["strategy"])
        bad_token = door.client("cr_not-a-token").get("/api/v1/balancer/select/?name=sink&strategy=fastest")
        assert (bad_token.status_code, bad_token.json()) == (401, {"detail": "Invalid token."})
        no_token = door.client(None).get("/api/v1/balancer/select/?name=sink&strategy=fastest")
        assert no_token.status_code == 401
        assert api.get("/api/v1/balancer/select/?name=sink&format=json").json()["service_id"] == "a"
        assert api.get("/api/v1/balancer/select/?name=sink").json()["service_id"] == "a"
        assert api.get("/api/v1/balancer/select/?name=sink&strategy=hash&key=k").json()["service_id"] == "a"


def test_the_lease_shown_follows_each_heartbeat(api, owner):
    # The lease fields of an answer are worked out once per deadline: a heartbeat must show at once.
    t0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    with time_machine.travel(t0, tick=False) as clock:
        register(api, "a", lease_duration=30)
        first = select(api, "").json()
        assert select(api, "").json() == first
        clock.move_to(t0 + timedelta(seconds=7))
        client_for(owner[1]).post("/api/v1/services/a/heartbeat/", {}, format="json")
        later = select(api, "").json()
        assert later["lease_expires_at"] == "2026-03-01T12:00:37Z"
        assert later["last_heartbeat"] == "2026-03-01T12:00:07Z"
        assert first["lease_expires_at"] == "2026-03-01T12:00:30Z"
        assert {k: v for k, v in later.items() if k not in ("lease_expires_at", "last_heartbeat")} == {
            k: v for k, v in first.items() if k not in ("lease_expires_at", "last_heartbeat")
        }
