"""Browser fixtures: a real server process on the suite's database and Redis, Debian's Chromium driven by
Playwright, and a staff user logged in through the admin's login form.

Every page a test opens collects the browser's console errors and uncaught exceptions; a test fails on
any it did not declare expected (``console.expect(pattern)``). Without /usr/bin/chromium or the
``playwright`` package the browser tests are skipped, and say why.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from django.contrib.auth.models import User

from registry.models import ApiToken
from registry_project.embedded_redis import RedisServer, free_port
from registry_project.localserver import start_server
from tests.conftest import database_url

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
VIEWPORT = {"width": 1440, "height": 900}
PASSWORD = "pw-for-browser-tests"

try:
    from playwright.sync_api import Browser, ConsoleMessage, Page, sync_playwright
except ImportError:  # pragma: no cover - the dev requirements install it
    sync_playwright = None  # type: ignore[assignment]


def browser_skip_reason() -> str | None:
    if sync_playwright is None:
        return "browser tests skipped: the playwright package is missing (pip install -r requirements-dev.txt)"
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        return f"browser tests skipped: no Chromium at {CHROMIUM} (apt-get install -y chromium)"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = browser_skip_reason()
    if reason is None:
        return
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.path).startswith(here):
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    # Playwright's sync API keeps an event loop running in this thread, where Django refuses the ORM
    # calls the fixtures make unless told the thread is not serving async code (it is not). Only for
    # this module's tests; the server processes they start never inherit it.
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    try:
        with sync_playwright() as playwright:
            # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
            chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
            yield chromium
            chromium.close()
    finally:
        os.environ.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)


class LiveServer:
    """One uvicorn process of the project on a free port; ``cut()`` kills it, ``restart()`` brings it back
    on the same port (open pages' sockets drop and reconnect)."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = start_server(self.port, env)

    def cut(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=20)
            self.process = None

    def restart(self) -> None:
        self.cut()
        self.process = start_server(self.port, self.env)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=20)
            self.process = None


@pytest.fixture
def registry_server(browser: Browser, transactional_db: Any, redis_server: RedisServer) -> Iterator[LiveServer]:
    env = dict(os.environ, REDIS_URL=redis_server.url, DATABASE_URL=database_url(), LOG_LEVEL="WARNING")
    env.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
    server = LiveServer(env)
    yield server
    server.stop()


@pytest.fixture
def staff_api(registry_server: LiveServer) -> Iterator[httpx.Client]:
    """The REST API of the live server with a staff token."""
    key = ApiToken.generate_key()
    token = ApiToken(name="browser-tests", is_staff=True)
    token.set_key(key)
    token.save()
    with httpx.Client(base_url=registry_server.url + "/api/v1", headers={"Authorization": f"Bearer {key}"}) as client:
        yield client


@dataclass
class Console:
    """Console errors and uncaught exceptions of the pages of a test; ``expect`` declares tolerated ones."""

    errors: list[str] = field(default_factory=list)
    expected: list[re.Pattern[str]] = field(default_factory=list)

    def expect(self, pattern: str) -> None:
        self.expected.append(re.compile(pattern))

    def on_console(self, page_url: Callable[[], str], message: ConsoleMessage) -> None:
        if message.type == "error":
            source = message.location.get("url") or ""
            self.errors.append(f"{page_url()}: console error: {message.text} [{source}]")

    def on_page_error(self, page_url: Callable[[], str], error: Any) -> None:
        self.errors.append(f"{page_url()}: uncaught {error}")

    def unexpected(self) -> list[str]:
        return [e for e in self.errors if not any(p.search(e) for p in self.expected)]


@pytest.fixture
def console() -> Console:
    return Console()


@pytest.fixture
def staff_page(browser: Browser, registry_server: LiveServer, console: Console) -> Iterator[Page]:
    """A 1440x900 page logged in to the admin as a staff superuser; fails the test on console errors."""
    User.objects.create_superuser("operator", "op@example.com", PASSWORD)
    context = browser.new_context(viewport=VIEWPORT, base_url=registry_server.url)
    context.set_default_timeout(10_000)
    page = context.new_page()
    page.on("console", lambda message: console.on_console(lambda: page.url, message))
    page.on("pageerror", lambda error: console.on_page_error(lambda: page.url, error))
    page.goto("/admin/login/?next=/admin/")
    page.fill("#id_username", "operator")
    page.fill("#id_password", PASSWORD)
    page.click("input[type=submit]")
    page.wait_for_url(re.compile(r"/admin/$"))
    yield page
    context.close()
    assert console.unexpected() == [], "JavaScript console errors"
