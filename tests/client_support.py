"""Helpers of the client's tests: uvicorn processes on the suite's Redis and database that a test can stop and
start again on the same port (a restart the client must ride through), tokens, a plain HTTP client for setting
up and checking, and an operator who drains and undrains through the admin, as on-call people do. Their
fixtures are in ``tests.client_fixtures``."""

from __future__ import annotations

import re
import subprocess
from typing import Any

import httpx
from django.contrib.auth.models import User

from registry.models import ApiToken
from registry_project.embedded_redis import free_port
from registry_project.localserver import start_server


class LiveServer:
    """One uvicorn process at ``url``; ``stop()`` and ``start()`` keep the port."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> LiveServer:
        self.process = start_server(self.port, self.env)
        return self

    def stop(self) -> None:
        """Killed, not terminated: whatever it was answering is cut off, as in a crash."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=20)
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()


def new_token(name: str = "client", *, staff: bool = False) -> str:
    key = ApiToken.generate_key()
    token = ApiToken(name=name, is_staff=staff)
    token.set_key(key)
    token.save()
    return key


def rest(url: str, key: str | None) -> httpx.Client:
    """A plain HTTP client (not the library under test) for setting up and checking."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=f"{url}/api/v1", headers=headers, timeout=10)


def register_raw(url: str, key: str, service_id: str, name: str, **extra: Any) -> dict[str, Any]:
    body = {"service_id": service_id, "service_name": name, "service_type": "sink", "endpoint": "10.0.0.1:80"}
    with rest(url, key) as client:
        response = client.post("/services/", json={**body, **extra})
    response.raise_for_status()
    return response.json()


class Operator:
    """A superuser logged into the admin of a live server."""

    def __init__(self, url: str) -> None:
        User.objects.create_superuser("oncall", "oncall@example.com", "pw-for-tests-only")
        self.client = httpx.Client(base_url=url, timeout=10, follow_redirects=True)
        self.client.get("/admin/login/")
        self.client.post(
            "/admin/login/",
            data={
                "username": "oncall",
                "password": "pw-for-tests-only",
                "csrfmiddlewaretoken": self.client.cookies["csrftoken"],
                "next": "/admin/",
            },
        ).raise_for_status()

    def act(self, action: str, *service_ids: str) -> str:
        """Run an admin action (``drain``, ``undrain``...) on services; returns the page's success message."""
        page = self.client.post(
            "/admin/registry/service/",
            data={
                "action": action,
                "_selected_action": list(service_ids),
                "csrfmiddlewaretoken": self.client.cookies["csrftoken"],
            },
        )
        page.raise_for_status()
        found = re.search(r'class="success">([^<]+)<', page.text)
        return found.group(1) if found else ""
