"""Fixtures of the client's tests (``pytest_plugins = ["tests.client_fixtures"]``): live servers that can be
stopped and started again, a token, an operator in the admin."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from registry_project.embedded_redis import RedisServer
from tests.client_support import LiveServer, Operator, new_token
from tests.conftest import database_url


@pytest.fixture
def live(redis_server: RedisServer, transactional_db: Any) -> Iterator[Callable[[], LiveServer]]:
    """Start live servers on the suite's Redis and database: ``live()`` is one more, running."""
    env = dict(os.environ, REDIS_URL=redis_server.url, DATABASE_URL=database_url(), LOG_LEVEL="WARNING")
    started: list[LiveServer] = []

    def make() -> LiveServer:
        server = LiveServer(env).start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture
def server(live: Callable[[], LiveServer]) -> LiveServer:
    return live()


@pytest.fixture
def key(transactional_db: Any) -> str:
    return new_token()


@pytest.fixture
def operator_at(transactional_db: Any) -> Callable[[str], Operator]:
    return Operator
