"""Fixtures: a real redis-server for the session, a clean lease store per test, tokens and API clients."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from asgiref.sync import async_to_sync
from channels.layers import channel_layers
from django.conf import settings
from django.contrib.auth.models import User
from django.core.signals import request_finished, request_started
from django.db import close_old_connections, connection
from django.test import Client
from hypothesis import settings as hypothesis_settings
from rest_framework.test import APIClient

from registry import lease_store
from registry.models import ApiToken
from registry.redis_client import get_redis, reset_clients
from registry_project.embedded_redis import RedisServer, free_port
from registry_project.localserver import start_server

# No deadline per example: a time limit is a timing assertion, and the suite shares a busy machine.
hypothesis_settings.register_profile("suite", deadline=None)
hypothesis_settings.load_profile("suite")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    settings.REDIS_URL = server.url
    settings.REDLOCK_URLS = [server.url]
    settings.CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "registry_project.layer.FanoutChannelLayer",
            "CONFIG": {"hosts": [{"address": server.url}], "prefix": "test-ws"},
        }
    }
    channel_layers.backends.clear()
    reset_clients()
    yield server
    reset_clients()
    server.stop()


@pytest.fixture(autouse=True)
def redis_clean(redis_server: RedisServer) -> Iterator[None]:
    """Every test starts with an empty, healthy lease store (the 'built' markers set)."""
    r = get_redis()
    r.flushall()
    lease_store.mark_built(r)
    lease_store.mark_sessions_built(r)
    yield


@pytest.fixture
def operator(db: Any) -> Client:
    """A logged-in superuser: an on-call operator in the admin."""
    client = Client()
    client.force_login(User.objects.create_superuser("operator", "op@example.com", "pw-for-tests-only"))
    return client


SCHEDULE_MIGRATIONS = (
    "registry.migrations.0002_beat_schedule",
    "registry.migrations.0008_history_prune_schedule",
    "groups.migrations.0002_beat_schedule",
    "groups.migrations.0003_session_reconcile",
)


@pytest.fixture
def beat_schedule(db: Any) -> None:
    """The periodic tasks as `migrate` installs them: the data migrations' own functions, run again,
    since a transactional test that ran before (in any order, on any worker) flushed the tables."""
    import importlib

    from django.apps import apps

    for module in SCHEDULE_MIGRATIONS:
        importlib.import_module(module).create_schedule(apps, None)


@pytest.fixture
def masters() -> Iterator[list[RedisServer]]:
    """Three independent redis-server masters (leadership), stopped after the test."""
    servers = [RedisServer().start() for _ in range(3)]
    yield servers
    for server in servers:
        server.stop()


@pytest.fixture
def make_token(db: Any) -> Callable[..., tuple[ApiToken, str]]:
    def make(name: str = "svc", *, staff: bool = False) -> tuple[ApiToken, str]:
        key = ApiToken.generate_key()
        token = ApiToken(name=name, is_staff=staff)
        token.set_key(key)
        token.save()
        return token, key

    return make


def client_for(key: str | None) -> APIClient:
    client = APIClient()
    if key:
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {key}")
    return client


@pytest.fixture
def owner(make_token: Callable[..., tuple[ApiToken, str]]) -> tuple[ApiToken, str]:
    return make_token("owner")


@pytest.fixture
def api(owner: tuple[ApiToken, str]) -> APIClient:
    return client_for(owner[1])


def service_body(service_id: str = "svc-1", **overrides: Any) -> dict[str, Any]:
    body = {
        "service_id": service_id,
        "service_name": "kafka-source",
        "service_type": "source",
        "endpoint": "10.0.0.1:50051",
        "labels": {"env": "prod", "zone": "a"},
    }
    body.update(overrides)
    return body


class Heartbeater:
    """Sends heartbeats through one of the two front doors: the DRF view or the ASGI fast path."""

    def __init__(self, via: str) -> None:
        self.via = via

    def __call__(self, service_id: str, key: str | None, body: Any = None, raw: bytes | None = None) -> tuple[int, Any]:
        import json

        payload = raw if raw is not None else (b"" if body is None else json.dumps(body).encode())
        path = f"/api/v1/services/{service_id}/heartbeat/"
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        if self.via == "drf":
            client = APIClient()
            response = client.generic(
                "POST",
                path,
                payload,
                content_type="application/json",
                **({"HTTP_AUTHORIZATION": headers["Authorization"]} if key else {}),
            )
            return response.status_code, response.json()
        response = asgi_request("POST", path, content=payload, headers={**headers, "content-type": "application/json"})
        return response.status_code, response.json()


def asgi_request(method: str, path: str, *, host: str = "127.0.0.1", **kwargs: Any) -> httpx.Response:
    """One request through the project's whole ASGI application (fast path, static files, Django).

    Like Django's own test clients, it keeps Django from closing the test's database
    connection at the start and end of the request.
    """
    from registry_project.asgi import application

    async def send() -> httpx.Response:
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url=f"http://{host}") as client:
            return await client.request(method, path, **kwargs)

    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    try:
        return async_to_sync(send)()
    finally:
        request_started.connect(close_old_connections)
        request_finished.connect(close_old_connections)


@pytest.fixture(params=["drf", "asgi"])
def heartbeat(request: pytest.FixtureRequest) -> Heartbeater:
    """Every heartbeat test runs against both front doors, which must answer alike."""
    return Heartbeater(request.param)


def wait_for(check: Callable[[], Any], seconds: float = 5.0) -> Any:
    """Poll ``check`` until it returns something truthy (returned); AssertionError after ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.02)
    raise AssertionError(f"not true within {seconds}s")


def database_url() -> str:
    db = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{db['NAME']}"
    return f"postgres://{db['USER']}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"


@pytest.fixture
def servers(redis_server: RedisServer) -> Iterator[list[str]]:
    """Two server processes on the same Redis and database."""
    env = dict(os.environ, REDIS_URL=redis_server.url, DATABASE_URL=database_url(), LOG_LEVEL="WARNING")
    ports = [free_port(), free_port()]
    procs = []
    try:
        for port in ports:
            procs.append(start_server(port, env))
        yield [f"http://127.0.0.1:{port}" for port in ports]
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=20)
