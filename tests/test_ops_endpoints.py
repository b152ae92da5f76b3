"""Probes, metrics, OpenAPI schema and docs, the create_token command and the beat schedule."""

from __future__ import annotations

import io
import json
import os
from datetime import UTC, datetime, timedelta

import pytest
import time_machine
from django.core.management import CommandError, call_command
from django.test import Client
from django_celery_beat.models import PeriodicTask

from registry.models import ApiToken, hash_token
from registry.tasks import cleanup_once
from tests.conftest import client_for, service_body

pytestmark = pytest.mark.django_db


def test_healthz_and_readyz(redis_server):
    client = Client()
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready", "checks": {"database": "ok", "redis": "ok"}}


def test_readyz_is_503_when_redis_is_unreachable(settings):
    from registry.redis_client import reset_clients

    settings.REDIS_URL = "redis://127.0.0.1:1/0"
    reset_clients()
    try:
        response = Client().get("/readyz")
    finally:
        reset_clients()
    assert response.status_code == 503
    assert response.json()["checks"]["redis"] == "unavailable"
    assert response.json()["checks"]["database"] == "ok"


def test_metrics_count_services_by_effective_health_and_events(api, owner, django_capture_on_commit_callbacks):
    t0 = datetime(2026, 6, 1, tzinfo=UTC)
    with time_machine.travel(t0, tick=False) as clock:
        with django_capture_on_commit_callbacks(execute=True):
            api.post("/api/v1/services/", service_body("a", lease_duration=5, deregister_after=100), format="json")
            api.post("/api/v1/services/", service_body("b", health="degraded"), format="json")
            api.post("/api/v1/services/", service_body("c", lease_duration=5, deregister_after=0), format="json")
            api.post("/api/v1/services/", service_body("b"), format="json")  # a re-registration
            client_for(owner[1]).post("/api/v1/services/b/heartbeat/", {"health": "degraded"}, format="json")
        clock.move_to(t0 + timedelta(seconds=6))
        with django_capture_on_commit_callbacks(execute=True):
            cleanup_once()
        text = Client().get("/metrics").content.decode()
    assert 'conveyor_registry_services{health="healthy"} 0' in text
    assert 'conveyor_registry_services{health="degraded"} 1' in text
    assert 'conveyor_registry_services{health="unhealthy"} 1' in text
    assert "conveyor_registry_heartbeats_total 1" in text
    assert "conveyor_registry_registrations_total 3" in text
    assert "conveyor_registry_reregistrations_total 1" in text
    assert "conveyor_registry_expirations_total 1" in text
    assert "# TYPE conveyor_registry_heartbeats_total counter" in text
    assert "conveyor_registry_fencing_rejections_total 0" in text


def test_schema_documents_every_services_row(db):
    schema = Client().get("/api/schema/?format=json").json()
    paths = schema["paths"]
    assert set(paths["/api/v1/services/"]) >= {"get", "post"}
    assert set(paths["/api/v1/services/{service_id}/"]) >= {"get", "delete"}
    assert "post" in paths["/api/v1/services/{service_id}/heartbeat/"]
    assert "put" in paths["/api/v1/topics/{name}/"]
    assert "get" in paths["/api/v1/topics/"]
    assert "get" in paths["/api/v1/groups/"] and "get" in paths["/api/v1/groups/{group_id}/"]
    assert "post" in paths["/api/v1/groups/{group_id}/members/"]
    assert set(paths["/api/v1/groups/{group_id}/members/{member_id}/"]) >= {"get", "delete"}
    assert "post" in paths["/api/v1/groups/{group_id}/members/{member_id}/heartbeat/"]
    assert "get" in paths["/api/v1/leader/"]
    params = {p["name"] for p in paths["/api/v1/services/"]["get"]["parameters"]}
    assert params >= {"name", "type", "health", "group_id", "selector", "page"}


def test_docs_page_uses_no_cdn(db):
    html = Client().get("/api/docs/").content.decode()
    assert "swagger-ui-bundle.js" in html
    assert "cdn" not in html.lower()
    assert "/static/drf_spectacular_sidecar/" in html


def test_create_token_prints_the_key_last_and_stores_only_its_hash(db):
    out = io.StringIO()
    call_command("create_token", "kafka-source", stdout=out, stderr=io.StringIO())
    key = out.getvalue().strip().splitlines()[-1]
    token = ApiToken.objects.get(name="kafka-source")
    assert token.key_hash == hash_token(key)
    assert not token.is_staff
    assert client_for(key).get("/api/v1/services/").status_code == 200

    call_command("create_token", "ops", "--staff", stdout=io.StringIO(), stderr=io.StringIO())
    assert ApiToken.objects.get(name="ops").is_staff
    with pytest.raises(CommandError, match="exists"):
        call_command("create_token", "ops", stdout=io.StringIO(), stderr=io.StringIO())
    with pytest.raises(CommandError, match="NAME must be"):
        call_command("create_token", "bad name", stdout=io.StringIO(), stderr=io.StringIO())


def test_beat_schedules_cleanup_every_5_seconds_with_expiry(beat_schedule):
    task = PeriodicTask.objects.get(task="registry.cleanup_expired_leases")
    assert (task.interval.every, task.interval.period, task.expire_seconds, task.enabled) == (5, "seconds", 5, True)
    from registry_project.celery import app

    app.loader.import_default_modules()  # what a worker does at start: every app's tasks module
    assert "registry.cleanup_expired_leases" in app.tasks
    assert "registry.reconcile_leases" in app.tasks
    expiry = PeriodicTask.objects.get(task="groups.expire_members")
    assert (expiry.interval.every, expiry.interval.period, expiry.expire_seconds) == (5, "seconds", 5)
    assert "groups.expire_members" in app.tasks


def test_an_unreachable_database_is_a_503_the_client_may_retry(redis_server):
    """A live server whose database cannot be reached answers API requests 503 with Retry-After, not 500."""
    import urllib.error
    import urllib.request

    from registry_project.embedded_redis import free_port
    from registry_project.localserver import start_server

    port = free_port()
    env = dict(
        os.environ,
        REDIS_URL=redis_server.url,
        DATABASE_URL=f"postgres://postgres@127.0.0.1:{free_port()}/nowhere",
        LOG_LEVEL="WARNING",
    )
    server = start_server(port, env)
    try:
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/v1/services/", headers={"Authorization": "Bearer cr_whatever"}
        )
        with pytest.raises(urllib.error.HTTPError) as answer:
            urllib.request.urlopen(request, timeout=30)
        assert answer.value.code == 503
        assert answer.value.headers["Retry-After"] == "1"
        assert json.loads(answer.value.read()) == {"detail": "Database unavailable; retry shortly."}
    finally:
        server.terminate()
        server.wait(timeout=20)
