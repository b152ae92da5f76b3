"""Hostile input on every door a client has (REST bodies, query parameters, path ids, the heartbeat fast
path, websocket paths and messages): each is a 400 (or a websocket error and close code) naming the field,
and nothing is written to the database or to Redis."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from channels.testing.websocket import WebsocketCommunicator
from rest_framework.test import APIClient

from groups.models import GroupMember, ServiceGroup, Topic
from registry.models import Service, ServiceLabel
from registry.redis_client import get_redis
from registry_project.asgi import application
from registry_project.limits import MAX_JSON_DEPTH
from tests.conftest import asgi_request, service_body

pytestmark = pytest.mark.django_db(transaction=True)

# Path segments that are not identifiers, percent-encoded as a client would send them.
BAD_PATH_IDS = {
    "newline": "svc-1%0A",
    "nul": "svc%00",
    "space": "svc%201",
    "surrogate-bytes": "%ED%A0%80",
    "129 chars": "x" * 129,
}
# Past the interpreter's recursion limit, and under every size cap (the fast path's 64 KiB included).
DEEP = b"[" * 20_000 + b"]" * 20_000
JUST_TOO_DEEP = b'{"a":' * (MAX_JSON_DEPTH + 1) + b"1" + b"}" * (MAX_JSON_DEPTH + 1)  # past the bound only


def state() -> dict[str, Any]:
    """Everything a request could have written: table contents and every Redis key with its value."""
    r = get_redis()
    return {
        "services": sorted(Service.objects.values_list("service_id", "service_name", "endpoint", "health", "weight")),
        "labels": sorted(ServiceLabel.objects.values_list("service_id", "key", "value")),
        "topics": sorted(Topic.objects.values_list("name", "partitions")),
        "groups": sorted(ServiceGroup.objects.values_list("group_id", "generation", "version")),
        "members": sorted(GroupMember.objects.values_list("group_id", "member_id", "acked_generation")),
        "redis": {key: r.dump(key) for key in r.keys("*")},
    }


@pytest.fixture
def world(owner: Any) -> Iterator[str]:
    """A registered service svc-1, topic orders and member g1/m1; yields the token key."""
    key = owner[1]
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    assert client.post("/api/v1/services/", service_body(), format="json").status_code == 201
    joined = client.post(
        "/api/v1/groups/g1/members/", {"member_id": "m1", "service_name": "c", "topics": ["orders"]}, format="json"
    )
    assert joined.status_code == 201
    yield key


def send(key: str, method: str, path: str, body: bytes | None = None) -> tuple[int, Any]:
    """One request through the whole ASGI application (body cap, fast path, Django)."""
    headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    response = asgi_request(method, path, content=body, headers=headers)
    assert response.headers["content-type"].startswith("application/json"), response.text[:200]
    return response.status_code, response.json()


def raw_json(value: Any) -> bytes:
    # ensure_ascii: a lone surrogate travels as the escape "\ud800", as a client's JSON library sends it.
    return json.dumps(value, ensure_ascii=True).encode()


def assert_refused(key: str, method: str, path: str, body: bytes | None, field: str, fragment: str = "") -> None:
    before = state()
    status, answer = send(key, method, path, body)
    assert status == 400, answer
    assert field in answer, answer
    assert fragment in json.dumps(answer), answer
    assert state() == before


# --- REST bodies -----------------------------------------------------------------------------------------

REGISTER_CASES = {
    "port in superscript digits": ("endpoint", "h:\u00b2", "port 1..65535"),
    "port in Arabic-Indic digits": ("endpoint", "h:\u0663\u0663", "port 1..65535"),
    "port of 5,000 digits": ("endpoint", "h:" + "9" * 5000, "port 1..65535"),
    "port with a trailing newline": ("endpoint", "10.0.0.1:80\n", "port 1..65535"),
    "host with a newline": ("endpoint", "a\n:80", "U+000A"),
    "host not a DNS name": ("endpoint", "a_b:80", "DNS name"),
    "endpoint with NUL": ("endpoint", "a\x00b:80", "U+0000"),
    "endpoint with a lone surrogate": ("endpoint", "\ud800:80", "surrogate"),
    "service_id with a trailing newline": ("service_id", "svc-9\n", "[A-Za-z0-9._:-]"),
    "service_id with NUL": ("service_id", "svc\x00", "[A-Za-z0-9._:-]"),
    "service_id a lone surrogate": ("service_id", "\udfff", "[A-Za-z0-9._:-]"),
    "service_name with a trailing newline": ("service_name", "name\n", "[A-Za-z0-9._:-]"),
    "group_id with a trailing newline": ("group_id", "g\n", "[A-Za-z0-9._:-]"),
    "label value a lone surrogate": ("labels", {"env": "\ud800"}, "surrogate"),
    "label key a lone surrogate": ("labels", {"\ud800": "v"}, "surrogate"),
    "label key with NUL": ("labels", {"e\x00nv": "v"}, "U+0000"),
    "label value with NUL": ("labels", {"env": "pr\x00od"}, "U+0000"),
    "label key with a comma": ("labels", {"a,b": "v"}, "no selector"),
    "label key with '='": ("labels", {"a=b": "v"}, "no selector"),
    "label value with a comma": ("labels", {"env": "a,b"}, "no selector"),
    "label key with outer whitespace": ("labels", {" env": "v"}, "whitespace"),
    "weight of 5,000 digits": ("weight", "9" * 5000, ""),
    "lease_duration past 64 bits": ("lease_duration", 2**70, "3600"),
    # the 400 echoes the value: it must still be encodable as JSON
    "service_type a lone surrogate": ("service_type", "\ud800", "not a valid choice"),
    "health a lone surrogate": ("health", "\udc00", "not a valid choice"),
}


@pytest.mark.parametrize(("field", "value", "fragment"), REGISTER_CASES.values(), ids=REGISTER_CASES.keys())
def test_registration_refuses_hostile_values_naming_the_field(world, field, value, fragment):
    body = {**service_body("svc-9"), field: value}
    assert_refused(world, "POST", "/api/v1/services/", raw_json(body), field, fragment)


JOIN_CASES = {
    "member_id with a trailing newline": ("member_id", "m2\n"),
    "member_id a lone surrogate": ("member_id", "\ud800"),
    "service_name with NUL": ("service_name", "c\x00"),
    "a topic with a trailing newline": ("topics", ["orders\n"]),
    "topics as a string": ("topics", "orders"),
    "session_timeout of 5,000 digits": ("session_timeout", "9" * 5000),
}


@pytest.mark.parametrize(("field", "value"), JOIN_CASES.values(), ids=JOIN_CASES.keys())
def test_a_join_refuses_hostile_values_naming_the_field(world, field, value):
    body = {"member_id": "m2", "service_name": "c", "topics": ["orders"], field: value}
    assert_refused(world, "POST", "/api/v1/groups/g1/members/", raw_json(body), field)


@pytest.mark.parametrize("generation", [2**63, 10**40, "9" * 5000, -1, True], ids=str)
def test_a_member_heartbeat_refuses_generations_no_column_can_hold(world, generation):
    body = raw_json({"generation": generation, "member_epoch": 1})
    assert_refused(world, "POST", "/api/v1/groups/g1/members/m1/heartbeat/", body, "generation")


@pytest.mark.parametrize("member_epoch", [2**63, 10**40, "9" * 5000, 0, -1, True], ids=str)
def test_a_member_heartbeat_refuses_epochs_no_column_can_hold(world, member_epoch):
    body = raw_json({"generation": 0, "member_epoch": member_epoch})
    assert_refused(world, "POST", "/api/v1/groups/g1/members/m1/heartbeat/", body, "member_epoch")


@pytest.mark.parametrize("partitions", [10**30, "9" * 5000, 0], ids=str)
def test_a_topic_put_refuses_partition_counts_out_of_range(world, partitions):
    assert_refused(world, "PUT", "/api/v1/topics/orders/", raw_json({"partitions": partitions}), "partitions")


JSON_ENDPOINTS = [
    ("POST", "/api/v1/services/"),
    ("POST", "/api/v1/services/svc-1/heartbeat/"),  # the fast path
    ("POST", "/api/v1/groups/g1/members/"),
    ("POST", "/api/v1/groups/g1/members/m1/heartbeat/"),
    ("PUT", "/api/v1/topics/orders/"),
]


@pytest.mark.parametrize("body", [DEEP, JUST_TOO_DEEP], ids=["20000 deep", f"{MAX_JSON_DEPTH + 1} deep"])
@pytest.mark.parametrize(("method", "path"), JSON_ENDPOINTS)
def test_deeply_nested_json_is_a_400_on_every_json_endpoint(world, method, path, body):
    assert_refused(world, method, path, body, "detail", f"nested deeper than {MAX_JSON_DEPTH} levels")


@pytest.mark.parametrize("body", [DEEP, JUST_TOO_DEEP, b'{"health": NaN}'], ids=["deep", "just too deep", "NaN"])
def test_the_heartbeat_view_parses_like_the_fast_path(world, body):
    # The DRF view, reached without the ASGI fast path in front of it.
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {world}")
    before = state()
    response = client.generic("POST", "/api/v1/services/svc-1/heartbeat/", body, content_type="application/json")
    assert response.status_code == 400
    assert "JSON parse error" in response.json()["detail"]
    assert state() == before


HOSTILE_VALUES = [
    "\ud800",
    "\x00",
    "a\n",
    "9" * 5000,
    2**64,
    -(2**64),
    1.5,
    1e308,
    True,
    None,
    [],
    {},
    [[[]]],
    {"a": {"b": {}}},
    "",
    " ",
    "é" * 300,
    "x" * 70_000,
]
VALID_BODIES = {
    ("POST", "/api/v1/services/"): service_body("svc-2", group_id="g", lease_duration=5, weight=1, health="healthy"),
    ("POST", "/api/v1/services/svc-1/heartbeat/"): {"health": "healthy"},
    ("POST", "/api/v1/groups/g1/members/"): {"member_id": "m2", "service_name": "c", "topics": ["orders"]},
    ("POST", "/api/v1/groups/g1/members/m1/heartbeat/"): {"generation": 0, "member_epoch": 1},
    ("PUT", "/api/v1/topics/orders/"): {"partitions": 20},
}


@pytest.mark.parametrize(("method", "path"), VALID_BODIES.keys())
def test_no_value_in_any_field_of_any_body_is_a_server_error(world, method, path):
    body = VALID_BODIES[(method, path)]
    answers = {}
    for field in [*body, "labels"] if path == "/api/v1/services/" else body:
        for value in HOSTILE_VALUES:
            for sent in [value, {"k": value}, [value]]:
                answers[(field, repr(sent)[:40])] = send(world, method, path, raw_json({**body, field: sent}))[0]
    assert {k: s for k, s in answers.items() if s >= 500} == {}
    assert 400 in answers.values()


# --- query parameters ------------------------------------------------------------------------------------

QUERY_CASES = {
    "name with a trailing newline": ("/api/v1/services/?name=kafka-source%0A", "name"),
    "name from surrogate bytes": ("/api/v1/services/?name=%ED%A0%80", "name"),
    "group_id with NUL": ("/api/v1/services/?group_id=g%00", "group_id"),
    "selector with NUL": ("/api/v1/services/?selector=env%3Dprod%00", "selector"),
    "selector with a newline": ("/api/v1/services/?selector=env%3Dprod%0A", "selector"),
    "selector key with NUL": ("/api/v1/services/?selector=e%00nv%3Dprod", "selector"),
    "selector without '='": ("/api/v1/services/?selector=env", "selector"),
    "type unknown": ("/api/v1/services/?type=%00", "type"),
    "health unknown": ("/api/v1/services/?health=sick", "health"),
    "select: name with NUL": ("/api/v1/balancer/select/?name=kafka-source%00", "name"),
    "select: strategy unknown": ("/api/v1/balancer/select/?name=kafka-source&strategy=%ED%A0%80", "strategy"),
    "select: selector with NUL": ("/api/v1/balancer/select/?name=kafka-source&selector=env%3D%00", "selector"),
    "select: key with NUL": ("/api/v1/balancer/select/?name=kafka-source&strategy=hash&key=a%00", "key"),
    "select: key too long": ("/api/v1/balancer/select/?name=kafka-source&strategy=hash&key=" + "k" * 1025, "key"),
}


@pytest.mark.parametrize(("path", "field"), QUERY_CASES.values(), ids=QUERY_CASES.keys())
def test_query_parameters_are_checked_naming_the_parameter(world, path, field):
    assert_refused(world, "GET", path, None, field)


@pytest.mark.parametrize("page", ["0", "abc", "9" * 5000, "%00"])
def test_a_page_that_does_not_exist_is_a_json_404(world, page):
    # DRF's documented answer for a page out of range or not a number (not a 500 from int()).
    status, answer = send(world, "GET", f"/api/v1/services/?page={page}", None)
    assert (status, answer) == (404, {"detail": "Invalid page."})


def test_an_unusable_page_size_falls_back_to_the_default(world):
    status, answer = send(world, "GET", "/api/v1/services/?page_size=" + "9" * 5000, None)
    assert status == 200
    assert [s["service_id"] for s in answer["results"]] == ["svc-1"]


# --- path ids --------------------------------------------------------------------------------------------

PATH_CASES = [
    ("GET", "/api/v1/services/{}/", "service_id"),
    ("DELETE", "/api/v1/services/{}/", "service_id"),
    ("POST", "/api/v1/services/{}/heartbeat/", "service_id"),  # the fast path
    ("GET", "/api/v1/topics/{}/", "name"),
    ("PUT", "/api/v1/topics/{}/", "name"),
    ("GET", "/api/v1/groups/{}/", "group_id"),
    ("POST", "/api/v1/groups/{}/members/", "group_id"),
    ("GET", "/api/v1/groups/g1/members/{}/", "member_id"),
    ("DELETE", "/api/v1/groups/g1/members/{}/", "member_id"),
    ("POST", "/api/v1/groups/g1/members/{}/heartbeat/", "member_id"),
    ("POST", "/api/v1/groups/{}/members/m1/heartbeat/", "group_id"),
]


@pytest.mark.parametrize("bad", BAD_PATH_IDS.values(), ids=BAD_PATH_IDS.keys())
@pytest.mark.parametrize(("method", "route", "field"), PATH_CASES, ids=[f"{m} {r}" for m, r, _ in PATH_CASES])
def test_a_path_id_that_is_not_an_identifier_is_a_400_naming_it(world, method, route, field, bad):
    bodies = {"PUT": {"partitions": 3}, "POST": {"generation": 0, "member_id": "m2", "service_name": "c"}}
    body = raw_json({**bodies.get(method, {}), "topics": ["orders"]}) if method in bodies else None
    assert_refused(world, method, route.format(bad), body, field, "[A-Za-z0-9._:-]")


def test_the_heartbeat_view_checks_the_path_id_like_the_fast_path(world):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {world}")
    before = state()
    response = client.post("/api/v1/services/svc-1%0A/heartbeat/")
    assert response.status_code == 400
    assert "service_id" in response.json()
    assert state() == before


# --- websockets ------------------------------------------------------------------------------------------


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    async_to_sync(scenario)()


async def refused(path: str, key: str) -> tuple[dict[str, Any], int]:
    """Connect to ``path``; return the error message sent and the close code."""
    communicator = WebsocketCommunicator(application, path + ("&" if "?" in path else "?") + f"token={key}")
    ok, _ = await communicator.connect(timeout=5)
    assert ok
    message = await communicator.receive_json_from(timeout=5)
    closing = await communicator.receive_output(timeout=5)
    assert closing["type"] == "websocket.close"
    return message, closing["code"]


WS_PATHS = {
    "unknown path": ("/ws/nothing-here/", 4404, None),
    "unknown path under a stream": ("/ws/groups/g1/extra/", 4404, None),
    "root": ("/", 4404, None),
    "group_id with a newline": ("/ws/groups/g1%0A/", 4400, "group_id"),
    "group_id too long": ("/ws/groups/" + "g" * 129 + "/", 4400, "group_id"),
    "member_id with NUL": ("/ws/groups/g1/members/m1%00/?member_epoch=1", 4400, "member_id"),
    "no member_epoch": ("/ws/groups/g1/members/m1/", 4400, "member_epoch"),
    "member_epoch of 5,000 digits": ("/ws/groups/g1/members/m1/?member_epoch=" + "9" * 5000, 4400, "member_epoch"),
    "member_epoch 0": ("/ws/groups/g1/members/m1/?member_epoch=0", 4400, "member_epoch"),
    "watched name with a newline": ("/ws/services/?name=kafka-source%0A", 4400, "name"),
}


@pytest.mark.parametrize(("path", "code", "field"), WS_PATHS.values(), ids=WS_PATHS.keys())
def test_a_websocket_to_a_bad_path_gets_an_error_and_a_close_code(world, path, code, field):
    before = state()

    async def scenario() -> None:
        message, closed_with = await refused(path, world)
        assert message["type"] == "error"
        assert closed_with == code
        if field is None:
            assert "no websocket stream" in message["detail"]
        else:
            assert message["field"] == field and field in message["detail"]

    run(scenario)
    assert state() == before


async def member_socket(key: str) -> WebsocketCommunicator:
    communicator = WebsocketCommunicator(application, f"/ws/groups/g1/members/m1/?member_epoch=1&token={key}")
    ok, _ = await communicator.connect(timeout=5)
    assert ok
    assert (await communicator.receive_json_from(timeout=5))["type"] == "member.assignment"
    return communicator


WS_MESSAGES = {
    "20000 deep": (DEEP.decode(), f"nested deeper than {MAX_JSON_DEPTH} levels"),
    "just too deep": (JUST_TOO_DEEP.decode(), f"nested deeper than {MAX_JSON_DEPTH} levels"),
    "NaN": ('{"type": "ack", "generation": NaN}', "NaN"),
    "generation past 64 bits": (json.dumps({"type": "ack", "generation": 2**63}), "generation"),
    "generation a string": (json.dumps({"type": "ack", "generation": "1"}), "generation"),
    "type a lone surrogate": ('{"type": "\\ud800"}', "unknown message type"),
}


@pytest.mark.parametrize(("text", "fragment"), WS_MESSAGES.values(), ids=WS_MESSAGES.keys())
def test_a_hostile_websocket_message_gets_an_error_and_the_socket_carries_on(world, text, fragment):
    before = state()

    async def scenario() -> None:
        communicator = await member_socket(world)
        await communicator.send_to(text_data=text)
        error = await communicator.receive_json_from(timeout=5)
        assert error["type"] == "error" and fragment in error["detail"]
        # still open and still answering
        await communicator.send_to(text_data='{"type": "ping"}')
        assert "unknown message type" in (await communicator.receive_json_from(timeout=5))["detail"]
        await communicator.disconnect()

    run(scenario)
    assert state() == before
