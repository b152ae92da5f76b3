"""Heartbeats through both front doors (DRF view and ASGI fast path): same answers, no DB write per beat."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import time_machine
from django.db import connection
from django.test.utils import CaptureQueriesContext

from registry import lease_store
from registry.redis_client import get_redis
from tests.conftest import asgi_request, service_body

pytestmark = pytest.mark.django_db

T0 = datetime(2026, 5, 1, 0, 0, 0, tzinfo=UTC)


def test_heartbeat_answers_with_the_renewed_lease(api, owner, heartbeat):
    with time_machine.travel(T0, tick=False) as clock:
        api.post("/api/v1/services/", service_body(lease_duration=12), format="json")
        clock.shift(7)
        status, body = heartbeat("svc-1", owner[1])
    assert status == 200
    assert body == {
        "service_id": "svc-1",
        "health": "healthy",
        "lease": {"duration": 12, "heartbeat_interval": 4, "expires_at": "2026-05-01T00:00:19Z"},
    }


def test_a_steady_heartbeat_touches_no_database_row(api, owner, heartbeat):
    api.post("/api/v1/services/", service_body(), format="json")
    heartbeat("svc-1", owner[1])  # the first one caches the token
    with CaptureQueriesContext(connection) as queries:
        for _ in range(5):
            assert heartbeat("svc-1", owner[1])[0] == 200
    assert len(queries) == 0


def test_heartbeats_are_counted(api, owner, heartbeat):
    api.post("/api/v1/services/", service_body(), format="json")
    for _ in range(3):
        heartbeat("svc-1", owner[1])
    assert lease_store.counters(get_redis(), ["heartbeats"]) == {"heartbeats": 3}


@pytest.mark.parametrize(
    ("raw", "field", "fragment"),
    [
        (b'{"health": "sick"}', "health", "not a valid choice"),
        (b'{"health": 3}', "health", "not a valid choice"),
        (b"[1, 2]", "non_field_errors", "JSON object"),
        (b"{oops", "detail", "JSON parse error"),
    ],
)
def test_bad_heartbeat_bodies_are_400_naming_the_field(api, owner, heartbeat, raw, field, fragment):
    api.post("/api/v1/services/", service_body(), format="json")
    status, body = heartbeat("svc-1", owner[1], raw=raw)
    assert status == 400
    assert list(body) == [field]
    assert fragment in str(body[field])


def test_heartbeat_without_or_with_a_bad_token_is_401(api, heartbeat):
    api.post("/api/v1/services/", service_body(), format="json")
    assert heartbeat("svc-1", None) == (401, {"detail": "Authentication credentials were not provided."})
    assert heartbeat("svc-1", "cr_wrong") == (401, {"detail": "Invalid token."})


def test_a_revoked_token_stops_working_at_once(api, owner, heartbeat):
    api.post("/api/v1/services/", service_body(), format="json")
    assert heartbeat("svc-1", owner[1])[0] == 200  # now cached in Redis
    token = owner[0]
    token.is_active = False
    token.save()
    assert heartbeat("svc-1", owner[1])[0] == 401


def test_heartbeat_for_an_unknown_service_is_404(owner, heartbeat):
    status, body = heartbeat("never-registered", owner[1])
    assert status == 404
    assert body == {"detail": "Service not registered; register it again."}


def test_fast_path_checks_the_host_header(api, owner):
    api.post("/api/v1/services/", service_body(), format="json")
    auth = {"Authorization": f"Bearer {owner[1]}"}
    assert (
        asgi_request("POST", "/api/v1/services/svc-1/heartbeat/", host="evil.example", headers=auth).status_code == 400
    )
    assert (
        asgi_request("POST", "/api/v1/services/svc-1/heartbeat/", host="localhost:8000", headers=auth).status_code
        == 200
    )


def test_fast_path_passes_other_requests_to_django(owner):
    response = asgi_request("GET", "/api/v1/services/", headers={"Authorization": f"Bearer {owner[1]}"})
    assert response.status_code == 200
    assert response.json()["count"] == 0


def test_fast_path_serves_the_admin_and_docs_static_files(db):
    assert asgi_request("GET", "/static/admin/css/base.css").status_code == 200
    assert (
        asgi_request("GET", "/static/drf_spectacular_sidecar/swagger-ui-dist/swagger-ui-bundle.js").status_code == 200
    )
