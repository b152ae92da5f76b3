"""The OpenAPI schema at /api/schema/: every REST operation with its real responses, the bearer scheme,
labels as an object, identifier patterns; and the server answering as the schema says."""

from __future__ import annotations

import io
import re

import pytest
from django.core.management import call_command
from django.test import Client

from registry import validators
from tests.conftest import client_for, service_body

pytestmark = pytest.mark.django_db

# DESIGN.md's REST table: every row, with the statuses each operation really answers. Every REST
# operation may answer 429 (when REGISTRY_THROTTLE_RATE is set); the heartbeat, served by the fast
# path, is never throttled. A bad identifier in a path is a 400 naming it (registry.path_ids).
PATH_ID = {"400", "404"}
BODY = {"400", "413", "415"}
TABLE = {
    ("post", "/api/v1/services/"): {"200", "201", "401", "403", "429", "503", *BODY},
    ("get", "/api/v1/services/"): {"200", "400", "401", "404", "429", "503"},
    ("get", "/api/v1/services/{service_id}/"): {"200", "401", "429", "503", *PATH_ID},
    ("post", "/api/v1/services/{service_id}/heartbeat/"): {"200", "400", "401", "403", "404", "413", "503"},
    ("delete", "/api/v1/services/{service_id}/"): {"204", "401", "403", "429", "503", *PATH_ID},
    ("post", "/api/v1/services/{service_id}/drain/"): {"200", "401", "403", "429", "503", *PATH_ID},
    ("post", "/api/v1/services/{service_id}/undrain/"): {"200", "401", "403", "429", "503", *PATH_ID},
    ("put", "/api/v1/topics/{name}/"): {"200", "201", "401", "403", "429", "503", *BODY, *PATH_ID},
    ("delete", "/api/v1/topics/{name}/"): {"204", "401", "403", "409", "429", "503", *PATH_ID},
    ("get", "/api/v1/topics/"): {"200", "401", "404", "429"},
    ("get", "/api/v1/topics/{name}/"): {"200", "401", "429", *PATH_ID},
    ("post", "/api/v1/groups/{group_id}/members/"): {"200", "201", "401", "403", "409", "429", "503", *BODY, *PATH_ID},
    ("get", "/api/v1/groups/"): {"200", "401", "404", "429", "503"},
    ("get", "/api/v1/groups/{group_id}/"): {"200", "401", "429", "503", *PATH_ID},
    ("get", "/api/v1/groups/{group_id}/members/{member_id}/"): {"200", "401", "429", "503", *PATH_ID},
    ("post", "/api/v1/groups/{group_id}/members/{member_id}/heartbeat/"): {
        "200",
        "401",
        "403",
        "409",
        "429",
        "503",
        *BODY,
        *PATH_ID,
    },
    ("delete", "/api/v1/groups/{group_id}/members/{member_id}/"): {"204", "401", "403", "409", "429", "503", *PATH_ID},
    ("get", "/api/v1/balancer/select/"): {"200", "400", "401", "404", "429", "503"},
    ("get", "/api/v1/leader/"): {"200", "401", "404", "429"},
}


@pytest.fixture(scope="module")
def schema(django_db_blocker: pytest.FixtureRequest) -> dict:
    with django_db_blocker.unblock():
        return Client().get("/api/schema/?format=json").json()


def _operations(schema: dict) -> dict[tuple[str, str], dict]:
    return {(method, path): op for path, ops in schema["paths"].items() for method, op in ops.items()}


def test_every_row_of_the_rest_table_is_documented_with_its_real_statuses(schema):
    operations = _operations(schema)
    assert set(operations) == set(TABLE)
    for key, statuses in TABLE.items():
        assert set(operations[key]["responses"]) == statuses, key


def test_error_responses_have_json_bodies(schema):
    for key, op in _operations(schema).items():
        for status, response in op["responses"].items():
            if status.startswith(("4", "5")):
                body = response["content"]["application/json"]["schema"]
                if "$ref" in body:  # a component of its own (Error, or one with more than a detail)
                    body = schema["components"]["schemas"][body["$ref"].rpartition("/")[2]]
                    assert "detail" in body["required"], (key, status)
                assert body["type"] == "object", (key, status)
    assert schema["components"]["schemas"]["Error"]["required"] == ["detail"]
    # a 409 says which conflict in a machine-readable code
    assert schema["components"]["schemas"]["Conflict"]["required"] == ["code", "detail"]


def test_every_operation_declares_the_bearer_scheme_and_only_it(schema):
    # the Swagger UI's Authorize button comes from this scheme
    scheme = schema["components"]["securitySchemes"]
    assert set(scheme) == {"bearerAuth"}
    assert (scheme["bearerAuth"]["type"], scheme["bearerAuth"]["scheme"]) == ("http", "bearer")
    for key, op in _operations(schema).items():
        # the heartbeat (served by the fast path, authenticated in its flow) included, and no
        # anonymous alternative ({}) anywhere
        assert op["security"] == [{"bearerAuth": []}], key


def test_labels_are_an_object_of_strings(schema):
    for component in ("RegisterRequest", "Service", "RegisteredService"):
        labels = schema["components"]["schemas"][component]["properties"]["labels"]
        assert labels["type"] == "object", component
        assert labels["additionalProperties"] == {"type": "string", "maxLength": validators.MAX_LABEL_VALUE}
        assert labels["maxProperties"] == validators.MAX_LABELS


