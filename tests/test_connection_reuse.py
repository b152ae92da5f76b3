"""The request threads of registry_project.handler: every request's sync part runs on the handler's
fixed pool, each thread keeps its database connection from one request to the next, and a connection
the database dropped (as a restart does) is replaced before the next request uses it."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import httpx
import pytest
from asgiref.sync import sync_to_async
from django.db import connection, connections
from django.db.backends.signals import connection_created

from registry.models import ApiToken
from registry_project.handler import SyncChainASGIHandler

pytestmark = pytest.mark.django_db(transaction=True)

THREADS = 2
T = TypeVar("T")


@pytest.fixture
def handler() -> Iterator[SyncChainASGIHandler]:
    app = SyncChainASGIHandler(threads=THREADS)
    yield app
    on_each_thread(app, connections.close_all)  # the test database is dropped at the end
    assert app.executor is not None
    app.executor.shutdown(wait=True)


def on_each_thread(app: SyncChainASGIHandler, fn: Callable[[], None]) -> None:
    """Run ``fn`` once on each of the handler's threads, as a request there would."""
    assert app.executor is not None
    executor = app.executor
    barrier = threading.Barrier(THREADS, timeout=10)

    def each() -> None:
        barrier.wait()  # holds this thread until every other one has an item too
        fn()

    async def go() -> None:
        run_each = sync_to_async(each, thread_sensitive=False, executor=executor)
        await asyncio.gather(*(run_each() for _ in range(THREADS)))

    run_in_own_loop(go)


def run_in_own_loop(go: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run ``go()`` on an event loop in a thread of its own, as a server runs requests: with no sync
    caller for the request to join."""
    result: list[T] = []
    thread = threading.Thread(target=lambda: result.append(asyncio.run(go())))
    thread.start()
    thread.join(timeout=60)
    return result[0]


@pytest.fixture
def opened() -> Iterator[list[str]]:
    """Names of the threads that opened a database connection while the test ran."""
    names: list[str] = []

    def note(sender: Any, **kwargs: Any) -> None:
        names.append(threading.current_thread().name)

    connection_created.connect(note)
    yield names
    connection_created.disconnect(note)


def get_many(app: SyncChainASGIHandler, key: str, path: str, count: int) -> list[httpx.Response]:
    """``count`` requests, four at a time."""

    async def go() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            headers = {"Authorization": f"Bearer {key}"}
            out: list[httpx.Response] = []
            for _ in range(count // 4):
                out += await asyncio.gather(*(client.get(path, headers=headers) for _ in range(4)))
            return out

    return run_in_own_loop(go)


def test_requests_reuse_the_pool_threads_connections(
    handler: SyncChainASGIHandler, make_token: Any, opened: list[str]
) -> None:
    _token, key = make_token("reuse")
    responses = get_many(handler, key, "/api/v1/services/?selector=env=prod", 40)
    assert [r.status_code for r in responses] == [200] * 40
    # 40 requests, at most one connection per request thread, all opened on those threads.
    request_threads = [name for name in opened if name.startswith("django-request")]
    assert 1 <= len(request_threads) <= THREADS, opened
    assert len(set(request_threads)) == len(request_threads), opened


def test_a_connection_the_database_dropped_is_replaced(handler: SyncChainASGIHandler, make_token: Any) -> None:
    _token, key = make_token("recover")
    assert [r.status_code for r in get_many(handler, key, "/api/v1/services/", 8)] == [200] * 8
    assert handler.executor is not None
    if connection.vendor == "postgresql":
        # What a database restart does to every open connection but ours.
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
    else:
        # SQLite has no server to restart: the nearest is a handle that fails, marked as failed.
        def break_it() -> None:
            connection.ensure_connection()
            connection.connection.close()
            connection.errors_occurred = True

        on_each_thread(handler, break_it)
    responses = get_many(handler, key, "/api/v1/services/", 8)
    assert [r.status_code for r in responses] == [200] * 8
    assert ApiToken.objects.filter(name="recover").exists()
