"""The /services/ API: success bodies, every validation rule, auth, ownership and pagination."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import time_machine

from registry.models import Service, ServiceLabel
from tests.conftest import client_for, service_body

pytestmark = pytest.mark.django_db

T0 = datetime(2026, 3, 1, 8, 0, 0, tzinfo=UTC)


def test_register_returns_the_service_and_its_lease(api):
    with time_machine.travel(T0, tick=False):
        response = api.post(
            "/api/v1/services/",
            service_body(group_id="g1", lease_duration=30, deregister_after=90, weight=7, health="degraded"),
            format="json",
        )
    assert response.status_code == 201
    assert response.json() == {
        "service_id": "svc-1",
        "service_name": "kafka-source",
        "service_type": "source",
        "endpoint": "10.0.0.1:50051",
        "labels": {"env": "prod", "zone": "a"},
        "health": "degraded",
        "reported_health": "degraded",
        "group_id": "g1",
        "weight": 7,
        "drained": False,
        "operator_weight": None,
        "registered_at": "2026-03-01T08:00:00Z",
        "last_heartbeat": "2026-03-01T08:00:00Z",
        "lease_duration": 30,
        "deregister_after": 90,
        "lease_expires_at": "2026-03-01T08:00:30Z",
        "owner": "owner",
        "lease": {"duration": 30, "heartbeat_interval": 10, "expires_at": "2026-03-01T08:00:30Z"},
    }


def test_register_applies_defaults(api):
    body = api.post("/api/v1/services/", service_body(labels=None) | {"labels": {}}, format="json").json()
    assert (body["lease_duration"], body["deregister_after"], body["weight"], body["health"], body["group_id"]) == (
        30,
        60,
        100,
        "healthy",
        None,
    )
    assert body["lease"]["heartbeat_interval"] == 10


def test_reregistering_is_idempotent_and_replaces_fields(api):
    with time_machine.travel(T0, tick=False) as clock:
        assert api.post("/api/v1/services/", service_body(), format="json").status_code == 201
        clock.shift(5)
        again = api.post(
            "/api/v1/services/", service_body(endpoint="db.internal:9000", labels={"env": "dev"}), format="json"
        )
    assert again.status_code == 200
    body = again.json()
    assert body["endpoint"] == "db.internal:9000"
    assert body["labels"] == {"env": "dev"}
    assert body["registered_at"] == "2026-03-01T08:00:00Z"
    assert body["lease_expires_at"] == "2026-03-01T08:00:35Z"
    assert Service.objects.count() == 1
    assert list(ServiceLabel.objects.values_list("key", "value")) == [("env", "dev")]


def test_get_one_service(api):
    api.post("/api/v1/services/", service_body(), format="json")
    body = api.get("/api/v1/services/svc-1/").json()
    assert body["service_id"] == "svc-1"
    assert body["health"] == "healthy"
    assert body["labels"] == {"env": "prod", "zone": "a"}
    assert api.get("/api/v1/services/nope/").status_code == 404


def test_list_filters_by_name_type_group_health_and_selector(api):
    api.post("/api/v1/services/", service_body("a", group_id="g1"), format="json")
    api.post(
        "/api/v1/services/", service_body("b", service_type="sink", labels={"env": "dev", "zone": "a"}), format="json"
    )
    api.post("/api/v1/services/", service_body("c", service_name="other", health="degraded"), format="json")

    def ids(query: str) -> list[str]:
        response = api.get(f"/api/v1/services/{query}")
        assert response.status_code == 200, response.content
        return [s["service_id"] for s in response.json()["results"]]

    assert ids("?name=kafka-source") == ["a", "b"]
    assert ids("?type=sink") == ["b"]
    assert ids("?group_id=g1") == ["a"]
    assert ids("?health=degraded") == ["c"]
    assert ids("?selector=env=prod") == ["a", "c"]
    assert ids("?selector=env=prod,zone=a") == ["a", "c"]
    assert ids("?selector=zone=a,env=dev") == ["b"]
    assert ids("?selector=env=prod&name=other") == ["c"]


def test_list_is_paginated(api):
    for i in range(5):
        api.post("/api/v1/services/", service_body(f"s{i}"), format="json")
    page = api.get("/api/v1/services/?page_size=2").json()
    assert page["count"] == 5
    assert [s["service_id"] for s in page["results"]] == ["s0", "s1"]
    assert page["previous"] is None
    assert "page=2" in page["next"]
    last = api.get("/api/v1/services/?page_size=2&page=3").json()
    assert [s["service_id"] for s in last["results"]] == ["s4"]
    assert last["next"] is None


def test_deregister(api, heartbeat, owner):
    api.post("/api/v1/services/", service_body(), format="json")
    assert api.delete("/api/v1/services/svc-1/").status_code == 204
    assert api.get("/api/v1/services/svc-1/").status_code == 404
    assert api.delete("/api/v1/services/svc-1/").status_code == 404
    assert heartbeat("svc-1", owner[1])[0] == 404


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("service_id", "", "may not be blank"),
        ("service_id", "has space", "1..128"),
        ("service_id", "x" * 129, "1..128"),
        ("service_id", "slash/id", "1..128"),
        ("service_name", "bad*name", "1..128"),
        ("service_type", "router", "not a valid choice"),
        ("endpoint", "10.0.0.1", "host:port"),
        ("endpoint", "10.0.0.1:0", "host:port"),
        ("endpoint", "10.0.0.1:65536", "host:port"),
        ("endpoint", "host:port", "host:port"),
        ("endpoint", "::1:80", "[IPv6]"),
        ("endpoint", "[::zz]:80", "[IPv6]"),
        ("endpoint", "999.1.1.1:80", "IPv4"),
        ("endpoint", "-bad-.example:80", "DNS name"),
        ("labels", {"k": 1}, "values must be strings"),
        ("labels", {"": "v"}, "1..63"),
        ("labels", {"k" * 64: "v"}, "1..63"),
        ("labels", {"k": "v" * 257}, "at most 256"),
        ("labels", {f"k{i}": "v" for i in range(65)}, "at most 64"),
        ("labels", ["a"], "object"),
        ("group_id", "bad group", "1..128"),
        ("lease_duration", 0, "greater than or equal to 1"),
        ("lease_duration", 3601, "less than or equal to 3600"),
        ("lease_duration", "abc", "valid integer"),
        ("deregister_after", -1, "greater than or equal to 0"),
        ("deregister_after", 86401, "less than or equal to 86400"),
        ("weight", -1, "greater than or equal to 0"),
        ("weight", 1001, "less than or equal to 1000"),
        ("health", "sick", "not a valid choice"),
    ],
)
def test_register_rejects_bad_values_naming_the_field(api, field, value, fragment):
    response = api.post("/api/v1/services/", service_body(**{field: value}), format="json")
    assert response.status_code == 400
    errors = response.json()
    assert list(errors) == [field]
    assert fragment in " ".join(errors[field])
    assert not Service.objects.exists()


@pytest.mark.parametrize("field", ["service_id", "service_name", "service_type", "endpoint"])
def test_register_requires_the_core_fields(api, field):
    body = service_body()
    del body[field]
    response = api.post("/api/v1/services/", body, format="json")
    assert response.status_code == 400
    assert response.json() == {field: ["This field is required."]}


def test_endpoint_accepts_dns_ipv4_and_ipv6(api):
    for i, endpoint in enumerate(["kafka-1.prod.example.com:9092", "127.0.0.1:1", "[2001:db8::1]:65535", "sink:80"]):
        assert api.post("/api/v1/services/", service_body(f"e{i}", endpoint=endpoint), format="json").status_code == 201


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("type=router", "type"),
        ("health=sick", "health"),
        ("selector=novalue", "selector"),
        ("selector==v", "selector"),
        ("name=bad name", "name"),
        ("group_id=a/b", "group_id"),
    ],
)
def test_list_rejects_bad_filters_naming_the_parameter(api, query, field):
    response = api.get(f"/api/v1/services/?{query}")
    assert response.status_code == 400
    assert list(response.json()) == [field]


def test_malformed_json_is_a_400_not_a_500(api):
    response = api.generic("POST", "/api/v1/services/", b"{not json", content_type="application/json")
    assert response.status_code == 400
    assert "JSON parse error" in response.json()["detail"]


def test_requests_without_a_token_get_401(db):
    anonymous = client_for(None)
    assert anonymous.get("/api/v1/services/").status_code == 401
    assert anonymous.post("/api/v1/services/", service_body(), format="json").status_code == 401
    assert anonymous.delete("/api/v1/services/svc-1/").status_code == 401
    bad = client_for("cr_not-a-real-token")
    response = bad.get("/api/v1/services/")
    assert response.status_code == 401
    assert response["WWW-Authenticate"] == 'Bearer realm="api"'


def test_token_scheme_is_accepted_too(owner):
    client = client_for(None)
    client.credentials(HTTP_AUTHORIZATION=f"Token {owner[1]}")
    assert client.get("/api/v1/services/").status_code == 200


def test_inactive_token_is_refused(owner):
    token, key = owner
    token.is_active = False
    token.save()
    assert client_for(key).get("/api/v1/services/").status_code == 401


def test_another_owners_service_is_403_and_unchanged(api, make_token, heartbeat):
    api.post("/api/v1/services/", service_body(), format="json")
    _, other_key = make_token("intruder")
    other = client_for(other_key)

    takeover = other.post("/api/v1/services/", service_body(endpoint="evil.example:1"), format="json")
    assert takeover.status_code == 403
    assert other.delete("/api/v1/services/svc-1/").status_code == 403
    assert heartbeat("svc-1", other_key, {"health": "unhealthy"})[0] == 403
    service = Service.objects.get()
    assert (service.endpoint, service.health, service.owner.name) == ("10.0.0.1:50051", "healthy", "owner")
    # reading is allowed to every token: discovery is the point
    assert other.get("/api/v1/services/svc-1/").status_code == 200


def test_staff_token_may_change_any_service(api, make_token, heartbeat):
    api.post("/api/v1/services/", service_body(), format="json")
    _, staff_key = make_token("ops", staff=True)
    staff = client_for(staff_key)
    response = staff.post("/api/v1/services/", service_body(weight=0), format="json")
    assert response.status_code == 200
    assert response.json()["owner"] == "owner"  # the owner does not change hands
    assert heartbeat("svc-1", staff_key, {"health": "degraded"})[0] == 200
    assert staff.delete("/api/v1/services/svc-1/").status_code == 204


def test_an_unreachable_lease_store_is_a_503_and_nothing_is_written(api, owner, settings):
    from registry.redis_client import reset_clients

    settings.REDIS_URL = "redis://127.0.0.1:1/0"
    reset_clients()
    try:
        response = api.post("/api/v1/services/", service_body(), format="json")
        beat = client_for(owner[1]).post("/api/v1/services/svc-1/heartbeat/")
    finally:
        reset_clients()
    assert response.status_code == 503
    assert response.json() == {"detail": "Lease store unavailable; retry shortly."}
    assert beat.status_code == 503
    assert not Service.objects.exists()
    assert not ServiceLabel.objects.exists()