def _identifier_schemas(schema: dict) -> list[tuple[str, dict]]:
    components = schema["components"]["schemas"]
    found = [
        ("RegisterRequest." + f, components["RegisterRequest"]["properties"][f])
        for f in ("service_id", "service_name", "group_id")
    ]
    join = components["JoinRequest"]["properties"]
    found += [("JoinRequest.member_id", join["member_id"]), ("JoinRequest.service_name", join["service_name"])]
    found.append(("JoinRequest.topics[]", join["topics"]["items"]))
    for (method, path), op in _operations(schema).items():
        for parameter in op.get("parameters", []):
            if parameter["in"] == "path" or parameter["name"] in {"name", "group_id"}:
                found.append((f"{method} {path} {parameter['name']}", parameter["schema"]))
    return found


def test_identifiers_carry_the_pattern_and_length_the_server_enforces(schema):
    found = _identifier_schemas(schema)
    assert len(found) >= 20
    for where, field in found:
        assert field["type"] == "string", where
        assert (field["minLength"], field["maxLength"]) == (1, 128), where
        assert field["pattern"] == r"^[A-Za-z0-9._:-]+$", where
    # the pattern agrees with the server's own rule on what it accepts and refuses
    pattern = re.compile(found[0][1]["pattern"])
    for value in ["svc-1", "a.b:c_d-E9", "x" * 128, "a b", "a/b", "é", "a,b", ""]:
        documented = bool(pattern.fullmatch(value)) and 1 <= len(value) <= 128
        assert documented == bool(validators.IDENTIFIER_RE.match(value)), value


def test_schema_generation_has_no_warnings():
    # a warning means a part of the API drf-spectacular had to guess (e.g. a field typed as string)
    call_command("spectacular", "--fail-on-warn", "--validate", stdout=io.StringIO(), stderr=io.StringIO())


def test_a_page_past_the_end_is_the_documented_404_with_a_json_body(api, schema):
    assert "404" in _operations(schema)[("get", "/api/v1/services/")]["responses"]
    for page in ("0", "2", "x"):
        response = api.get(f"/api/v1/services/?page={page}")
        assert response.status_code == 404, page
        assert response.json() == {"detail": "Invalid page."}


def test_a_path_that_matches_no_route_is_a_json_404(api, schema):
    # a bad identifier is the documented 400 naming it; a path no route knows is a JSON 404
    assert {"400", "404"} <= set(_operations(schema)[("get", "/api/v1/services/{service_id}/")]["responses"])
    bad_id = api.get(f"/api/v1/services/{'x' * 129}/")
    assert bad_id.status_code == 400 and "service_id" in bad_id.json()
    response = api.get("/api/v1/no-such-collection/")
    assert response.status_code == 404
    assert response["Content-Type"] == "application/json"
    assert response.json() == {"detail": "Not found."}
    # outside the API, Django's HTML page as before
    assert "text/html" in Client().get("/no-such-page/")["Content-Type"]


def test_a_body_that_is_not_json_is_the_documented_415(api, schema):
    assert "415" in _operations(schema)[("post", "/api/v1/services/")]["responses"]
    response = api.post("/api/v1/services/", "service_id=a", content_type="application/x-www-form-urlencoded")
    assert response.status_code == 415
    assert "detail" in response.json()
    # the schema offers JSON bodies only
    body = _operations(schema)[("post", "/api/v1/services/")]["requestBody"]["content"]
    assert set(body) == {"application/json"}


def test_labels_sent_as_the_schema_types_them_are_accepted(api, owner):
    # a generated client sends an object: it must be what the server wants
    response = api.post("/api/v1/services/", service_body("typed", labels={"env": "prod"}), format="json")
    assert response.status_code == 201
    assert response.json()["labels"] == {"env": "prod"}
    assert client_for(None).get("/api/v1/services/").status_code == 401


def test_assignments_document_version_and_heartbeat_answers_the_session_deadline(api, schema):
    components = schema["components"]["schemas"]
    for component in ("PartitionAssignment", "MemberHeartbeatReply", "Group"):
        assert components[component]["properties"]["version"]["type"] == "integer", component
        assert "version" in components[component]["required"], component
    reply = components["MemberHeartbeatReply"]
    assert reply["properties"]["session_expires_at"] == {
        "type": "string",
        "format": "date-time",
        "description": reply["properties"]["session_expires_at"]["description"],
    }
    assert "session_expires_at" in reply["required"]
    beat = _operations(schema)[("post", "/api/v1/groups/{group_id}/members/{member_id}/heartbeat/")]
    assert beat["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/MemberHeartbeatReply"
    }

    # and the server answers exactly the documented fields
    def documented(component: str) -> set[str]:
        return set(components[component]["properties"])

    joined = api.post(
        "/api/v1/groups/g1/members/", {"member_id": "m1", "service_name": "c", "topics": ["t"]}, format="json"
    ).json()
    assert set(joined) == documented("PartitionAssignment")
    answer = api.post("/api/v1/groups/g1/members/m1/heartbeat/", {"generation": 1, "member_epoch": 1}, format="json")
    assert set(answer.json()) == documented("MemberHeartbeatReply")
    group = api.get("/api/v1/groups/g1/").json()
    assert set(group) == documented("Group") and group["version"] == joined["version"]
    assert set(group["members"][0]) == documented("Member")
